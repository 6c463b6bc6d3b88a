"""Stopping a build early: the timeout, a kill request, or the worker going down.

cancel() is called from signal handlers (SIGALRM, SIGTERM) and from the
kill-watcher thread, so it takes no locks: the first reason set wins and the
hooks (the driver's kill) run wherever cancel() was called.
"""

from __future__ import annotations

import logging
import signal
import time
from contextlib import contextmanager
from typing import Callable, Iterator

from .model import TIMED_OUT

log = logging.getLogger(__name__)

# Driver creation has its own limit inside the build's timeout.
CREATE_LIMIT = 5 * 60.0


class Cancel:
    def __init__(self) -> None:
        self.reason: str | None = None
        self._hooks: list[Callable[[], None]] = []

    def on_cancel(self, hook: Callable[[], None]) -> None:
        self._hooks.append(hook)
        if self.reason is not None:
            hook()

    def cancel(self, reason: str) -> None:
        if self.reason is not None:
            return
        self.reason = reason
        for hook in list(self._hooks):
            try:
                hook()
            except Exception:
                log.exception("stopping the build after %s failed", reason)


class BuildTimer:
    """The build's deadline, enforced with SIGALRM.

    One interval timer serves both limits: it is armed for whichever of the
    build deadline and the driver-creation deadline comes first.
    """

    def __init__(self, timeout: float, cancel: Cancel):
        self.deadline = time.monotonic() + timeout
        self.cancel = cancel
        signal.signal(signal.SIGALRM, self._expired)
        self._arm(self.deadline)

    def _expired(self, _signum, _frame) -> None:
        self.cancel.cancel(TIMED_OUT)

    def _arm(self, at: float) -> None:
        # setitimer(0) would disarm; an already passed deadline fires at once.
        signal.setitimer(signal.ITIMER_REAL, max(at - time.monotonic(), 1e-6))

    @contextmanager
    def creating(self, limit: float = CREATE_LIMIT) -> Iterator[None]:
        self._arm(min(self.deadline, time.monotonic() + limit))
        try:
            yield
        finally:
            if self.cancel.reason is None:
                self._arm(self.deadline)

    def stop(self) -> None:
        signal.setitimer(signal.ITIMER_REAL, 0)
