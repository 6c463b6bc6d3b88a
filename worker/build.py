"""The build child: load one build, run it, report over the pipe, exit.

Runs in a forked process in a session of its own. It opens its own database
and Redis connections, arms the build timeout, listens for kill requests and
writes everything the runner reports into the database. Its last act towards
the supervisor is one JSON line on the report pipe saying how the build ended;
anything it writes before that tells the supervisor what to clean up should
this process die.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import threading
from dataclasses import dataclass

from .cancel import BuildTimer, Cancel
from .config import DriverConfig, WorkerConfig, host_arch
from .model import FAILED, KILLED, TIMED_OUT, Artifact, Build, Job, Object, Stage
from .queue import KillWatcher, Payload
from .runner import DriverNotEnabled, Runner
from . import db, mail
from djinn_worker.drivers.base import DriverError
from djinn_worker.stores.file import FileStore, StoreError

log = logging.getLogger(__name__)

# Live output reaches the database at most this long after it was printed.
FLUSH_INTERVAL = 0.25
# Connecting to and talking with the mail server, per attempt.
MAIL_TIMEOUT = 30.0
MAILED = (FAILED, KILLED, TIMED_OUT)


@dataclass
class Report:
    build_id: int
    status: str
    error: str = ""


class Pipe:
    """The child's end of the report pipe; also the driver's resource Tracker."""

    def __init__(self, fd: int):
        self.fd = fd

    def send(self, **message) -> None:
        data = (json.dumps(message) + "\n").encode()
        try:
            os.write(self.fd, data)
        except BrokenPipeError:
            pass  # the supervisor is gone; the build still finishes in the database

    def process_group(self, pgid: int) -> None:
        self.send(pgid=pgid)

    def path(self, path: str) -> None:
        self.send(path=path)


class DatabaseReporter:
    """Runner events into SQL, with job output batched for a short interval.

    A job that prints many small lines would otherwise cost one UPDATE per
    line; a background thread flushes what is buffered every FLUSH_INTERVAL,
    and every status change flushes first so the log is in order.
    """

    def __init__(self, conn: db.Connection, build: Build):
        self.conn, self.build = conn, build
        self._lock = threading.Lock()
        self._pending: list[tuple[int | None, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._flusher, name="output", daemon=True)
        self._thread.start()

    def _flusher(self) -> None:
        while not self._stop.wait(FLUSH_INTERVAL):
            self.flush()

    def flush(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, []
            merged: list[tuple[int | None, str]] = []
            for job_id, text in pending:
                if merged and merged[-1][0] == job_id:
                    merged[-1] = (job_id, merged[-1][1] + text)
                else:
                    merged.append((job_id, text))
            for job_id, text in merged:
                db.append_output(self.conn, self.build.id, job_id, text)

    def output(self, job: Job | None, text: str) -> None:
        with self._lock:
            self._pending.append((job.id if job else None, text))

    def job_started(self, job: Job) -> None:
        self.flush()
        db.start_job(self.conn, job.id)

    def job_finished(self, job: Job, status: str) -> None:
        self.flush()
        db.finish_job(self.conn, job.id, status)

    def stage_started(self, stage: Stage) -> None:
        db.start_stage(self.conn, stage.id)

    def stage_finished(self, stage: Stage, status: str) -> None:
        db.finish_stage(self.conn, stage.id, status)

    def object_placed(self, obj: Object) -> None:
        db.mark_placed(self.conn, obj.id)

    def artifact_collected(self, artifact: Artifact, size: int, md5: bytes, sha256: bytes) -> None:
        db.record_artifact(self.conn, artifact.id, size, md5, sha256)

    def build_finished(self, status: str) -> None:
        self.close()
        db.finish_build(self.conn, self.build.id, status)

    def close(self) -> None:
        self._stop.set()
        self.flush()


def make_driver(build: Build, config: WorkerConfig, drivers: DriverConfig, pipe: Pipe,
                conn: db.Connection):
    """Import only the driver this build uses: a child pays for nothing else."""
    kind = build.driver_type
    if kind not in config.drivers:
        raise DriverNotEnabled(f"driver {kind} has not been configured for the worker")
    if kind == "os":
        from djinn_worker.drivers.local import OSDriver
        return OSDriver(build.id, pipe)
    if kind == "docker":
        # Containers and volumes are found by label if this process dies, so
        # the docker driver needs no Tracker.
        from djinn_worker.drivers.docker import DockerDriver
        return DockerDriver(build.id, build.driver, drivers.docker, config.identity)
    if kind == "ssh":
        from djinn_worker.drivers.ssh import SSHDriver
        address = build.driver.get("address") or build.driver.get("addr")
        if not isinstance(address, str) or not address:
            raise DriverError("the ssh driver needs an address (host:port) in the manifest")
        ssh = drivers.ssh
        # Nothing of an ssh build lives on this host: no Tracker needed.
        return SSHDriver(build.id, address, ssh.user, ssh.password, ssh.timeout)
    if kind == "qemu":
        from djinn_worker.drivers.qemu import QemuDriver
        image = build.driver.get("image")
        qemu = drivers.qemu
        return QemuDriver(
            build.id, image if isinstance(image, str) else "", host_arch(), qemu.cpus,
            qemu.memory, qemu.accel, lambda name: qemu_image(conn, build, config, drivers, name),
            pipe,
        )
    raise DriverNotEnabled(f"driver {kind} is not supported by this worker")


def qemu_image(conn: db.Connection, build: Build, config: WorkerConfig, drivers: DriverConfig,
               name: str) -> str | None:
    """The path a build's image name means: an image uploaded to the build's
    namespace (or, without one, by its user), else a base image for this
    host's architecture. The stores refuse paths that would leave them."""
    found = db.find_image(conn, build.user_id, build.namespace_id, "qemu", name)
    try:
        if found:
            owner, key = found
            return FileStore("images", os.path.join(config.images.path, "qemu")).path(owner, key)
        return FileStore("qemu disks", drivers.qemu.disks).resolve("_base", host_arch(), name)
    except StoreError as exc:
        log.warning("build %s: image %s: %s", build.id, name, exc)
        return None


