"""What the runner reports, written into the database by the build process.

Job output is batched for a short interval: a job that prints many small
lines would otherwise cost one UPDATE per line. A background thread flushes
what is buffered every FLUSH_INTERVAL, and every status change flushes first
so the log stays in order.
"""

from __future__ import annotations

import threading

from . import db
from .model import Artifact, Build, Job, Object, Stage

# Live output reaches the database at most this long after it was printed.
FLUSH_INTERVAL = 0.25


class DatabaseReporter:
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
