"""Shared fixtures: real PostgreSQL and Redis for the session, a worker per test."""

from __future__ import annotations

import os
import uuid

import pytest

from djinn import Server, Worker
from qemu_image import build_images
from services import DIST_SCHEMA, ORIGINAL_SCHEMA, Postgres, Redis

# The SMTP server fixtures (smtp_server, smtp_tls_server, smtp_auth_server).
pytest_plugins = ["smtpserver"]

SCHEMAS = {
    "dist": (DIST_SCHEMA, ""),
    "original": (ORIGINAL_SCHEMA, "ALTER TYPE driver_type ADD VALUE 'os'"),
    # Later Djinn schemas mask variables.
    "original_masked": (ORIGINAL_SCHEMA, "ALTER TYPE driver_type ADD VALUE 'os'; "
                        "ALTER TABLE build_variables ADD COLUMN masked BOOLEAN DEFAULT FALSE"),
}


@pytest.fixture(scope="session")
def postgres():
    pg = Postgres().start()
    for name, (schema, extra) in SCHEMAS.items():
        if name.startswith("original") and not schema.exists():
            if os.environ.get("CI"):
                raise RuntimeError(f"{schema} is missing: CI must run beside shared/")
            continue
        pg.create_database(f"djinn_{name}", schema, extra)
    yield pg
    pg.stop()


@pytest.fixture(scope="session")
def redis_server():
    server = Redis().start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def vm_images():
    """The qemu test images; the first run on a machine builds them (a few minutes)."""
    try:
        return build_images()
    except RuntimeError as exc:
        pytest.fail(str(exc))


@pytest.fixture(params=["dist"])
def schema(request):
    """The schema a test runs against; modules widen it with pytest.mark.parametrize."""
    return request.param


@pytest.fixture
def server(postgres, redis_server, schema):
    dbname = f"djinn_{schema}"
    if schema.startswith("original") and not ORIGINAL_SCHEMA.exists():
        pytest.skip(f"{ORIGINAL_SCHEMA} not found (set DJINN_ORIGINAL_SCHEMA to the Djinn server's schema.sql)")
    conn = postgres.connect(dbname)
    client = redis_server.client()
    yield Server(conn, client, queue=f"builds-{uuid.uuid4().hex[:8]}")
    client.close()
    conn.close()


class Workers:
    """Real djinn-worker processes started from config files, as an operator does."""

    def __init__(self, tmp_path, postgres_addr: str, dbname: str, redis_addr: str, queue: str):
        self.tmp_path, self.queue = tmp_path, queue
        self.postgres_addr, self.dbname, self.redis_addr = postgres_addr, dbname, redis_addr
        self.started: list[Worker] = []

    def start(self, config: dict | None = None, drivers: dict | None = None, driver="os",
              start: bool = True, hostname: str | None = None) -> Worker:
        stores = self.tmp_path / "stores"
        base = {
            "parallelism": 1,
            "driver": driver,
            "queue": self.queue,
            "timeout": "60s",
            "database": {"addr": self.postgres_addr, "name": self.dbname,
                         "username": "postgres", "password": ""},
            "redis": {"addr": self.redis_addr},
            "images": {"type": "file", "path": str(stores / "images")},
            "artifacts": {"type": "file", "path": str(stores / "artifacts"), "limit": 0},
            "objects": {"type": "file", "path": str(stores / "objects")},
            "log": {"level": "debug",
                    "file": str(self.tmp_path / f"worker-{len(self.started)}.log")},
        }
        for key, value in (config or {}).items():
            if isinstance(value, dict) and isinstance(base.get(key), dict):
                base[key] = {**base[key], **value}
            else:
                base[key] = value
        workdir = self.tmp_path / f"worker-{len(self.started)}"
        workdir.mkdir()
        worker = Worker(workdir, base, drivers or {"ssh": {"timeout": "10s"}}, hostname)
        self.started.append(worker)
        return worker.start() if start else worker

    def kill_all(self) -> None:
        for worker in self.started:
            if worker.proc and worker.proc.poll() is None:
                worker.proc.kill()
                worker.proc.wait()


@pytest.fixture
def make_worker(tmp_path, postgres, redis_server, server, schema):
    """Start a real djinn-worker on this test's queue; stopped after the test."""
    workers = Workers(tmp_path, postgres.addr, f"djinn_{schema}", redis_server.addr, server.queue)
    yield workers.start
    workers.kill_all()


@pytest.fixture
def private(tmp_path):
    """(server, workers) on a PostgreSQL and a Redis of this test's own."""
    pg, rds = Postgres().start(), Redis().start()
    pg.create_database("djinn", DIST_SCHEMA)
    server = Server(pg.connect("djinn"), rds.client(), queue=f"builds-{uuid.uuid4().hex[:8]}")
    workers = Workers(tmp_path, pg.addr, "djinn", rds.addr, server.queue)
    server.pg, server.rds = pg, rds
    try:
        yield server, workers
    finally:
        workers.kill_all()
        rds.stop()
        pg.stop()
