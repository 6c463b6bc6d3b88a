"""The parent process: pop builds, fork a child per build, reap, shut down.

One event loop in the manner of gunicorn's arbiter: signals arrive as bytes
on a wakeup pipe, the pending BRPOP is a socket, the kill subscription is a
socket, each child's report is a pipe, and the loop waits on all of them at
once. The supervisor pops only while it has a free slot and can claim, so a
build it cannot start at once stays in Redis for another worker.

PostgreSQL and Redis may go away at any time: every call to them here is
retried with backoff, an outage is logged once when it begins and once when
it ends, and no payload is dropped because of one.
"""

from __future__ import annotations

import gc
import logging
import os
import selectors
import signal
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable

import psycopg2
import redis
from setproctitle import setproctitle

from . import __version__, build, db, report
from .backoff import Outage
from .lending import Lender
from .metrics import POSTGRESQL, REDIS, Health, Metrics, serve
from .config import DriverConfig, WorkerConfig
from .model import FAILED, TIMED_OUT, done_line
from .queue import (
    Claim, Claims, KillChannel, Lease, Payload, PayloadError, Popper, Reply, parse_payload,
)
from .recovery import Recovery, remove_paths

log = logging.getLogger(__name__)

# How long a child may outlive its build's timeout before the parent kills it.
BACKSTOP_GRACE = 30.0
# A spare build process that died is made again after this long.
SPARE_PAUSE = 5.0
# Forking the next spare, and its start, would compete for the CPU with the
# build that took the last one, up to and including its first command: it
# waits until that build has ended, or for this long (its first job's shell
# has started within a few milliseconds).
SPARE_HOLD = 0.05
# How long a stopping supervisor waits for its spare to exit (it may be
# connecting to PostgreSQL).
SPARE_EXIT = 12.0

_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD, signal.SIGHUP)


@dataclass
class Spare:
    """A build process forked ahead, waiting for its build on command_fd."""

    pid: int
    command_fd: int
    report_fd: int
    lent: db.Connection | None


