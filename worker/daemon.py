"""The pidfile and the detaching behind `djinn-worker -daemon`.

The pidfile is held under an flock(2) lock for as long as the worker runs,
rather than being python-daemon's (lockfile's) O_EXCL file: a lock dies with
its process, so a file left by a worker that was killed is known to be stale
and is replaced, while a live worker's file always refuses a second one. It
is taken before detaching, so a refusal still reaches the terminal.

Detaching is python-daemon's DaemonContext, with one addition: the command
that was run waits on a pipe until the daemon has reached PostgreSQL and
Redis, and exits 0 only then. An init script's `start` therefore fails
visibly, with the reason, when the worker cannot serve.
"""

from __future__ import annotations

import errno
import fcntl
import os
import signal
import sys
from typing import Any

import daemon


class AlreadyRunning(Exception):
    """Another worker holds the pidfile."""

    def __init__(self, path: str, pid: int | None):
        holder = f"process {pid}" if pid else "another process"
        super().__init__(f"{path}: djinn-worker is already running as {holder}; not starting another")


def _read_pid(fd: int) -> int | None:
    text = os.pread(fd, 32, 0).decode(errors="replace").strip()
    return int(text) if text.isdigit() else None


class PidFile:
    """A pidfile locked by the running worker; a context manager for DaemonContext."""

    def __init__(self, path: str):
        self.path = os.path.abspath(path)
        self.fd = -1
        self._owner = 0

    def acquire(self) -> int | None:
        """Lock the file; return the pid of a dead worker it still named, if any.

        Raises AlreadyRunning, or OSError when the file cannot be opened.
        """
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                pid = _read_pid(fd)
                os.close(fd)
                if exc.errno in (errno.EWOULDBLOCK, errno.EACCES):
                    raise AlreadyRunning(self.path, pid) from None
                raise
            # A stopping worker unlinks the file before its lock goes: if
            # that happened while this one was opening it, the lock is on a
            # file nobody can find any more; take the new one instead.
            try:
                current = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                current = False
            if current:
                self.fd = fd
                return _read_pid(fd)
            os.close(fd)

    def write(self) -> None:
        """Record this process's pid (after detaching, in the daemon itself)."""
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"{os.getpid()}\n".encode(), 0)
        self._owner = os.getpid()
        # Build processes are forks of this one: they must not keep the lock
        # if the supervisor itself dies, or a restart would be refused until
        # the last of them finished.
        os.register_at_fork(after_in_child=self._forget)

    def release(self) -> None:
        """Remove the file and drop the lock; a no-op in forks and when done twice."""
        if self.fd < 0:
            return
        if self._owner == os.getpid():
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
        os.close(self.fd)
        self.fd = -1

    def _forget(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> PidFile:
        self.write()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.release()


class Daemon:
    """Detaches the worker and tells the command that started it how the start went."""

    def __init__(self, pidfile: PidFile | None, preserve: list[Any]):
        self.pidfile = pidfile
        self.preserve = preserve
        self._report_fd = -1

    def detach(self) -> int | None:
        """Become a daemon.

        Returns None in the daemon. In the command that was run it returns
        that command's exit status once the daemon is serving (0) or has
        given up (1, after printing why).
        """
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid:
            os.close(write_fd)
            status = self._await_report(read_fd)
            os.waitpid(pid, 0)
            return status
        os.close(read_fd)
        self._report_fd = write_fd
        preserve = self.preserve + [write_fd]
        if self.pidfile:
            preserve.append(self.pidfile.fd)
        # The working directory is kept so that relative paths in the config
        # mean what they meant in the foreground (the init script starts the
        # worker in /); so is the umask, for the files the worker creates.
        umask = os.umask(0o022)
        os.umask(umask)
        # Only SIGTERM is handled (an exit that removes the pidfile) until
        # the supervisor takes the signals over. python-daemon would also
        # ignore the terminal stop signals, and build jobs would inherit that.
        daemon.DaemonContext(
            detach_process=True, working_directory=os.getcwd(), umask=umask,
            files_preserve=preserve, pidfile=self.pidfile,
            signal_map={signal.SIGTERM: "terminate"},
        ).open()
        return None

    @staticmethod
    def _await_report(read_fd: int) -> int:
        chunks = []
        while chunk := os.read(read_fd, 4096):
            chunks.append(chunk)
        os.close(read_fd)
        report = b"".join(chunks).decode(errors="replace")
        if report == "ready":
            return 0
        print(f"djinn-worker: {report or 'the daemon stopped while starting; its log says why'}",
              file=sys.stderr)
        return 1

    def ready(self) -> None:
        """The worker serves: let the starting command exit 0."""
        self._report("ready")

    def failed(self, problem: str) -> None:
        """The worker gives up before serving: the starting command prints problem."""
        self._report(problem)

    def _report(self, text: str) -> None:
        if self._report_fd >= 0:
            os.write(self._report_fd, text.encode())
            os.close(self._report_fd)
            self._report_fd = -1
