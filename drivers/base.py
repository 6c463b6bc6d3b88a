"""The one small interface every driver implements.

A driver owns one build's environment from creation to destruction. The
runner calls it in a fixed order (create, put, run/get per job, destroy) and
may call kill() at any moment from a signal handler or another thread, so
kill() must be quick, take no locks the other calls hold, and make whatever
is blocking in run() or create() return promptly.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from contextlib import AbstractContextManager
from typing import BinaryIO, Protocol


class DriverError(Exception):
    """The driver could not do what was asked; the message goes into the build log."""


class Output(Protocol):
    def write(self, data: bytes) -> None: ...


class Tracker(Protocol):
    """Told about anything that must be cleaned up if the build process dies.

    The supervisor uses this to kill process groups and remove paths left by
    a child that was SIGKILLed before its own teardown could run.
    """

    def process_group(self, pgid: int) -> None: ...

    def path(self, path: str) -> None: ...


class NoTracker:
    """For running a build outside the supervisor: nobody to tell."""

    def process_group(self, pgid: int) -> None:
        pass

    def path(self, path: str) -> None:
        pass


class Driver(ABC):
    """One build environment: a directory, a container, a VM or a host."""

    #: The driver_type name, as in build_drivers.type.
    name: str = ""

    @abstractmethod
    def create(self, out: Output) -> None:
        """Bring the environment up, writing progress to out; DriverError on failure."""

    @abstractmethod
    def run(self, script: str, env: dict[str, str], out: Output) -> int:
        """Run one job script, streaming its output as it comes; return its exit status."""

    @abstractmethod
    def put(self, dest: str, src: BinaryIO, mode: int) -> None:
        """Stream src to dest in the environment, creating parent directories."""

    @abstractmethod
    def mkdir(self, path: str, mode: int) -> None:
        """Make a directory (and parents) in the environment with exactly mode."""

    @abstractmethod
    def get(self, source: str) -> AbstractContextManager[BinaryIO]:
        """Open source in the environment for streaming out; FileNotFoundError if absent."""

    @abstractmethod
    def kill(self) -> None:
        """Stop whatever is running now (the job's whole process tree)."""

    @abstractmethod
    def destroy(self) -> None:
        """Remove everything the build created; must be safe after a failed create."""