@dataclass
class Child:
    pid: int
    reader: report.ReportReader | None
    payload: Payload
    claimed: db.Claimed
    deadline: float
    lent: db.Connection | None = None  # the database connection it borrowed
    result: dict | None = None
    started: float = field(default_factory=time.monotonic)
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
        self.conn: db.Connection | None = None
        self.lender = Lender(config.database, config.slots + 1)
        self.popper = Popper(config.redis, config.queues)
        client = self.popper.client
        self.claims = Claims(client, config.identity)
        self.lease = Lease(client, config.identity, config.lease_ttl)
        self.kills = KillChannel(config.redis)
        self.recovery = Recovery(client, config.identity, config.queue, self._db, self._recovered)
        self.metrics = Metrics(config.metrics.enabled)
        # Healthy: both servers answered within two ticks, and the loop turned.
        self.health = Health(2 * self._tick_interval(), self.metrics)
        self.http = None  # serving /metrics and /healthz, with [metrics]
        self.database = Outage(f"the database at {config.database.addr}", POSTGRESQL, self.health)
        self.redis = Outage(f"redis at {config.redis.addr}", REDIS, self.health)
        # Payloads popped but neither claimed nor put back while a server was away.
        self.unclaimed: list[tuple[str, bytes]] = []
        # Builds whose claim failed with no answer, and so may have gone through.
        self.unanswered: set[int] = set()
        self.pop_at = 0.0  # popping waits for an outage's backoff
        self.kills_at: float | None = 0.0  # when to (re)connect the kill subscription
        self.tick_at = 0.0  # lease refresh and recovery
        self.spare: Spare | None = None
        self.spare_at = 0.0  # a spare that died is made again after a pause
        self._pop_fd: int | None = None
        self._kills_sock = None
        self._kills_fd = -1
        self._wake_r, self._wake_w = os.pipe()

    # -- start and stop -------------------------------------------------

    def run(self) -> int:
        """Serve until told to stop; the exit status for the process.

        Raises LeaseHeld while another live worker has this identity.
        """
        self._install_signals()
        self.metrics.slots.set(self.config.slots)
        self._title()
        self._connection()
        self.popper.client.ping()
        note = self.lease.acquire()
        if note:
            log.info("%s", note)
        self._tick()
        cleaner = self._remove_docker_leftovers()
        if cleaner:
            os.waitpid(cleaner, 0)
        log.info(
            "djinn-worker %s started (pid %d) as %s: popping %s; drivers %s; %d build(s) at once; "
            "timeout %gs", __version__, os.getpid(), self.config.identity,
            ", ".join(self.config.queues), ", ".join(self.config.drivers), self.config.slots,
            self.config.timeout,
        )
        if self.config.metrics.enabled:
            self.http = serve(self.config.metrics.address, self.metrics, self.health)
        if self.on_ready:
            self.on_ready()
        # What every build process shares is made before any fork and kept
        # out of the collector's reach, so that children do not copy it.
        # tempfile finds its directory by writing a file there: once, here,
        # rather than at the start of every build.
        tempfile.gettempdir()
        gc.collect()
        gc.freeze()
        while not (self.stopping and not self.children and not self.popper.pending):
            self.health.turned()
            self._make_spare()
            self._pop_if_free()
            self._watch_kills()
            for key, _ in self.selector.select(self._wait_time()):
                key.data()
            self._reap()
            self._enforce_deadlines()
            if time.monotonic() >= self.tick_at:
                self._tick()
        self._close()
        if self.http is not None:
            self.http.shutdown()
            self.http.server_close()
        log.info("djinn-worker stopped")
        return 0

    def _close(self) -> None:
        spare = self.spare
        self._drop_spare()
        if spare is not None:
            _reap_within(spare.pid, SPARE_EXIT)
        self.kills.close()
        try:
            for queue, raw in self.unclaimed:
                self.popper.requeue(queue, raw)
            self.lease.release()
        except redis.RedisError as exc:
            log.error("redis at %s: %s; the lease expires by itself in %gs",
                      self.config.redis.addr, exc, self.config.lease_ttl)
        self.popper.close()
        self.lender.close()
        if self.conn is not None:
            self.conn.close()

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
                # The spare still writes to the old file: make a new one.
                self._drop_spare()

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

    # -- the servers ------------------------------------------------------

    def _db(self, work: Callable[[db.Connection], object], conn: db.Connection | None = None):
        """Do work on conn, by default the supervisor's connection (connecting
        first if there is none).

        A connection that failed is closed, so the next call connects anew.
        """
        conn = conn if conn is not None else self._connection()
        try:
            result = work(conn)
        except (psycopg2.OperationalError, psycopg2.InterfaceError):
            conn.close()
            self.lender.drop_idle()
            raise
        self.database.ok()
        return result

    def _connection(self) -> db.Connection:
        if self.conn is None or self.conn.closed:
            conn = db.connect(self.config.database, application="djinn-worker")
            try:
                db.prepare(conn)
            except psycopg2.Error:
                conn.close()
                raise
            self.conn = conn
        return self.conn

    def _tick(self) -> None:
        """Refresh the lease, hear from PostgreSQL even when no build comes
        (for /healthz), and settle the builds of workers that are gone."""
        self.tick_at = time.monotonic() + self._tick_interval()
        try:
            self._db(db.ping)
            self.lender.fill()
        except psycopg2.Error as exc:
            self.database.failed(exc, "orphaned builds are settled once it is back")
        try:
            if not self.lease.refresh():
                log.error("the lease of %s had expired and was taken meanwhile",
                          self.config.identity)
            self.health.leased()
            self.redis.ok()
            self.recovery.run({c.build_id for c in self.children.values()})
        except redis.RedisError as exc:
            self.redis.failed(exc, "the lease is not refreshed")
        except psycopg2.Error as exc:
            self.database.failed(exc, "orphaned builds are settled once it is back")

    def _tick_interval(self) -> float:
        return self.config.lease_ttl / 3

    def _recovered(self, claim: Claim, outcome: str) -> None:
        self.metrics.orphans.labels(outcome).inc()
        if outcome == FAILED:
            self._notify_in_background(claim.payload, outcome)

    # -- popping ----------------------------------------------------------

    def _pop_if_free(self) -> None:
        if (self.stopping or self.popper.pending or time.monotonic() < self.pop_at
                or self._running() >= self.config.slots):
            return
        if self.unclaimed:
            self._take(*self.unclaimed.pop(0))
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
        self._forget_pop()
        self.pop_at = time.monotonic() + self.redis.failed(exc, "no builds are popped")

    def _on_pop(self) -> None:
        self._unwatch_pop()
        try:
            popped = self.popper.read()
        except redis.RedisError as exc:
            self._redis_failed(exc)
            return
        self.redis.ok()
        if popped is None:
            return
        queue, raw = popped
        if self.stopping:
            self._put_back(queue, raw)
            log.info("put a payload popped while stopping back on %s", queue)
            return
        self._take(queue, raw)

    def _take(self, queue: str, raw: bytes) -> None:
        """Claim a popped payload and start its build, or put it back."""
        try:
            payload = parse_payload(raw)
        except PayloadError as exc:
            log.error("dropped payload %r from %s: %s", raw[:200], queue, exc)
            self.metrics.payloads_dropped.labels("unreadable").inc()
            return
        noted = self._note(payload, queue)
        try:
            claimed = self._claim(payload.build_id)
        except db.ClaimRefused as exc:
            log.error("dropped build %d from %s: %s", payload.build_id, queue, exc)
            self.metrics.payloads_dropped.labels("not_queued").inc()
            if payload.build_id in self.unanswered:
                self.unanswered.discard(payload.build_id)
                self._wait_note(payload, noted)
                log.error("build %d: an earlier claim of this worker may have gone through "
                          "unanswered; left noted, for recovery to settle", payload.build_id)
            else:
                self._forget_note(payload, noted)
            return
        except psycopg2.Error as exc:
            self.pop_at = time.monotonic() + self.database.failed(
                exc, "popped builds are put back and no more are popped")
            self._put_back(queue, raw)
            # The server may have committed the claim before the answer was
            # lost: the note stays, so recovery settles the build if so.
            self.unanswered.add(payload.build_id)
            self._wait_note(payload, noted)
            return
        self.unanswered.discard(payload.build_id)
        self._wait_note(payload, noted)
        self.metrics.started.labels(claimed.driver).inc()
        self.metrics.queue_wait.observe(claimed.waited)
        self._start(payload, claimed)

    def _claim(self, build_id: int) -> db.Claimed:
        """Claim on the spare's lent connection, if it has one, rather than
        on the supervisor's own: the build's first statements, on the same
        session, then find its backend awake and its caches warm. The spare
        does not touch the connection until it is given the build."""
        lent = self.spare.lent if self.spare else None
        try:
            return self._db(lambda conn: db.claim(conn, build_id), lent)
        except (psycopg2.OperationalError, psycopg2.InterfaceError):
            if lent is not None:
                self._drop_spare(died=True)  # its connection is as broken for it
            raise

    def _note(self, payload: Payload, queue: str) -> Reply | None:
        """Note the build for recovery, its answer read once it is claimed."""
        try:
            return self.claims.add(payload, queue)
        except redis.RedisError as exc:
            log.error("build %d: not noted for recovery after a crash: %s", payload.build_id, exc)
            return None

    def _wait_note(self, payload: Payload, noted: Reply | None) -> None:
        if noted is not None:
            try:
                noted.wait()
            except redis.RedisError as exc:
                log.error("build %d: not noted for recovery after a crash: %s",
                          payload.build_id, exc)

    def _forget_note(self, payload: Payload, noted: Reply | None) -> None:
        """The build was not claimed after all."""
        if noted is not None:
            try:
                noted.wait()
            except redis.RedisError:
                pass  # dropped below all the same
        self._drop_claim(payload.build_id)

    def _put_back(self, queue: str, raw: bytes) -> None:
        try:
            self.popper.requeue(queue, raw)
        except redis.RedisError as exc:
            self.redis.failed(exc, "a popped payload is held until it is back")
            self.unclaimed.append((queue, raw))

    # -- kills ------------------------------------------------------------

    def _kills_broken(self, exc: Exception) -> None:
        self.kills.close()
        self.kills_at = time.monotonic() + self.redis.failed(exc, "kills are not received")

    def _watch_kills(self) -> None:
        """Keep the loop watching the kill subscription's socket, reconnecting it if due."""
        if self.kills_at is not None and time.monotonic() >= self.kills_at:
            try:
                self.kills.connect()
                self.kills_at = None
                self.redis.ok()
            except redis.RedisError as exc:
                self._kills_broken(exc)
        sock = self.kills.socket()
        if sock is not self._kills_sock:
            if self._kills_sock is not None:
                self.selector.unregister(self._kills_fd)
            if sock is not None:
                self._kills_fd = sock.fileno()
                self.selector.register(self._kills_fd, selectors.EVENT_READ, self._on_kills)
            self._kills_sock = sock

    def _on_kills(self) -> None:
        try:
            messages = self.kills.read()
        except redis.RedisError as exc:
            self._kills_broken(exc)
            return
        running = {c.build_id: c for c in self.children.values()}
        for build_id, data in messages:
            child = running.get(build_id)
            if child is None:
                continue  # another worker's build, or one that is over
            if child.claimed.secret and data.decode(errors="replace") == child.claimed.secret:
                log.info("build %d: kill requested", build_id)
                self.metrics.kills.inc()
                _signal(child.pid, signal.SIGTERM)
            else:
                log.info("build %d: ignored a kill message that is not the build's secret", build_id)

    # -- children ---------------------------------------------------------

    def _fork(self, work: Callable[[], int], lent: db.Connection | None) -> int:
        """Fork a build process that runs work() with the connection lent to
        it; SIGTERM (a kill) stays blocked in it until its build's handler
        is in place."""
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                self._become_child(lent)
                code = work()
            except BaseException:
                log.exception("a build process failed to start")
            finally:
                os._exit(code)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        return pid

    def _make_spare(self) -> None:
        if self.spare is not None or self.stopping or time.monotonic() < self.spare_at:
            return
        if self._spare_held_until() > time.monotonic():
            return
        command_r, command_w = os.pipe()
        report_r, report_w = os.pipe()
        lent = self.lender.lend()

        def spare() -> int:
            os.close(command_w)
            os.close(report_r)
            return build.spare(self.config, self.drivers, command_r, report_w, lent)

        pid = self._fork(spare, lent)
        os.close(command_r)
        os.close(report_w)
        self.spare = Spare(pid, command_w, report_r, lent)

    def _spare_held_until(self) -> float:
        """Until when the next spare waits for a starting build (0: no wait)."""
        return max((c.started + SPARE_HOLD for c in self.children.values()
                    if c.result is None), default=0.0)

    def _drop_spare(self, died: bool = False) -> None:
        """Let the spare go: end of file on its command pipe, and it exits
        without touching its lent connection (unless it died)."""
        if self.spare is not None:
            os.close(self.spare.command_fd)
            os.close(self.spare.report_fd)
            self.lender.returned(self.spare.lent, reusable=not died)
            self.spare = None

    def _start(self, payload: Payload, claimed: db.Claimed) -> None:
        """Hand the claimed build to the spare build process, or fork one for it."""
        spare, self.spare = self.spare, None
        if spare is not None:
            command_fd = spare.command_fd
            try:
                os.write(spare.command_fd, report.encode_start(payload, claimed))
            except BrokenPipeError:  # it died: reaped as a stranger
                os.close(spare.report_fd)
                self.lender.returned(spare.lent, reusable=False)
                spare = None
            finally:
                os.close(command_fd)
        if spare is None:
            read_fd, write_fd = os.pipe()
            lent = self.lender.lend()
            pid = self._fork(lambda: build.main(payload, claimed, self.config, self.drivers,
                                                write_fd, lent=lent), lent)
            os.close(write_fd)
        else:
            pid, read_fd, lent = spare.pid, spare.report_fd, spare.lent
        # Short timeouts get a grace as long as the timeout (at least 5 s).
        grace = min(BACKSTOP_GRACE, max(self.config.timeout, 5.0))
        child = Child(pid, report.ReportReader(read_fd), payload, claimed,
                      deadline=time.monotonic() + self.config.timeout + grace, lent=lent)
        self.children[pid] = child
        self.selector.register(read_fd, selectors.EVENT_READ, lambda: self._read_report(child))
        log.info("build %d: started in process %d", payload.build_id, pid)
        self._title()

    def _become_child(self, lent: db.Connection | None = None) -> None:
        """Drop what belongs to the parent without disturbing it.

        Sockets are closed, never shut down, so the parent's connections to
        Redis and PostgreSQL stay intact (the PostgreSQL connection objects
        are simply never touched: the child leaves through os._exit). Of the
        connections the lender holds, only the one lent to this child stays.
        """
        signal.set_wakeup_fd(-1)
        for sig in _SIGNALS:
            signal.signal(sig, signal.SIG_DFL)
        fds = [self._wake_r, self._wake_w, self.popper.fileno(), self.kills.fileno()]
        fds += self.lender.fds(keep=lent)
        if self.http is not None:
            fds.append(self.http.fileno())
        fds += [c.reader.fd for c in self.children.values() if c.reader]
        if self.spare is not None:
            fds += [self.spare.command_fd, self.spare.report_fd]
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
            if child.result.get("status"):
                self._count_finished(child, child.result["status"])
            self._title()
        elif message.kind == report.HANDED_BACK:
            self._take_back(child, reusable=True)
        elif message.kind in report.FIGURES:
            self._count(child, message)
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
            if self.spare is not None and pid == self.spare.pid:
                log.error("the spare build process %d %s; making another in %gs", pid,
                          describe_exit(status), SPARE_PAUSE)
                self._drop_spare(died=True)
                self.spare_at = time.monotonic() + SPARE_PAUSE
                continue
            child = self.children.pop(pid, None)
            if child is None:
                continue
            if child.reader is not None:
                self._read_report(child)
                self._close_report(child)
            # Not handed back: closing it ends the session (and the lock) at
            # the server, if the build process left it alive.
            self._take_back(child, reusable=False)
            if self._finished(child, status):
                self._drop_claim(child.build_id)
            self._title()

    def _take_back(self, child: Child, reusable: bool) -> None:
        self.lender.returned(child.lent, reusable)
        child.lent = None

    def _drop_claim(self, build_id: int) -> None:
        try:
            self.claims.remove(build_id)
        except redis.RedisError as exc:
            log.error("build %d: still noted for recovery: %s", build_id, exc)

    def _finished(self, child: Child, status: int) -> bool:
        """Settle a build whose process ended; False to leave it to recovery.

        A build left unsettled stays noted in Redis, and the next recovery
        pass runs it again (or fails it) once the database is back.
        """
        result = child.result or {}
        if result.get("status"):
            log.debug("build %d: process %d %s", child.build_id, child.pid, describe_exit(status))
            return True
        self._clean_up_after(child)
        if result.get("stop") == report.LOST:
            log.error("build %d: %s; left to the process that runs it now",
                      child.build_id, result.get("error"))
            return True
        if result.get("stop") == report.UNAVAILABLE:
            log.error("build %d: %s; settled once the database is back", child.build_id,
                      result.get("error"))
            return False
        how = result.get("error") or describe_exit(status)
        final = TIMED_OUT if child.backstopped else FAILED
        line = f"\nThe build process died: {how}\n{done_line(final)}"
        try:
            self._db(lambda conn: db.abandon_build(conn, child.build_id, final, line))
        except psycopg2.Error as exc:
            self.database.failed(exc, f"build {child.build_id}, whose process died, is settled "
                                 "once it is back")
            return False
        log.error("build %d: %s; marked %s", child.build_id, how, final)
        self._count_finished(child, final)
        self._notify_in_background(child.payload, final)
        return True

    def _notify_in_background(self, payload: Payload, status: str) -> None:
        """The final commit status and failure mail of a build whose own
        process could not send them."""
        if self.config.smtp.enabled or self.config.providers:
            def notices() -> None:
                from . import notify
                notify.commit_status(self.config, payload, status)
                notify.notify(self.config, payload, status)

            self._in_background(f"notices for build {payload.build_id}", notices)

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
        remove_paths(child.build_id, child.paths)
        self._remove_docker_leftovers(child.build_id)

    @staticmethod
    def _kill_groups(child: Child) -> None:
        """The build process's own group and every job group it reported."""
        for pgid in [child.pid] + child.pgids:
            _signal(-pgid, signal.SIGKILL)

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

    def _count(self, child: Child, message: report.Message) -> None:
        """What only the build process knows, counted for /metrics."""
        metrics, driver, data = self.metrics, child.claimed.driver, message.data
        if message.kind == report.CREATED:
            metrics.create.labels(driver).observe(float(data["seconds"]))
        elif message.kind == report.OUTPUT:
            metrics.output_stored.labels(driver).inc(int(data["stored"]))
            metrics.output_dropped.labels(driver).inc(int(data["dropped"]))
        elif message.kind == report.NOTICE_FAILED:
            metrics.notices_failed.labels(str(data["notice"])).inc()
        elif data.get("event") == "reconnect":
            metrics.reconnects.labels(POSTGRESQL).inc()
        else:
            metrics.errors.labels(POSTGRESQL).inc()

    def _count_finished(self, child: Child, status: str) -> None:
        driver = child.claimed.driver
        self.metrics.finished.labels(driver, status).inc()
        self.metrics.duration.labels(driver, status).observe(time.monotonic() - child.started)

    def _running(self) -> int:
        """Builds that hold a slot: a process that has reported its result
        only sends notices (commit status, mail) before it exits."""
        return sum(1 for child in self.children.values() if child.result is None)

    def _title(self) -> None:
        """What ps shows for the supervisor: its queue and how busy it is."""
        running = self._running()
        self.metrics.running.set(running)
        setproctitle(f"djinn-worker: supervisor ({self.config.queue}, "
                     f"{running}/{self.config.slots} running)")

    def _wait_time(self) -> float:
        times = [c.deadline for c in self.children.values()
                 if c.result is None and not c.backstopped]
        times.append(self.tick_at)
        if self.spare is None and not self.stopping:
            times.append(max(self._spare_held_until(), self.spare_at))
        if self.kills_at is not None:
            times.append(self.kills_at)
        now = time.monotonic()
        if not self.popper.pending and not self.stopping and self.pop_at > now:
            times.append(self.pop_at)
        return max(min(times) - now, 0)


def _reap_within(pid: int, seconds: float) -> None:
    """Wait for a child to exit, for at most seconds; killed after that."""
    deadline = time.monotonic() + seconds
    while os.waitpid(pid, os.WNOHANG) == (0, 0):
        if time.monotonic() > deadline:
            _signal(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return
        time.sleep(0.01)


def _signal(pid: int, sig: int) -> None:
    """Send sig to a process (pid > 0) or process group (pid < 0) that may be gone."""
    try:
        if pid < 0:
            os.killpg(-pid, sig)
        else:
            os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass
