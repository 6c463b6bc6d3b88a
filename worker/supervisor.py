"""The parent process: pop builds, fork a child per build, reap, shut down.

One event loop in the manner of gunicorn's arbiter: signals arrive as bytes
on a wakeup pipe, the pending BRPOP is a socket, each child's report is a
pipe, and the loop waits on all of them at once. The supervisor pops only
while it has a free slot, so a build it cannot start at once stays in Redis
for another worker.
"""

from __future__ import annotations

import logging
import os
import selectors
import shutil
import signal
import time
from dataclasses import dataclass, field
from typing import Callable

import psycopg2
import redis
from setproctitle import setproctitle

from . import __version__, build, db, report
from .config import DriverConfig, WorkerConfig
from .model import FAILED, RUNNING, TIMED_OUT, done_line
from .queue import Claims, Payload, PayloadError, Popper, parse_payload

log = logging.getLogger(__name__)

# How long a child may outlive its build's timeout before the parent kills it.
BACKSTOP_GRACE = 30.0
# Wait this long before asking Redis or PostgreSQL again after a failure.
RETRY_DELAY = 5.0

_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD, signal.SIGHUP)


@dataclass
class Child:
    pid: int
    reader: report.ReportReader | None
    payload: Payload
    deadline: float
    result: dict | None = None
    pgids: list[int] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)
    backstopped: bool = False

    @property
    def build_id(self) -> int:
        return self.payload.build_id


def describe_exit(status: int) -> str:
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        return f"killed by signal {sig} ({signal.Signals(sig).name})"
    return f"exited with status {os.waitstatus_to_exitcode(status)}"


