"""Riding out a server that went away: retry with backoff, say so once.

An outage is logged when it begins and when it ends, never once per
attempt, so a database restart is two lines in the log, not hundreds.
"""

from __future__ import annotations

import logging
import time

from .db import one_line
from .metrics import Health

log = logging.getLogger(__name__)

FIRST_DELAY = 0.25
LAST_DELAY = 5.0


class Outage:
    def __init__(self, what: str, service: str, health: Health):
        self.what = what  # e.g. "the database at db:5432"
        self.service, self.health = service, health  # told of every failure and answer
        self.since: float | None = None
        self._delay = FIRST_DELAY

    def failed(self, exc: Exception, consequence: str) -> float:
        """Note a failed attempt; returns how long to wait before the next."""
        self.health.failed(self.service, one_line(exc))
        if self.since is None:
            self.since = time.monotonic()
            log.error("%s: %s; %s (retrying until it is back)", self.what, one_line(exc),
                      consequence)
            self._delay = FIRST_DELAY
        delay, self._delay = self._delay, min(self._delay * 2, LAST_DELAY)
        return delay

    def ok(self) -> None:
        self.health.answered(self.service)
        if self.since is not None:
            log.info("%s is back after %.1fs", self.what, time.monotonic() - self.since)
            self.since = None