def inputs_and_outputs(build: Build, config: WorkerConfig) -> dict:
    """The stores and cipher the runner needs, made only when the build uses them."""
    parts: dict = {}
    if build.objects:
        parts["objects"] = FileStore("objects", config.objects.path)
    if any(job.artifacts for stage in build.stages for job in stage.jobs):
        parts["artifacts"] = FileStore("artifacts", config.artifacts.path, config.artifacts.limit)
    if build.keys and config.crypto_block:
        from .crypto import BlockCipher
        parts["cipher"] = BlockCipher(config.crypto_block)
    return parts


def run(payload: Payload, config: WorkerConfig, drivers: DriverConfig, report_fd: int) -> Report:
    """Run one claimed build to its end; the caller exits the process after."""
    pipe = Pipe(report_fd)
    cancel = Cancel()
    signal.signal(signal.SIGTERM, lambda *_: cancel.cancel(KILLED))
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    timer = BuildTimer(config.timeout, cancel)
    conn = db.connect(config.database, application="djinn-worker build")
    db.hold_build_lock(conn, payload.build_id)
    try:
        try:
            build = db.load_build(conn, payload.build_id)
        except db.BuildRowError as exc:
            log.error("build %s: %s", payload.build_id, exc)
            db.abandon_build(conn, payload.build_id, FAILED, f"{exc}\nDone. Run {FAILED}\n")
            return Report(payload.build_id, FAILED, str(exc))
        watcher = KillWatcher(config.redis, build.id, build.secret, lambda: cancel.cancel(KILLED))
        try:
            reporter = DatabaseReporter(conn, build)
            runner = Runner(
                build,
                make_driver=lambda: make_driver(build, config, drivers, pipe, conn),
                reporter=reporter,
                cancel=cancel,
                creating=timer.creating,
                **inputs_and_outputs(build, config),
            )
            status = runner.run()
        finally:
            timer.stop()
            watcher.stop()
        return Report(build.id, status)
    finally:
        conn.close()


def notify(config: WorkerConfig, payload: Payload, status: str) -> None:
    """Mail the people of a build that did not pass; never changes its outcome.

    Runs after the final status is committed and reported, on a connection
    of its own, so a slow or absent mail server delays nothing but this
    process's exit.
    """
    if not config.smtp.enabled or status not in MAILED:
        return
    try:
        conn = db.connect(config.database, application="djinn-worker mail")
        try:
            notice = db.failure_notice(conn, payload.build_id, status, payload.host)
        finally:
            conn.close()
        sender = config.smtp.admin or f"djinn-worker@{socket.gethostname()}"
        mail.send(config.smtp, mail.compose(notice, sender), timeout=MAIL_TIMEOUT)
    except mail.MailError as exc:
        log.error("build %s: no failure mail sent: %s", payload.build_id, exc)
    except Exception as exc:
        log.exception("build %s: no failure mail sent: %s", payload.build_id, exc)
    else:
        log.info("build %s: failure mail sent to %s", payload.build_id, ", ".join(notice.recipients))


def main(payload: Payload, config: WorkerConfig, drivers: DriverConfig, report_fd: int) -> int:
    """Entry point in the forked child; returns the exit status for os._exit."""
    os.setsid()
    pipe = Pipe(report_fd)
    try:
        report = run(payload, config, drivers, report_fd)
    except Exception as exc:
        log.exception("build %s: the build process failed", payload.build_id)
        pipe.send(build_id=payload.build_id, status=None, error=f"{type(exc).__name__}: {exc}")
        return 1
    log.info("build %s: finished %s", report.build_id, report.status)
    pipe.send(build_id=report.build_id, status=report.status, error=report.error)
    notify(config, payload, report.status)
    return 0