class Supervisor:
    def __init__(self, config: WorkerConfig, drivers: DriverConfig,
                 on_hangup: Callable[[], None] | None = None,
                 on_ready: Callable[[], None] | None = None):
        # on_ready runs once PostgreSQL and Redis have answered: a daemon's
        # starting command waits for it to know the start worked.
        self.config, self.drivers = config, drivers
        self.on_hangup, self.on_ready = on_hangup, on_ready
        self.children: dict[int, Child] = {}
        self.selector = selectors.DefaultSelector()
        self.stopping = False
        self.killing = False
        self.retry_at = 0.0
        self.conn: db.Connection | None = None
        self.popper = Popper(config.redis, config.queues)
        self.claims = Claims(self.popper.client, config.identity)
        self._pop_fd: int | None = None
        self._wake_r, self._wake_w = os.pipe()

    # -- start and stop -------------------------------------------------

    def run(self) -> int:
        """Serve until told to stop; the exit status for the process."""
        self._install_signals()
        self._title()
        self._connection()
        self.popper.client.ping()
        self._recover()
        cleaner = self._remove_docker_leftovers()
        if cleaner:
            os.waitpid(cleaner, 0)
        log.info(
            "djinn-worker %s started (pid %d): popping %s; drivers %s; %d build(s) at once; timeout %gs",
            __version__, os.getpid(), ", ".join(self.config.queues),
            ", ".join(self.config.drivers), self.config.slots, self.config.timeout,
        )
        if self.on_ready:
            self.on_ready()
        while not (self.stopping and not self.children and not self.popper.pending):
            self._pop_if_free()
            for key, _ in self.selector.select(self._wait_time()):
                key.data()
            self._reap()
            self._enforce_deadlines()
        self.popper.close()
        if self.conn is not None:
            self.conn.close()
        log.info("djinn-worker stopped")
        return 0

    def _install_signals(self) -> None:
        os.set_blocking(self._wake_w, False)
        os.set_blocking(self._wake_r, False)
        signal.set_wakeup_fd(self._wake_w)
        for sig in _SIGNALS:
            signal.signal(sig, lambda *_: None)
        self.selector.register(self._wake_r, selectors.EVENT_READ, self._on_signals)

    def _on_signals(self) -> None:
        try:
            data = os.read(self._wake_r, 512)
        except BlockingIOError:
            return
        for signum in data:
            if signum in (signal.SIGTERM, signal.SIGINT):
                self._shutdown(signal.Signals(signum).name)
            elif signum == signal.SIGHUP and self.on_hangup:
                # Said before the reopen, so it ends the rotated file.
                log.info("received SIGHUP: reopening the log file")
                self.on_hangup()

    def _shutdown(self, name: str) -> None:
        if not self.stopping:
            self.stopping = True
            log.info(
                "received %s: no more builds will be popped; waiting for %d running build(s) "
                "(send it again to kill them)", name, len(self.children),
            )
            try:
                self.popper.unblock()
            except redis.RedisError as exc:
                log.error("could not cancel the pending pop: %s", exc)
                self._forget_pop()
        elif not self.killing:
            self.killing = True
            log.info("received %s again: killing %d running build(s)", name, len(self.children))
            for child in self.children.values():
                _signal(child.pid, signal.SIGTERM)

    # -- popping ----------------------------------------------------------

    def _pop_if_free(self) -> None:
        if (self.stopping or self.popper.pending or time.monotonic() < self.retry_at
                or len(self.children) >= self.config.slots):
            return
        try:
            self.popper.start()
        except redis.RedisError as exc:
            self._redis_failed(exc)
            return
        self._pop_fd = self.popper.fileno()
        self.selector.register(self._pop_fd, selectors.EVENT_READ, self._on_pop)

    def _unwatch_pop(self) -> None:
        if self._pop_fd is not None:
            self.selector.unregister(self._pop_fd)
            self._pop_fd = None

    def _forget_pop(self) -> None:
        self._unwatch_pop()
        self.popper.reset()

    def _redis_failed(self, exc: Exception) -> None:
        log.error("redis at %s: %s; retrying in %gs", self.config.redis.addr, exc, RETRY_DELAY)
        self._forget_pop()
        self.retry_at = time.monotonic() + RETRY_DELAY

    def _on_pop(self) -> None:
        self._unwatch_pop()
        try:
            popped = self.popper.read()
        except redis.RedisError as exc:
            self._redis_failed(exc)
            return
        if popped is None:
            return
        queue, raw = popped
        if self.stopping:
            self.popper.requeue(queue, raw)
            log.info("put a payload popped while stopping back on %s", queue)
            return
        try:
            payload = parse_payload(raw)
        except PayloadError as exc:
            log.error("dropped payload %r from %s: %s", raw[:200], queue, exc)
            return
        try:
            refusal = self._claim(payload.build_id)
        except psycopg2.Error as exc:
            log.error("database at %s: %s; build %d put back on %s, retrying in %gs",
                      self.config.database.addr, str(exc).strip(), payload.build_id, queue, RETRY_DELAY)
            self.popper.requeue(queue, raw)
            self.retry_at = time.monotonic() + RETRY_DELAY
            return
        if refusal:
            log.error("dropped build %d from %s: %s", payload.build_id, queue, refusal)
            return
        try:
            self.claims.add(payload)
        except redis.RedisError as exc:
            log.error("build %d: not noted for recovery after a crash: %s", payload.build_id, exc)
        self._fork(payload)

    def _recover(self) -> None:
        """Fail the builds an earlier start of this worker claimed that nobody runs now.

        A build process that outlived its supervisor still holds its build's
        lock and finishes the build itself; only builds whose processes are
        gone too (a reboot, the OOM killer) are failed here.
        """
        line = f"\nThe worker stopped while this build was running\n{done_line(FAILED)}"
        for payload in self.claims.payloads():
            outcome = self._db(lambda conn: db.abandon_orphan(conn, payload.build_id, line))
            if outcome == RUNNING:
                log.info("build %d: still run by a process of an earlier start; left to it",
                         payload.build_id)
                continue
            if outcome == FAILED:
                log.error("build %d: left running by an earlier start of this worker; marked failed",
                          payload.build_id)
                self._remove_paths(payload.build_id, self.claims.paths(payload.build_id))
                self._mail_in_background(payload, FAILED)
            self._drop_claim(payload.build_id)

    def _claim(self, build_id: int) -> str | None:
        return self._db(lambda conn: db.claim(conn, build_id))

    def _db(self, work: Callable[[db.Connection], object]):
        """Do work on the supervisor's connection, connecting first if there is none.

        A connection that failed is closed, so the next call connects anew.
        """
        conn = self._connection()
        try:
            return work(conn)
        except (psycopg2.OperationalError, psycopg2.InterfaceError):
            conn.close()
            raise

    def _connection(self) -> db.Connection:
        if self.conn is None or self.conn.closed:
            self.conn = db.connect(self.config.database, application="djinn-worker")
        return self.conn

    # -- children ---------------------------------------------------------

    def _fork(self, payload: Payload) -> None:
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                os.close(read_fd)
                self._become_child()
                code = build.main(payload, self.config, self.drivers, write_fd)
            finally:
                os._exit(code)
        os.close(write_fd)
        # Short timeouts get a grace as long as the timeout (at least 5 s).
        grace = min(BACKSTOP_GRACE, max(self.config.timeout, 5.0))
        child = Child(pid, report.ReportReader(read_fd), payload,
                      deadline=time.monotonic() + self.config.timeout + grace)
        self.children[pid] = child
        self.selector.register(read_fd, selectors.EVENT_READ, lambda: self._read_report(child))
        log.info("build %d: started in process %d", payload.build_id, pid)
        self._title()

    def _become_child(self) -> None:
        """Drop what belongs to the parent without disturbing it.

        Sockets are closed, never shut down, so the parent's connections to
        Redis and PostgreSQL stay intact (the PostgreSQL connection object is
        simply never touched: the child leaves through os._exit).
        """
        signal.set_wakeup_fd(-1)
        for sig in _SIGNALS:
            signal.signal(sig, signal.SIG_DFL)
        fds = [self._wake_r, self._wake_w, self.popper.fileno()]
        fds += [c.reader.fd for c in self.children.values() if c.reader]
        self.selector.close()
        for fd in fds:
            if fd >= 0:
                os.close(fd)

    def _read_report(self, child: Child) -> None:
        messages, closed = child.reader.read()
        for message in messages:
            self._on_message(child, message)
        if closed:
            self._close_report(child)

    def _on_message(self, child: Child, message: report.Message) -> None:
        if message.kind == report.PROCESS_GROUP:
            child.pgids.append(int(message.data["pgid"]))
        elif message.kind == report.PATH:
            child.paths.append(str(message.data["path"]))
            try:
                self.claims.add_path(child.build_id, child.paths[-1])
            except redis.RedisError as exc:
                log.error("build %d: %s not noted for removal after a crash: %s",
                          child.build_id, child.paths[-1], exc)
        elif message.kind == report.RESULT:
            child.result = message.data
        else:
            log.error("build %d: unreadable report %r", child.build_id, message.data)

    def _close_report(self, child: Child) -> None:
        if child.reader is not None:
            self.selector.unregister(child.reader.fd)
            child.reader.close()
            child.reader = None

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            child = self.children.pop(pid, None)
            if child is None:
                continue
            if child.reader is not None:
                self._read_report(child)
                self._close_report(child)
            if self._finished(child, status):
                self._drop_claim(child.build_id)
            self._title()

    def _drop_claim(self, build_id: int) -> None:
        try:
            self.claims.remove(build_id)
        except redis.RedisError as exc:
            log.error("build %d: still noted for recovery: %s", build_id, exc)

    def _finished(self, child: Child, status: int) -> bool:
        """Settle a build whose process ended; False if its end could not be recorded.

        A build left unrecorded stays noted in Redis, so the next start of the
        worker fails it rather than leaving it running for good.
        """
        result = child.result or {}
        if result.get("status"):
            log.debug("build %d: process %d %s", child.build_id, child.pid, describe_exit(status))
            return True
        how = result.get("error") or describe_exit(status)
        final = TIMED_OUT if child.backstopped else FAILED
        self._clean_up_after(child)
        line = f"\nThe build process died: {how}\n{done_line(final)}"
        try:
            self._db(lambda conn: db.abandon_build(conn, child.build_id, final, line))
        except psycopg2.Error as exc:
            log.error("build %d: could not record that its process died (%s); the next start "
                      "of the worker will", child.build_id, str(exc).strip())
            return False
        log.error("build %d: %s; marked %s", child.build_id, how, final)
        self._mail_in_background(child.payload, final)
        return True

    def _mail_in_background(self, payload: Payload, status: str) -> None:
        """Failure mail for a build whose own process could not send it."""
        if self.config.smtp.enabled:
            def mail() -> None:
                from .notify import notify
                notify(self.config, payload, status)

            self._in_background(f"mail for build {payload.build_id}", mail)

    def _in_background(self, what: str, work: Callable[[], None]) -> int:
        """Run slow clean-up work (SMTP, the docker engine) in a short-lived fork.

        The event loop never waits on another server this way, and libraries
        only that work needs are never imported into the supervisor. The
        reaper ignores the process like any stranger.
        """
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                self._become_child()
                setproctitle(f"djinn-worker: {what}")
                work()
                code = 0
            finally:
                os._exit(code)
        return pid

    def _clean_up_after(self, child: Child) -> None:
        """Remove what a child that died left: its jobs' processes, files and containers."""
        self._kill_groups(child)
        self._remove_paths(child.build_id, child.paths)
        self._remove_docker_leftovers(child.build_id)

    @staticmethod
    def _kill_groups(child: Child) -> None:
        """The build process's own group and every job group it reported."""
        for pgid in [child.pid] + child.pgids:
            _signal(-pgid, signal.SIGKILL)

    @staticmethod
    def _remove_paths(build_id: int, paths: list[str]) -> None:
        for path in paths:
            shutil.rmtree(path, ignore_errors=True)
            log.info("build %d: removed %s", build_id, path)

    def _remove_docker_leftovers(self, build_id: int | None = None) -> int | None:
        """Containers and volumes of one dead build, or at start of every earlier one.

        Returns the pid of the process removing them, None without docker.
        """
        if "docker" not in self.config.drivers:
            return None
        engine = self.drivers.docker

        def remove() -> None:
            from djinn_worker.drivers.docker import remove_leftovers
            remove_leftovers(engine, build_id)

        return self._in_background("docker clean-up", remove)

    def _enforce_deadlines(self) -> None:
        now = time.monotonic()
        for child in self.children.values():
            if child.result is None and not child.backstopped and now >= child.deadline:
                child.backstopped = True
                log.error("build %d: process %d is still running past the timeout; killing it",
                          child.build_id, child.pid)
                self._kill_groups(child)

    def _title(self) -> None:
        """What ps shows for the supervisor: its queue and how busy it is."""
        setproctitle(f"djinn-worker: supervisor ({self.config.queue}, "
                     f"{len(self.children)}/{self.config.slots} running)")

    def _wait_time(self) -> float | None:
        times = [c.deadline for c in self.children.values()
                 if c.result is None and not c.backstopped]
        now = time.monotonic()
        if not self.popper.pending and not self.stopping and self.retry_at > now:
            times.append(self.retry_at)
        if not times:
            return None
        return max(min(times) - now, 0)


def _signal(pid: int, sig: int) -> None:
    """Send sig to a process (pid > 0) or process group (pid < 0) that may be gone."""
    try:
        if pid < 0:
            os.killpg(-pid, sig)
        else:
            os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass
