"""What the Djinn server does before a build reaches the worker, for the tests.

Builds are inserted the way the Djinn server writes them (a builds row, its
driver, a setup stage with "create driver", then the manifest's stages and
jobs) and queued with LPUSH; tests then read the rows
back. The SQL here is the server's side of the contract, not the worker's.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import psycopg2
import psycopg2.extras

FINISHED = ("passed", "passed_with_failures", "failed", "killed", "timed_out")
WORKER_BIN = str(Path(sys.executable).parent / "djinn-worker")


@dataclass
class QueuedBuild:
    id: int
    user_id: int
    secret: str
    jobs: dict[str, int] = field(default_factory=dict)
    stages: dict[str, int] = field(default_factory=dict)
    artifacts: dict[str, int] = field(default_factory=dict)
    objects: dict[str, int] = field(default_factory=dict)


class Server:
    """Writes builds like the Djinn server and reads back what the worker wrote."""

    def __init__(self, conn, redis_client, queue: str):
        self.conn, self.redis, self.queue = conn, redis_client, queue

    def sql(self, query: str, *args):
        with self.conn.cursor(cursor_factory=psycopg2.extras.RealDictCursor) as cur:
            cur.execute(query, args)
            return cur.fetchall() if cur.description else None

    def user(self, username: str | None = None, email: str | None = None) -> int:
        username = username or f"user-{uuid.uuid4().hex[:8]}"
        return self.sql(
            "INSERT INTO users (email, username, password) VALUES (%s, %s, 'x') RETURNING id",
            email or f"{username}@example.com", username,
        )[0]["id"]

    def insert(self, stages: list[tuple[str, bool, list[tuple[str, str]]]] | None = None,
               driver: dict | None = None, variables: list[tuple[str, str]] = (),
               user_id: int | None = None, namespace_id: int | None = None,
               artifacts: dict[str, list[tuple[str, str]]] | None = None,
               objects: list[tuple[str, str, int | None]] = (),
               keys: list[tuple[str, bytes, str, str]] = (),
               trigger: tuple[str, str, dict] | None = None) -> QueuedBuild:
        """A queued build: setup stage with "create driver", then the given stages.

        stages: (name, can_fail, [(job name, commands)]); artifacts: job name ->
        [(source, name[, hash])]; objects: (source name, destination, objects.id);
        keys: (name, ciphertext, config, location).
        """
        user_id = user_id or self.user()
        driver = driver or {"type": "os"}
        stages = stages if stages is not None else [("test", False, [("test", "true")])]
        secret = secrets.token_hex(16)
        with self.conn:
            number = self.sql("SELECT COUNT(*) + 1 AS n FROM builds WHERE user_id = %s", user_id)[0]["n"]
            bid = self.sql(
                "INSERT INTO builds (user_id, namespace_id, number, manifest, secret) "
                "VALUES (%s, %s, %s, %s, %s) RETURNING id",
                user_id, namespace_id, number, json.dumps({"driver": driver}), secret,
            )[0]["id"]
            build = QueuedBuild(bid, user_id, secret)
            self.sql("INSERT INTO build_drivers (build_id, type, config) VALUES (%s, %s, %s)",
                     bid, driver["type"], json.dumps(driver))
            all_stages = [(f"setup - #{bid}", False, [("create driver", "")])] + list(stages)
            for name, can_fail, jobs in all_stages:
                sid = self.sql("INSERT INTO build_stages (build_id, name, can_fail) "
                               "VALUES (%s, %s, %s) RETURNING id", bid, name, can_fail)[0]["id"]
                build.stages[name] = sid
                for job, commands in jobs:
                    build.jobs[job] = self.sql(
                        "INSERT INTO build_jobs (build_id, stage_id, name, commands) "
                        "VALUES (%s, %s, %s, %s) RETURNING id", bid, sid, job, commands,
                    )[0]["id"]
            for job, pairs in (artifacts or {}).items():
                for source, name, *hash_ in pairs:
                    build.artifacts[name] = self.sql(
                        "INSERT INTO build_artifacts (user_id, build_id, job_id, hash, source, name) "
                        "VALUES (%s, %s, %s, %s, %s, %s) RETURNING id",
                        user_id, bid, build.jobs[job], hash_[0] if hash_ else uuid.uuid4().hex,
                        source, name,
                    )[0]["id"]
            for key, value, *masked in variables:
                if masked:  # later schemas: (key, base64 ciphertext, True)
                    self.sql("INSERT INTO build_variables (build_id, key, value, masked) "
                             "VALUES (%s, %s, %s, %s)", bid, key, value, masked[0])
                else:
                    self.sql("INSERT INTO build_variables (build_id, key, value) VALUES (%s, %s, %s)",
                             bid, key, value)
            for source, dest, object_id in objects:
                build.objects[source] = self.sql(
                    "INSERT INTO build_objects (build_id, object_id, source, name) "
                    "VALUES (%s, %s, %s, %s) RETURNING id", bid, object_id, source, dest,
                )[0]["id"]
            for name, ciphertext, config, location in keys:
                self.sql("INSERT INTO build_keys (build_id, name, key, config, location) "
                         "VALUES (%s, %s, %s, %s, %s)", bid, name,
                         psycopg2.Binary(ciphertext), config, location)
            if trigger:
                self.sql("INSERT INTO build_triggers (build_id, type, comment, data) "
                         "VALUES (%s, %s, %s, %s)", bid, trigger[0], trigger[1], json.dumps(trigger[2]))
        return build

    def add_object(self, user_id: int, name: str, data: bytes, store: Path | None) -> int:
        """An uploaded object: its row, and its file in the store unless store is None."""
        digest = uuid.uuid4().hex
        if store is not None:
            (store / str(user_id)).mkdir(parents=True, exist_ok=True)
            (store / str(user_id) / digest).write_bytes(data)
        return self.sql(
            "INSERT INTO objects (user_id, author_id, hash, name, type, size, md5, sha256) "
            "VALUES (%s, %s, %s, %s, 'application/octet-stream', %s, %s, %s) RETURNING id",
            user_id, user_id, digest, name, len(data),
            psycopg2.Binary(hashlib.md5(data).digest()), psycopg2.Binary(hashlib.sha256(data).digest()),
        )[0]["id"]

    def push(self, build_id, host: str = "https://ci.example.com", queue: str | None = None) -> None:
        payload = build_id if isinstance(build_id, (str, bytes)) else json.dumps(
            {"build_id": build_id, "host": host})
        self.redis.lpush(queue or self.queue, payload)

    def queue_build(self, *args, **kwargs) -> QueuedBuild:
        build = self.insert(*args, **kwargs)
        self.push(build.id)
        return build

    def build(self, build_id: int) -> dict:
        return self.sql("SELECT * FROM builds WHERE id = %s", build_id)[0]

    def job(self, job_id: int) -> dict:
        return self.sql("SELECT * FROM build_jobs WHERE id = %s", job_id)[0]

    def jobs(self, build_id: int) -> list[dict]:
        return self.sql("SELECT * FROM build_jobs WHERE build_id = %s ORDER BY id", build_id)

    def wait(self, build_id: int, statuses=FINISHED, timeout: float = 30.0) -> dict:
        """Poll until the build reaches one of statuses (tests may poll; the worker doesn't)."""
        return _poll(lambda: self.build(build_id), statuses, timeout, f"build {build_id}")

    def wait_job(self, job_id: int, statuses=("running",), timeout: float = 30.0) -> dict:
        return _poll(lambda: self.job(job_id), statuses, timeout, f"job {job_id}")


def _poll(fetch, statuses, timeout: float, what: str) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        row = fetch()
        if row["status"] in statuses:
            return row
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} still {row['status']} after {timeout}s:\n{row['output']}")
        time.sleep(0.05)


def toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + "}"
    return json.dumps(value)


def write_toml(path: Path, data: dict) -> Path:
    path.write_text("\n".join(_toml_lines(data, "")) + "\n")
    return path


def _toml_lines(table: dict, prefix: str) -> list[str]:
    """A table's keys, then each of its tables ([database.ssl] within [database])."""
    lines = [f"{k} = {toml_value(v)}" for k, v in table.items() if not isinstance(v, dict)]
    for name, sub in table.items():
        if isinstance(sub, dict):
            lines.append(f"\n[{prefix}{name}]")
            lines += _toml_lines(sub, f"{prefix}{name}.")
    return lines


class Worker:
    """A real djinn-worker process started from config files."""

    def __init__(self, workdir: Path, config: dict, drivers: dict, hostname: str | None = None):
        # hostname: run in a UTS namespace of its own under that host name,
        # which is how one machine plays several hosts of a fleet.
        self.workdir = workdir
        self.config_path = write_toml(workdir / "worker.toml", config)
        self.driver_path = write_toml(workdir / "driver.toml", drivers)
        self.log_path = Path(config["log"]["file"])
        self.hostname = hostname
        self.proc: subprocess.Popen | None = None

    def start(self, wait: str | None = "started") -> Worker:
        argv = [WORKER_BIN, "-config", str(self.config_path), "-driver", str(self.driver_path)]
        if self.hostname:
            argv = ["unshare", "--uts", "sh", "-c", 'hostname "$0" && exec "$@"',
                    self.hostname] + argv
        self.proc = subprocess.Popen(
            argv, stdout=subprocess.DEVNULL, stderr=open(self.workdir / "stderr", "wb"),
            cwd=self.workdir,
        )
        if wait:
            self.wait_log(wait)
        return self

    @property
    def stderr(self) -> str:
        return (self.workdir / "stderr").read_text()

    @property
    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def wait_log(self, text: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.log:
            if self.proc.poll() is not None:
                raise AssertionError(f"worker exited {self.proc.returncode}:\n{self.log}\n"
                                     f"{(self.workdir / 'stderr').read_text()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{text!r} not in the worker log after {timeout}s:\n{self.log}")
            time.sleep(0.05)

    def children(self) -> list[int]:
        """The worker's build processes (not the spare one made ahead)."""
        out = subprocess.run(["pgrep", "-P", str(self.proc.pid)], capture_output=True, text=True)
        return [int(p) for p in out.stdout.split() if "spare" not in _cmdline(int(p))]

    def wait_children_gone(self, timeout: float = 30.0) -> None:
        """Until every build process has exited (after its result it still
        sends its commit status and mail)."""
        deadline = time.monotonic() + timeout
        while self.children():
            assert time.monotonic() < deadline, self.children()
            time.sleep(0.05)

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 60.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.send_signal(signal.SIGTERM)
                self.proc.wait(timeout)
        return self.proc.returncode


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return ""


def marker() -> str:
    """A unique sleep length, so a test can find its own processes in /proc."""
    return f"{1000 + uuid.uuid4().int % 100000}.{os.getpid()}"


def processes_with(text: str) -> list[str]:
    """Command lines of live processes containing text (for leftover checks)."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmd:
            found.append(f"{pid}: {cmd}")
    return found
