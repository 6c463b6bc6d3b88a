"""The `os` driver: runs jobs with /bin/sh on the worker's own host.

There is no isolation beyond a fresh temporary directory per build, which is
the jobs' working directory and $HOME; it is meant for trusted builds and for
testing the worker. Each job runs in its own process group so that a timeout
or kill, and the end of the job itself, reach every process it started.

A job's script is never a file in the build directory: it is kept in memory
(a memfd) that the shell opens through this process's /proc entry, which
only the build's own user (and root) may open. So $HOME starts empty, and a
build costs one new inode rather than four, which on ext4 is much of what a
trivial build spends.
"""

from __future__ import annotations

import os
import selectors
import shutil
import signal
import stat
import subprocess
import tempfile
from contextlib import contextmanager
from typing import BinaryIO, Iterator

from .base import Driver, DriverError, NoTracker, Output, Tracker

_READ_SIZE = 64 * 1024


class OSDriver(Driver):
    name = "os"

    def __init__(self, build_id: int, manifest: dict | None = None, config: None = None,
                 tracker: Tracker | None = None):
        self.build_id = build_id
        self.tracker = tracker or NoTracker()
        self.home: str | None = None
        self._pgid: int | None = None
        self._killed = False

    def create(self, out: Output) -> None:
        self.home = tempfile.mkdtemp(prefix=f"djinn-build-{self.build_id}-")
        self.tracker.path(self.home)
        out.write(f"Running with OS driver...\nBuild directory {self.home}\n".encode())

    def _resolve(self, path: str) -> str:
        """Map a build path into the build directory, refusing escapes.

        Manifests are written for drivers where /root is $HOME, so "/root/x"
        and "/x" both land at $HOME/x here.
        """
        if not self.home:
            raise DriverError("the build directory does not exist")
        if "\0" in path:
            raise DriverError(f"path {path!r} contains a NUL byte")
        rel = path
        if rel == "/root" or rel.startswith("/root/"):
            rel = rel[len("/root"):]
        rel = rel.lstrip("/")
        home = os.path.realpath(self.home)
        full = os.path.realpath(os.path.join(home, rel))
        if full != home and not full.startswith(home + os.sep):
            raise DriverError(f"path {path!r} is outside the build directory")
        return full

    def put(self, dest: str, src: BinaryIO, mode: int) -> None:
        path = self._resolve(dest)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        with os.fdopen(fd, "wb") as fh:
            shutil.copyfileobj(src, fh, _READ_SIZE)
        os.chmod(path, mode)

    def mkdir(self, path: str, mode: int) -> None:
        full = self._resolve(path)
        os.makedirs(full, exist_ok=True)
        os.chmod(full, mode)

    def get(self, source: str):
        return open(self._resolve(source), "rb")

    def run(self, script: str, env: dict[str, str], out: Output) -> int:
        if self._killed:
            raise DriverError("the build was stopped")
        assert self.home
        base = {
            "PATH": os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin"),
            "HOME": self.home,
            "LANG": "C.UTF-8",
            "SHELL": "/bin/sh",
        }
        with _in_memory(script) as path:
            proc = subprocess.Popen(
                ["/bin/sh", path], cwd=self.home, env={**base, **env},
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT, start_new_session=True,
            )
            self._pgid = proc.pid
            self.tracker.process_group(proc.pid)
            if self._killed:
                self._kill_group()
            try:
                self._stream(proc, out)
            finally:
                # The job is over when its shell exits, even if something it put
                # in the background still holds the output pipe open.
                self._kill_group()
                self._pgid = None
                proc.wait()
                proc.stdout.close()
        return proc.returncode

    def _stream(self, proc: subprocess.Popen, out: Output) -> None:
        fd = proc.stdout.fileno()
        os.set_blocking(fd, False)
        pidfd = os.pidfd_open(proc.pid)
        try:
            with selectors.DefaultSelector() as sel:
                sel.register(fd, selectors.EVENT_READ)
                sel.register(pidfd, selectors.EVENT_READ)
                exited = False
                while not exited:
                    for key, _ in sel.select():
                        if key.fd == pidfd:
                            exited = True
                        elif not _drain(fd, out):
                            sel.unregister(fd)
                _drain(fd, out)
        finally:
            os.close(pidfd)

    def _kill_group(self) -> None:
        if self._pgid is None:
            return
        try:
            os.killpg(self._pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def kill(self) -> None:
        self._killed = True
        self._kill_group()

    def destroy(self) -> None:
        self._kill_group()
        if self.home:
            shutil.rmtree(self.home, onerror=_make_writable_and_retry)
            self.home = None


@contextmanager
def _in_memory(script: str) -> Iterator[str]:
    """A path at which the job's shell opens script, for as long as the job
    runs (the shell may open it a moment after it has started)."""
    fd = os.memfd_create("djinn-job", os.MFD_CLOEXEC)
    try:
        with open(fd, "w", closefd=False) as fh:
            fh.write(script)
        yield f"/proc/{os.getpid()}/fd/{fd}"
    finally:
        os.close(fd)


def _drain(fd: int, out: Output) -> bool:
    """Copy what the pipe holds now; False once it is closed."""
    while True:
        try:
            data = os.read(fd, _READ_SIZE)
        except BlockingIOError:
            return True
        if not data:
            return False
        out.write(data)


def _make_writable_and_retry(func, path, _exc_info) -> None:
    """Jobs may leave read-only directories behind; removal must still succeed."""
    if not os.path.lexists(path):
        return
    parent = os.path.dirname(path)
    os.chmod(parent, os.stat(parent).st_mode | stat.S_IRWXU)
    if os.path.isdir(path) and not os.path.islink(path):
        os.chmod(path, os.stat(path).st_mode | stat.S_IRWXU)
    func(path)
