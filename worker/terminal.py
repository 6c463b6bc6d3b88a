"""What the runner reports, written to a terminal as it happens.

The offline runner's Reporter: where the worker stores output and statuses in
PostgreSQL, this prints them. Output arrives already decoded and masked by
the runner's JobOutput, so it is written as it comes; each job is framed by a
header naming its stage and a footer with its status and how long it took,
so a long log can be scanned for the job that failed. Colour is only used on
a terminal, so that a log piped to a file stays plain text.
"""

from __future__ import annotations

import time
from typing import BinaryIO, Callable

from .model import FAILED, PASSED, PASSED_WITH_FAILURES, Artifact, Build, Job, Object, Stage

_RESET = "\x1b[0m"
_BOLD = "\x1b[1m"
_STATUS_COLOURS = {PASSED: "\x1b[32m", PASSED_WITH_FAILURES: "\x1b[33m", FAILED: "\x1b[31m"}
_OTHER_STATUS = "\x1b[35m"  # killed, timed out


def duration(seconds: float) -> str:
    """A job's duration as people read it: "0.42s", "12.3s", "2m05s"."""
    if seconds < 10:
        return f"{seconds:.2f}s"
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, rest = divmod(int(seconds), 60)
    return f"{minutes}m{rest:02d}s"


class TerminalReporter:
    def __init__(self, build: Build, out: BinaryIO, colour: bool,
                 on_closed: Callable[[], None] = lambda: None):
        self.out, self.colour = out, colour
        # Told once if the reader of out goes away (`djinn | head`): nobody
        # reads the rest, so the build is stopped as Ctrl-C stops it.
        self.on_closed = on_closed
        self.closed = False
        self._stage_of = {job.id: stage.name for stage in build.stages for job in stage.jobs}
        self._started: dict[int, float] = {}
        self._line_open = False  # the last output did not end its line

    def _write(self, text: str) -> None:
        if text and not self.closed:
            try:
                self.out.write(text.encode("utf-8", "replace"))
                self.out.flush()
            except BrokenPipeError:
                self.closed = True
                self.on_closed()
                return
            self._line_open = not text.endswith("\n")

    def _paint(self, text: str, code: str) -> str:
        return f"{code}{text}{_RESET}" if self.colour else text

    def _end_line(self) -> None:
        if self._line_open:
            self._write("\n")

    def output(self, job: Job | None, text: str) -> None:
        self._write(text)

    def job_started(self, job: Job) -> None:
        self._end_line()
        self._started[job.id] = time.monotonic()
        self._write(self._paint(f"==> {self._stage_of[job.id]}: {job.name}", _BOLD) + "\n")

    def job_finished(self, job: Job, status: str) -> None:
        started = self._started.pop(job.id, None)
        if started is None:
            return  # never ran: the build ended before it
        self._end_line()
        shown = self._paint(status, _STATUS_COLOURS.get(status, _OTHER_STATUS))
        took = duration(time.monotonic() - started)
        self._write(f"{self._paint('<==', _BOLD)} {self._stage_of[job.id]}: {job.name} {shown} in {took}\n\n")

    def stage_started(self, stage: Stage) -> None:
        """Jobs name their stage in their headers: nothing more to say."""

    def stage_finished(self, stage: Stage, status: str) -> None:
        """The jobs' footers already tell the stage's outcome."""

    def object_placed(self, obj: Object) -> None:
        """The runner's own "Placing object" line is in the output."""

    def artifact_collected(self, artifact: Artifact, size: int, md5: bytes, sha256: bytes) -> None:
        self._end_line()
        self._write(f"Stored artifact {artifact.name} ({size} bytes, sha256 {sha256.hex()})\n")

    def build_finished(self, status: str) -> None:
        self._end_line()
