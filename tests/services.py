"""Throwaway PostgreSQL and Redis servers for the tests, the demo and the benchmarks.

Each server lives in a temporary directory on a free port and is gone when
stopped. initdb refuses to run as root, so as root the cluster belongs to the
`postgres` user.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import psycopg2
import redis

REPO = Path(__file__).resolve().parent.parent
DIST_SCHEMA = REPO / "dist" / "schema.sql"


def _original_schema() -> Path:
    """The Djinn server's own schema.sql, which this repository may not copy.

    It lives in the project's shared folder: beside the checkout, or at
    /work/shared for a clone made elsewhere; DJINN_ORIGINAL_SCHEMA overrides.
    """
    if os.environ.get("DJINN_ORIGINAL_SCHEMA"):
        return Path(os.environ["DJINN_ORIGINAL_SCHEMA"])
    places = [REPO.parent / "shared" / "djinn" / "schema.sql", Path("/work/shared/djinn/schema.sql")]
    return next((p for p in places if p.exists()), places[0])


ORIGINAL_SCHEMA = _original_schema()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait(check, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            check()
            return
        except Exception as exc:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what} did not come up: {exc}") from exc
            time.sleep(0.05)


@dataclass(frozen=True)
class ServerTLS:
    """What a Postgres runs with ssl = on: its certificate and key, the CA
    it verifies client certificates against, and the pg_hba.conf lines that
    replace the default ones (the unix socket stays trusted)."""

    cert: str
    key: str
    ca: str
    hba: tuple[str, ...]


class Postgres:
    def __init__(self, parent: Path | None = None, tls: ServerTLS | None = None) -> None:
        bins = sorted(glob.glob("/usr/lib/postgresql/*/bin"))
        self.bin = Path(bins[-1]) if bins else Path(shutil.which("initdb") or "initdb").parent
        self.dir = Path(tempfile.mkdtemp(prefix="djinn-test-pg-", dir=parent))
        self.port = free_port()
        self.user = None
        self.tls = tls
        self.proc: subprocess.Popen | None = None
        if os.getuid() == 0:
            self.user = "postgres"
            pw = pwd.getpwnam("postgres")
            os.chown(self.dir, pw.pw_uid, pw.pw_gid)

    def _run(self, *args: str) -> None:
        subprocess.run(args, check=True, user=self.user, stdout=subprocess.DEVNULL,
                       stderr=subprocess.PIPE)

    def start(self) -> Postgres:
        data = self.dir / "data"
        self._run(str(self.bin / "initdb"), "-D", str(data), "-U", "postgres",
                  "--auth=trust", "-E", "UTF8", "--no-sync", "--no-instructions")
        if self.tls:
            self._configure_tls(data)
        return self._launch()

    def _configure_tls(self, data: Path) -> None:
        """Copies of the files inside the cluster, owned by its user: the
        server refuses a key that others can read."""
        settings = ["ssl = on"]
        for name, source in (("ssl_cert_file", self.tls.cert), ("ssl_key_file", self.tls.key),
                             ("ssl_ca_file", self.tls.ca)):
            target = data / Path(source).name
            shutil.copyfile(source, target)
            target.chmod(0o600)
            if self.user:
                shutil.chown(target, self.user, self.user)
            settings.append(f"{name} = '{target}'")
        with open(data / "postgresql.conf", "a") as conf:
            conf.write("\n".join(settings) + "\n")
        (data / "pg_hba.conf").write_text("\n".join(("local all all trust",) + self.tls.hba) + "\n")

    def restart(self, down: float) -> None:
        """Stop the server, stay away for `down` seconds, and start it again
        on the same port with the same data, as an operator's restart does."""
        self._terminate()
        time.sleep(down)
        self._launch()

    def _launch(self) -> Postgres:
        data = self.dir / "data"
        self.proc = subprocess.Popen(
            [str(self.bin / "postgres"), "-D", str(data), "-p", str(self.port),
             "-k", str(self.dir), "-c", "listen_addresses=127.0.0.1",
             "-c", "fsync=off", "-c", "synchronous_commit=off",
             "-c", "full_page_writes=off", "-c", "max_connections=200",
             "-c", "timezone=UTC"],
            user=self.user, stdout=subprocess.DEVNULL, stderr=open(self.dir / "log", "ab"),
        )
        _wait(lambda: self.connect("postgres").close(), "PostgreSQL")
        return self

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.port}"

    def connect(self, dbname: str) -> psycopg2.extensions.connection:
        conn = psycopg2.connect(host="127.0.0.1", port=self.port, user="postgres", dbname=dbname)
        conn.autocommit = True
        return conn

    def create_database(self, name: str, schema: Path, extra: str = "") -> None:
        conn = self.connect("postgres")
        with conn.cursor() as cur:
            cur.execute(f'DROP DATABASE IF EXISTS "{name}"')
            cur.execute(f'CREATE DATABASE "{name}"')
        conn.close()
        conn = self.connect(name)
        with conn.cursor() as cur:
            cur.execute(schema.read_text())
            if extra:
                cur.execute(extra)
        conn.close()

    def _terminate(self) -> None:
        if self.proc:
            # SIGINT: PostgreSQL's fast shutdown, which ends every session at once.
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def stop(self) -> None:
        self._terminate()
        shutil.rmtree(self.dir, ignore_errors=True)


class Redis:
    def __init__(self, parent: Path | None = None) -> None:
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="djinn-test-redis-", dir=parent))
        self.proc: subprocess.Popen | None = None

    def restart(self, down: float) -> None:
        """Stop the server, stay away for `down` seconds, start it again on the same port."""
        self.proc.terminate()
        self.proc.wait(15)
        time.sleep(down)
        self.start()

    def start(self) -> Redis:
        self.proc = subprocess.Popen(
            [shutil.which("redis-server") or "/usr/bin/redis-server", "--port", str(self.port),
             "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(self.dir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        _wait(lambda: self.client().ping(), "Redis")
        return self

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.port}"

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port)

    def stop(self) -> None:
        if self.proc:
            self.proc.terminate()
            self.proc.wait(15)
        shutil.rmtree(self.dir, ignore_errors=True)
