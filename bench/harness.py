"""The throwaway Djinn every benchmark runs against: PostgreSQL, Redis and
one real djinn-worker (os driver) started from a config file."""

from __future__ import annotations

import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from djinn import Server, Worker  # noqa: E402
from services import DIST_SCHEMA, Postgres, Redis  # noqa: E402


@contextmanager
def djinn(**config) -> Iterator[tuple[Server, Worker]]:
    """A worker on queue "builds" with config's keys over the defaults."""
    with tempfile.TemporaryDirectory(prefix="djinn-bench-") as tmp:
        base = Path(tmp)
        base.chmod(0o755)
        postgres, redis, worker = Postgres(base).start(), Redis(base).start(), None
        try:
            postgres.create_database("djinn", DIST_SCHEMA)
            settings = {
                "parallelism": 2, "driver": "os", "queue": "builds", "timeout": "1m",
                "database": {"addr": postgres.addr, "name": "djinn", "username": "postgres"},
                "redis": {"addr": redis.addr},
                **{s: {"type": "file", "path": str(base / s)} for s in ("images", "artifacts", "objects")},
                "log": {"level": "info", "file": str(base / "worker.log")},
                **config,
            }
            worker = Worker(base, settings, {"ssh": {}}).start()
            yield Server(postgres.connect("djinn"), redis.client(), "builds"), worker
        finally:
            if worker:
                worker.stop()
            redis.stop()
            postgres.stop()
