"""The build child: load one build, run it, report over the pipe, exit.

Runs in a forked process in a session of its own. It talks to PostgreSQL
(the supervisor listens for kills and forwards them as SIGTERM), arms the
build timeout and writes everything the runner reports into the database.
Its last act towards the supervisor is the result on the report pipe, which
frees the build's slot; anything it reports before that tells the supervisor
what to clean up should this process die. After it, the process only sends
the build's final commit status and failure mail, then exits.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import time
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

from setproctitle import setproctitle

from .cancel import BuildTimer, Cancel
from .config import DriverConfig, WorkerConfig, host_arch
from .model import FAILED, KILLED, MAILED, Build, done_line
from .queue import Payload
from . import report
from .report import ReportWriter
from .reporter import DatabaseReporter
from .runner import DriverNotEnabled, Runner
from . import db, logs, statuses
from djinn_worker import drivers as driver_types
from djinn_worker.drivers.base import Driver
from djinn_worker.stores.file import FileStore, StoreError

log = logging.getLogger(__name__)

_M_MMAP_THRESHOLD = -3  # mallopt's parameter number in glibc's malloc.h


@dataclass
class Outcome:
    build_id: int
    status: str
    error: str = ""
    # The build's commit statuses, whose final one goes after the result.
    statuses: statuses.Statuses | None = None


def make_driver(build: Build, config: WorkerConfig, drivers: DriverConfig,
                tracker: ReportWriter, conn: db.Connection) -> Driver:
    """The build's driver, if this worker runs that type; its manifest is checked by it."""
    kind = build.driver_type
    if kind not in config.drivers:
        raise DriverNotEnabled(f"driver {kind} has not been configured for the worker")
    extra = {}
    if kind == "qemu":
        image = build.driver.get("image")
        extra["image_path"] = qemu_image(conn, build, config, drivers, image) \
            if isinstance(image, str) and image else None
    return driver_types.make(kind, build.id, build.driver, getattr(drivers, kind, None),
                             tracker, **extra)


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
    if (build.keys or build.pull or any(v.masked for v in build.variables)) and config.crypto_block:
        from .crypto import BlockCipher
        parts["cipher"] = BlockCipher(config.cipher_key)
    return parts


def run(payload: Payload, claimed: db.Claimed, config: WorkerConfig, drivers: DriverConfig,
        pipe: ReportWriter, conn: db.Connection | None = None,
        lent: db.Connection | None = None) -> Outcome:
    """Run one claimed build to its end; the caller exits the process after.

    conn is this process's own connection, opened ahead; lent is one the
    supervisor lends (see lending.py), handed back at the end if it is
    still in use and healthy. The supervisor forks with SIGTERM blocked: a
    kill it forwards before the handler is in place waits until it is, and
    is never lost.
    """
    cancel = Cancel()
    signal.signal(signal.SIGTERM, lambda *_: cancel.cancel(KILLED))
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
    session = db.Session(config.database, claimed, config.database.outage, pipe.database)
    timer = BuildTimer(config.timeout, cancel)
    try:
        try:
            build = session.open(lent or conn)
        except db.BuildRowError as exc:
            log.error("build %s: %s", payload.build_id, exc)
            session.call(db.abandon_build, payload.build_id, FAILED, f"{exc}\n{done_line(FAILED)}")
            return Outcome(payload.build_id, FAILED, str(exc))
        setproctitle(f"djinn-worker: build {build.id} ({build.driver_type})")
        logs.set_build(build.id, build.driver_type)
        parts = inputs_and_outputs(build, config)
        commit = statuses.start(build, payload.host, config.providers, parts.get("cipher"),
                                on_failure=lambda: pipe.notice_failed(report.COMMIT_STATUS))
        runner = Runner(
            build,
            make_driver=lambda: session.call(
                lambda conn: make_driver(build, config, drivers, pipe, conn)),
            reporter=DatabaseReporter(session, build, config.output_limit, pipe.output),
            cancel=cancel,
            creating=lambda: _timed(timer.creating(), pipe.created),
            **parts,
        )
        try:
            return Outcome(build.id, runner.run(), statuses=commit)
        except BaseException:
            if commit:
                commit.finish(None)
            raise
    finally:
        timer.stop()
        if session.hand_back(lent):
            pipe.handed_back()


