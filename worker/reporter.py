"""What the runner reports, written into the database by the build process.

Output is kept in two CappedLogs, the build log and the running job's, so
memory is bounded by output_limit whatever a job prints; the reading thread
only appends to them, and a writer thread sends what is new. Every UPDATE
of `output = output || new` rewrites the whole stored value, so the writer
waits until the new text is a fair share of what is stored (or until it has
waited LIVE seconds): the bytes PostgreSQL rewrites stay a small multiple of
what it stores. Once a log is capped, its head is stored once and what
follows it (the marker line and the tail) is rewritten every TAIL_REFRESH
seconds and once more when the job ends.

A write that fails is not confirmed, so the same text goes again with the
next one: nothing is lost while the database is away, only delayed (the
session reconnects; the job waits on its pipe meanwhile).
"""

from __future__ import annotations

import logging
import _thread
import threading
import time
from typing import Callable

from . import db
from .model import CREATE_JOB, Artifact, Build, Job, Object, Stage
from .output import CappedLog, Write

log = logging.getLogger(__name__)

# New output reaches the database at most this long after it was printed.
LIVE = 0.5
# Sooner than LIVE once the new text is this share of what is stored.
SHARE = 0.5
# Below this much new text, only LIVE sends it.
BATCH = 256 * 1024
# How often the tail of a capped log is rewritten while the job runs.
TAIL_REFRESH = 5.0
# How often the writer looks at what is pending.
TICK = 0.1
# Reading waits while more than this (or SHARE of what is stored) is held
# for the database: the head of a log, or all of an uncapped one.
BACKLOG = 1024 * 1024


class _Column:
    """One output column and what of it the database has."""

    def __init__(self, limit: int, table: str, row_id: int):
        self.log = CappedLog(limit)
        self.table, self.row_id = table, row_id
        self.since = 0.0  # when the oldest text not yet written arrived
        self.replaced = 0.0  # when the whole value was last rewritten

    def due(self, now: float, final: bool) -> Write | None:
        """The write to make now, if any; making one copies the text, so ask first."""
        if not final and self.log.unwritten():
            pending = self.log.pending_head()
            if not pending:
                if now - self.replaced < TAIL_REFRESH:
                    return None
            elif pending < max(BATCH, SHARE * self.log.stored()) and now - self.since < LIVE:
                return None
        return self.log.next_write()

    def behind(self) -> bool:
        """Holding more unwritten text than the writer sends at once: the
        reader waits, which keeps memory and database work bounded."""
        return self.log.pending_head() > max(BACKLOG, SHARE * self.log.stored())

    def append(self, text: str, now: float) -> None:
        if not self.log.unwritten():
            self.since = now
        self.log.append(text)

    def confirm(self, write: Write | None, now: float) -> None:
        if write is not None:
            self.log.written(write)
            self.since = now
            if write.kind == "tail":
                self.replaced = now


