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
import threading
import time

from . import db
from .model import Artifact, Build, Job, Object, Stage
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

    def __init__(self, limit: int):
        self.log = CappedLog(limit)
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
    def __init__(self, session: db.Session, build: Build, limit: int):
        self.session, self.build, self.limit = session, build, limit
        self._build = _Column(limit)
        self._job: Job | None = None
        self._job_column = _Column(limit)
        self._cond = threading.Condition()
        # One writer on the connection at a time, in the order of events.
        self._db = threading.Lock()
        self._stop = False
        self._stopped: db.StopBuild | None = None  # why the writer gave up
        self._thread = threading.Thread(target=self._writer, name="output", daemon=True)
        self._thread.start()

    def _writer(self) -> None:
        while True:
            with self._cond:
                if self._stop:
                    return
                self._cond.wait(TICK)
            try:
                self._flush(final=False)
            except db.StopBuild as exc:
                with self._cond:
                    self._stopped = exc
                    self._cond.notify_all()
                return
            except db.Error as exc:
                # Kept in the logs and sent again by the next write.
                log.error("build %s: output not yet written: %s", self.build.id, str(exc).strip())

    def _flush(self, final: bool) -> None:
        """Send what is due, one column at a time: each write holds a copy of
        its text, and the build process's memory is bounded by the largest."""
        with self._db:
            for column in (self._build, None):
                with self._cond:
                    job = self._job
                    if column is None:
                        if job is None:
                            return
                        column = self._job_column
                    write = column.due(time.monotonic(), final)
                if write is None:
                    continue
                if column is self._build:
                    self.session.call(db.write_output, self.build.id, _pair(write))
                else:
                    self.session.call(db.write_output, self.build.id, None, job.id, _pair(write))
                with self._cond:
                    column.confirm(write, time.monotonic())
                    self._cond.notify_all()

    def output(self, job: Job | None, text: str) -> None:
        with self._cond:
            now = time.monotonic()
            self._build.append(text, now)
            if job is not None:
                if job is not self._job:
                    self._job, self._job_column = job, _Column(self.limit)
                self._job_column.append(text, now)
            # The job waits on its pipe while the writer catches up.
            while (self._build.behind() or self._job_column.behind()) and not self._stop:
                if self._stopped:
                    raise self._stopped
                self._cond.notify_all()
                self._cond.wait(TICK)

    def job_started(self, job: Job) -> None:
        self._flush(final=True)
        with self._cond:
            self._job, self._job_column = job, _Column(self.limit)
        self._write(db.start_job, job.id)

    def job_finished(self, job: Job, status: str) -> None:
        self._flush(final=True)
        self._write(db.finish_job, job.id, status)

    def stage_started(self, stage: Stage) -> None:
        self._write(db.start_stage, stage.id)

    def stage_finished(self, stage: Stage, status: str) -> None:
        self._write(db.finish_stage, stage.id, status)

    def object_placed(self, obj: Object) -> None:
        self._write(db.mark_placed, obj.id)

    def artifact_collected(self, artifact: Artifact, size: int, md5: bytes, sha256: bytes) -> None:
        self._write(db.record_artifact, artifact.id, size, md5, sha256)

    def build_finished(self, status: str) -> None:
        self.close()
        self._write(db.finish_build, self.build.id, status)

    def _write(self, statement, *args) -> None:
        with self._db:
            self.session.call(statement, *args)

    def close(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        self._thread.join()
        self._flush(final=True)


def _pair(write: Write | None) -> tuple[bytes, int | None] | None:
    if write is None:
        return None
    return write.data, write.keep if write.kind == "tail" else None
