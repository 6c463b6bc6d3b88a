"""The report pipe from a build process to the supervisor: both ends, one protocol.

A build process writes one JSON object per line, each with a `kind`. What
it says before its result tells the supervisor what to clean up should it
die before its own teardown (its jobs' process groups, its temporary
paths); the result says how the build ended. New kinds are added here, at
both ends at once.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from datetime import datetime

from .db import Claimed
from .queue import Payload

# The kinds of message, named once for both ends.
PROCESS_GROUP = "process_group"  # {"pgid": int}: a job's process group
PATH = "path"  # {"path": str}: a file or directory to remove
RESULT = "result"  # {"build_id", "status" (None if the process failed), "error", "stop"}
# What only the build process knows, for the supervisor's metrics.
CREATED = "created"  # {"seconds": float}: the driver took this long to create
OUTPUT = "output"  # {"stored": int, "dropped": int}: a finished job's output bytes
NOTICE_FAILED = "notice_failed"  # {"notice": COMMIT_STATUS | MAIL}
COMMIT_STATUS, MAIL = "commit_status", "mail"
DATABASE = "database"  # {"event": "error" | "reconnect"}: the build's own connection
FIGURES = (CREATED, OUTPUT, NOTICE_FAILED, DATABASE)
HANDED_BACK = "handed_back"  # {}: the lent database connection is reset and never used again
UNREADABLE = "unreadable"  # made by the reader for a line it cannot decode

# Why a build process stopped without settling its build (RESULT's "stop").
LOST = "lost"  # another worker runs the build now: leave it alone
UNAVAILABLE = "unavailable"  # the database stayed away: settle it once it is back

_READ_SIZE = 65536


@dataclass(frozen=True)
class Message:
    kind: str
    data: dict


class ReportWriter:
    """The build process's end; also the drivers' Tracker."""

    def __init__(self, fd: int):
        self.fd = fd

    def send(self, kind: str, **data) -> None:
        line = (json.dumps({"kind": kind, **data}) + "\n").encode()
        try:
            os.write(self.fd, line)
        except BrokenPipeError:
            pass  # the supervisor is gone; the build still finishes in the database

    def process_group(self, pgid: int) -> None:
        self.send(PROCESS_GROUP, pgid=pgid)

    def path(self, path: str) -> None:
        self.send(PATH, path=path)

    def created(self, seconds: float) -> None:
        self.send(CREATED, seconds=seconds)

    def output(self, stored: int, dropped: int) -> None:
        self.send(OUTPUT, stored=stored, dropped=dropped)

    def notice_failed(self, notice: str) -> None:
        self.send(NOTICE_FAILED, notice=notice)

    def database(self, event: str) -> None:
        self.send(DATABASE, event=event)

    def handed_back(self) -> None:
        self.send(HANDED_BACK)

    def result(self, build_id: int, status: str | None, error: str = "",
               stop: str | None = None) -> None:
        self.send(RESULT, build_id=build_id, status=status, error=error, stop=stop)


class ReportReader:
    """The supervisor's end: non-blocking, decoding whole lines as they come."""

    def __init__(self, fd: int):
        self.fd = fd
        os.set_blocking(fd, False)
        self._buffer = b""

    def read(self) -> tuple[list[Message], bool]:
        """The messages readable now, and whether the build process closed its end."""
        messages: list[Message] = []
        while True:
            try:
                data = os.read(self.fd, _READ_SIZE)
            except BlockingIOError:
                return messages, False
            if not data:
                return messages, True
            self._buffer += data
            *lines, self._buffer = self._buffer.split(b"\n")
            messages += [_decode(line) for line in lines]

    def close(self) -> None:
        os.close(self.fd)


def encode_start(payload: Payload, claimed: Claimed) -> bytes:
    """The one line the supervisor sends a spare build process: its build."""
    return (json.dumps({"build_id": payload.build_id, "host": payload.host,
                        "secret": claimed.secret,
                        "started_at": claimed.started_at.isoformat()}) + "\n").encode()


def decode_start(line: bytes) -> tuple[Payload, Claimed]:
    data = json.loads(line)
    return (Payload(data["build_id"], data["host"]),
            Claimed(data["build_id"], data["secret"], datetime.fromisoformat(data["started_at"])))


def _decode(line: bytes) -> Message:
    try:
        data = json.loads(line)
        return Message(data.pop("kind"), data)
    except (ValueError, KeyError, AttributeError, TypeError):
        return Message(UNREADABLE, {"line": line[:200].decode(errors="replace")})