@contextmanager
def _timed(context: AbstractContextManager, seconds: Callable[[float], None]) -> Iterator[None]:
    """context, telling seconds() how long it took, however it ended."""
    start = time.monotonic()
    try:
        with context:
            yield
    finally:
        seconds(time.monotonic() - start)


def _return_big_buffers() -> None:
    """Keep glibc from holding on to freed output buffers.

    Writing a capped log makes copies of megabytes at a time. glibc raises
    its mmap threshold after the first such buffer is freed, and later ones
    then come from the heap and stay in the process's memory after use; a
    fixed threshold returns every big buffer to the system when it is freed.
    """
    try:
        ctypes.CDLL(None).mallopt(_M_MMAP_THRESHOLD, 128 * 1024)
    except (OSError, AttributeError):
        pass  # not glibc: its allocator has its own ways


def spare(config: WorkerConfig, drivers: DriverConfig, command_fd: int, report_fd: int,
          lent: db.Connection | None = None) -> int:
    """A build process made before its build, as gunicorn makes workers ahead.

    Without a lent connection it connects to PostgreSQL and warms the
    connection; it imports the enabled drivers while the supervisor waits
    for a payload, then reads the claimed build from command_fd and runs
    it: the build starts without waiting for a fork, a connection or cold
    catalog caches. End of file on command_fd means it is not needed (a lent
    connection is then left as it was). SIGTERM stays blocked until the
    build's handler is in place.
    """
    os.setsid()
    _return_big_buffers()
    setproctitle("djinn-worker: spare build process")
    conn = None
    if lent is None:
        try:
            conn = db.connect(config.database, application=db.BUILD_APPLICATION)
            db.warm(conn)
        except db.Error:
            conn = None  # the build's session connects, riding out the outage
    for kind in config.drivers:  # their libraries load here, never in the supervisor
        driver_types.load(kind)
    with os.fdopen(command_fd, "rb") as command:
        line = command.readline()
    if not line:
        if conn is not None:
            conn.close()
        return 0
    payload, claimed = report.decode_start(line)
    return main(payload, claimed, config, drivers, report_fd, conn, lent)


def main(payload: Payload, claimed: db.Claimed, config: WorkerConfig, drivers: DriverConfig,
         report_fd: int, conn: db.Connection | None = None,
         lent: db.Connection | None = None) -> int:
    """Entry point in the forked child; returns the exit status for os._exit."""
    if os.getsid(0) != os.getpid():
        os.setsid()  # forked for this build, not made ahead as a spare
        _return_big_buffers()
    setproctitle(f"djinn-worker: build {payload.build_id}")
    logs.set_build(payload.build_id)
    pipe = ReportWriter(report_fd)
    try:
        outcome = run(payload, claimed, config, drivers, pipe, conn, lent)
    except db.StopBuild as exc:
        log.error("%s; stopped without writing", exc)
        pipe.result(payload.build_id, None, str(exc),
                    stop=report.LOST if isinstance(exc, db.LostBuild) else report.UNAVAILABLE)
        return 1
    except Exception as exc:
        log.exception("build %s: the build process failed", payload.build_id)
        pipe.result(payload.build_id, None, f"{type(exc).__name__}: {exc}")
        return 1
    log.info("build %s: finished %s", outcome.build_id, outcome.status)
    pipe.result(outcome.build_id, outcome.status, outcome.error)
    if outcome.statuses:
        outcome.statuses.finish(outcome.status)
    if config.smtp.enabled and outcome.status in MAILED:
        from .notify import notify  # only builds that mail pay for the mail stack
        if not notify(config, payload, outcome.status):
            pipe.notice_failed(report.MAIL)
    return 0