class DatabaseReporter:
    def __init__(self, session: db.Session, build: Build, limit: int,
                 on_job_output: Callable[[int, int], None] = lambda stored, dropped: None):
        self.session, self.build, self.limit = session, build, limit
        # Told each finished job's bytes of output stored and left out.
        self.on_job_output = on_job_output
        self._build = _Column(limit, "builds", build.id)
        self._job: _Column | None = None
        # The last job's column until all its text is written: its end goes
        # in the background, with the next job's start.
        self._closing: _Column | None = None
        self._cond = threading.Condition()
        # One writer on the connection at a time, in the order of events.
        self._db = threading.Lock()
        # Status changes wait here to go with the next write (the writer's,
        # within a tick, or at a job's end, which wakes it): one round trip
        # for all that happened together.
        self._queued: list[db.Statement] = []
        self._due = False  # the writer writes without waiting for its tick
        self._stop = False
        self._stopped: db.StopBuild | None = None  # why the writer gave up
        # threading.Thread.start() waits until the new thread runs, which in
        # a freshly forked build process costs half a millisecond of the
        # build's start; the writer says when it is done instead.
        self._written = threading.Event()
        _thread.start_new_thread(self._writer, ())

    def _writer(self) -> None:
        try:
            self._write_until_stopped()
        finally:
            self._written.set()

    def _write_until_stopped(self) -> None:
        failing = None  # the error the last write failed with
        while True:
            with self._cond:
                if self._stop:
                    return
                if not self._due:
                    self._cond.wait(TICK)
                self._due = False
            try:
                self._flush(final=False)
                failing = None
            except db.StopBuild as exc:
                with self._cond:
                    self._stopped = exc
                    self._cond.notify_all()
                return
            except db.Error as exc:
                # The text is sent again by the next write; the error is said
                # once, not at every tick while it lasts.
                message = db.one_line(exc)
                if message != failing:
                    failing = message
                    log.error("build %s: output not yet written: %s", self.build.id, failing)

    def _flush(self, final: bool, *last: db.Statement, big_running: bool = True) -> None:
        """Send the output that is due, then the queued status changes and
        last, in one round trip; a big write goes alone, so that the build
        process holds one copy of one column's text at a time. Without
        big_running, a big write of the running job's text is left for later."""
        with self._db:
            small = []
            with self._cond:
                closing = self._closing
                # A job's end takes all of the build's output so far with it.
                columns = [(self._build, final or closing is not None),
                           (closing, True), (self._job, final)]
            for column, whole in columns:
                if column is None:
                    continue
                with self._cond:
                    write = column.due(time.monotonic(), whole)
                if write is None:
                    continue
                if len(write.data) > BATCH:
                    if column is self._job and not big_running:
                        continue
                    self._send([(column, write)], [])
                else:
                    small.append((column, write))
            # Taken off the queue only now: a big write that failed above
            # leaves them queued.
            with self._cond:
                then, self._queued = self._queued + list(last), []
            try:
                self._send(small, then)
            except BaseException:
                with self._cond:  # sent again with the next write
                    self._queued[:0] = then
                raise
            self._closed()

    def _closed(self) -> None:
        """Let the ended job's column go once the database has all its text."""
        with self._cond:
            column = self._closing
            if column is None or column.log.unwritten():
                return
            self._closing = None
        dropped = column.log.left_out
        self.on_job_output(column.log.total - dropped, dropped)

    def _send(self, writes: list[tuple[_Column, Write]], then: list[db.Statement]) -> None:
        statements = [db.output(column.table, column.row_id, write.data,
                                write.keep if write.kind == "tail" else None)
                      for column, write in writes] + then
        if not statements:
            return
        self.session.call(db.execute, statements)
        with self._cond:
            now = time.monotonic()
            for column, write in writes:
                column.confirm(write, now)
            self._cond.notify_all()

    def output(self, job: Job | None, text: str) -> None:
        with self._cond:
            now = time.monotonic()
            self._build.append(text, now)
            if job is not None:
                if self._job is None or self._job.row_id != job.id:
                    self._job = _Column(self.limit, "build_jobs", job.id)
                self._job.append(text, now)
            # The job waits on its pipe while the writer catches up.
            while self._behind() and not self._stop:
                if self._stopped:
                    raise self._stopped
                self._cond.notify_all()
                self._cond.wait(TICK)

    def _behind(self) -> bool:
        return self._build.behind() or (self._job is not None and self._job.behind())

    def _queue(self, statement: db.Statement) -> None:
        with self._cond:
            self._queued.append(statement)

    def job_started(self, job: Job) -> None:
        """The job's start goes with the writer's next tick, within TICK:
        waking the writer now would have it contend for the interpreter and
        the CPU with the job's own start (its process being spawned)."""
        with self._cond:
            self._queued.append(db.start_job(job.id))
            self._job = _Column(self.limit, "build_jobs", job.id)

    def job_finished(self, job: Job, status: str) -> None:
        """The job's last output and its end are written in the background,
        so that the next job starts without waiting for them. The create
        driver job's end waits for the writer's tick instead, as a start
        does: it comes just as the build's first command is being spawned,
        and how soon that command runs is how soon the build is seen to
        start. Only one ended
        job's text is held at a time: if the one before is still unwritten,
        this end writes it first, which bounds memory while the database is
        slow and lets a write it refuses end the build."""
        with self._cond:
            if self._stopped:
                raise self._stopped
            column = self._job if self._job is not None and self._job.row_id == job.id else None
        if column is not None:
            self._write_closing()
        with self._cond:
            if column is not None:
                self._closing, self._job = column, None
            self._queued.append(db.finish_job(job.id, status))
            if job.name != CREATE_JOB:
                self._due = True
                self._cond.notify_all()

    def _write_closing(self) -> None:
        """Write the ended job's text here and now, until all of it is in.
        The running job's text goes with it when it is small (the same round
        trip); a big one is left to the writer, so that a write of it the
        database refuses does not end the build before its turn."""
        while True:
            with self._cond:
                if self._closing is None:
                    return
            self._flush(True, big_running=False)

    def stage_started(self, stage: Stage) -> None:
        self._queue(db.start_stage(stage.id))

    def stage_finished(self, stage: Stage, status: str) -> None:
        self._queue(db.finish_stage(stage.id, status))

    def object_placed(self, obj: Object) -> None:
        self._queue(db.mark_placed(obj.id))

    def artifact_collected(self, artifact: Artifact, size: int, md5: bytes, sha256: bytes) -> None:
        self._queue(db.record_artifact(artifact.id, size, md5, sha256))

    def build_finished(self, status: str) -> None:
        """The last write: the rest of the output, statuses and the build's own."""
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        self._written.wait()
        self._write_closing()
        self._flush(True, db.finish_build(self.build.id, status))
