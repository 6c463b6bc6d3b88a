"""The `ssh` driver: runs jobs on an existing host over SSH, files over SFTP.

The host is not ours, so the driver leaves nothing behind: job scripts live in
a private directory under the remote /tmp that destroy() removes. Host keys
are not verified (as in the original worker): the address comes from the
build's own manifest, so there is no key the worker could know in advance.

Each job runs as `/bin/sh -c` exec'd from the login shell of its own exec
channel. OpenSSH starts every session without a terminal in a new session
(setsid), so that shell's pid is the process group of everything the job
starts, and a second channel can `kill -s KILL` the whole group on timeout,
kill, or when the job's shell exits (see _job_commands). Dropping the channel
alone would leave the job running on the host.

kill() only sets a flag (and, while connecting, cuts the socket): it runs in
a signal handler, where taking any of paramiko's locks could deadlock. A
running job notices the flag within _POLL seconds.
"""

from __future__ import annotations

import logging
import posixpath
import re
import secrets
import shlex
import shutil
import socket
import time
from contextlib import contextmanager
from typing import BinaryIO, Iterator

import paramiko

from djinn_worker.config import SSHConfig, parse_addr

from .base import Driver, DriverError, Output, Tracker

SSH_PORT = 22

_READ_SIZE = 32 * 1024
# How often a blocked run() or connection retry looks at the kill flag.
_POLL = 0.2
# The most one connection attempt may take (socket, banner, key exchange, login).
_ATTEMPT = 10.0
# A listening sshd greets at once. A port forwarded by QEMU accepts while the
# guest is still booting and then stays silent: waiting longer only delays
# the attempt that will succeed.
_BANNER = 4.0
# How long to wait for the output to end once the job's group was killed.
_GRACE = 3.0
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

# Paramiko logs every packet and SFTP call at debug level: not the worker's news.
logging.getLogger("paramiko").setLevel(logging.WARNING)


class SSHDriver(Driver):
    name = "ssh"

    def __init__(self, build_id: int, manifest: dict, config: SSHConfig,
                 tracker: Tracker | None = None):
        # Nothing of an ssh build lives on this host: the tracker is not needed.
        address = manifest.get("address") or manifest.get("addr")
        if not isinstance(address, str) or not address:
            raise DriverError("the ssh driver needs an address (host:port) in the manifest")
        try:
            parse_addr(address, SSH_PORT)
        except ValueError as exc:
            raise DriverError(f"ssh driver: {exc}") from None
        self._session(build_id, address, config.user, config.password, config.timeout)

    def _session(self, build_id: int, address: str, user: str, password: str,
                 timeout: float) -> None:
        """What one SSH login needs; the qemu driver learns its address later."""
        self.build_id = build_id
        self.address = address
        self.user = user
        self.password = password
        self.timeout = timeout
        self._sock: socket.socket | None = None  # only while connecting
        self._transport: paramiko.Transport | None = None
        self._sftp: paramiko.SFTPClient | None = None
        self._home = ""
        self._dir = ""
        self._jobs = 0
        self._killed = False

    def create(self, out: Output) -> None:
        out.write(b"Running with SSH driver...\n")
        out.write(f"Connecting to {self.address} as {self.user}...\n".encode())
        self._connect()
        out.write(f"Established SSH connection to {self.address}...\n".encode())

    def _connect(self) -> None:
        """Log in, retrying once a second until self.timeout has passed, and
        make the build's directory for job scripts.

        The host may still be coming up (a rebooting server, a booting VM), so
        refused or dropped connections are retried; a refused login is not,
        since waiting will not fix a wrong password. Paramiko logs every failed
        attempt with a traceback; the one line that matters is ours.
        """
        address = parse_addr(self.address, SSH_PORT)
        deadline = time.monotonic() + self.timeout
        with _quiet("paramiko"):
            while True:
                self._check_alive()
                limit = min(max(deadline - time.monotonic(), 1.0), _ATTEMPT)
                try:
                    self._open(address.host, address.port, limit)
                    break
                except paramiko.AuthenticationException as exc:
                    self._close()
                    raise DriverError(
                        f"cannot log in to {self.address} as {self.user}: {exc}"
                    ) from None
                except (OSError, EOFError, paramiko.SSHException) as exc:
                    self._close()
                    error = str(exc) or type(exc).__name__
                left = deadline - time.monotonic()
                if left <= 0:
                    raise DriverError(
                        f"cannot connect to {self.address} within {self.timeout:g}s: {error}"
                    )
                self._sleep(min(1.0, left))
        self._home = self._sftp.normalize(".")
        self._dir = f"/tmp/djinn-ssh-{self.build_id}-{secrets.token_hex(8)}"
        self._sftp.mkdir(self._dir, 0o700)

    def _open(self, host: str, port: int, limit: float) -> None:
        self._sock = socket.create_connection((host, port), timeout=limit)
        if self._killed:  # kill() may have come before the socket existed
            raise DriverError("the build was stopped")
        transport = self._transport = paramiko.Transport(self._sock)
        transport.banner_timeout = min(limit, _BANNER)
        transport.handshake_timeout = transport.auth_timeout = limit
        transport.start_client(timeout=limit)
        transport.auth_password(self.user, self.password)
        transport.set_keepalive(30)
        self._sftp = paramiko.SFTPClient.from_transport(transport)
        self._sock = None

    def _check_alive(self) -> None:
        """Raise if connecting is pointless now; subclasses add their own reasons."""
        if self._killed:
            raise DriverError("the build was stopped")

    def _sleep(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            self._check_alive()
            time.sleep(min(_POLL, max(end - time.monotonic(), 0)))

    def _path(self, path: str) -> str:
        """Manifests say /root/... for the build user's home: when the login
        user is someone else, that is their home (where ssh looks for keys)."""
        if self.user != "root" and (path == "/root" or path.startswith("/root/")):
            return self._home + path[len("/root"):]
        return path

    def _makedirs(self, path: str) -> None:
        """mkdir -p, which SFTP can only do one level at a time."""
        missing = []
        while path not in ("", "/"):
            try:
                self._sftp.stat(path)
                break
            except FileNotFoundError:
                missing.append(path)
                path = posixpath.dirname(path)
        for directory in reversed(missing):
            self._sftp.mkdir(directory)

    def put(self, dest: str, src: BinaryIO, mode: int) -> None:
        path = self._path(dest)
        self._makedirs(posixpath.dirname(path))
        with self._sftp.open(path, "wb") as fh:
            fh.chmod(mode)  # before the first byte: a key is never readable by others
            fh.set_pipelined(True)
            shutil.copyfileobj(src, fh, _READ_SIZE)

    def mkdir(self, path: str, mode: int) -> None:
        path = self._path(path)
        self._makedirs(path)
        self._sftp.chmod(path, mode)

    def get(self, source: str) -> paramiko.SFTPFile:
        # paramiko raises OSError(ENOENT), which Python makes a FileNotFoundError.
        return self._sftp.open(self._path(source), "rb")

    def run(self, script: str, env: dict[str, str], out: Output) -> int:
        if self._killed:
            raise DriverError("the build was stopped")
        content = (_exports(env) + script).encode()
        self._jobs += 1
        path = f"{self._dir}/job-{self._jobs}.sh"
        try:
            with self._sftp.open(path, "wb") as fh:
                fh.chmod(0o600)
                fh.write(content)
            start, stop = _job_commands(path, f"{self._dir}/job-{self._jobs}.pid")
            chan = self._transport.open_session(timeout=_ATTEMPT)
            try:
                chan.set_combine_stderr(True)
                chan.settimeout(_POLL)
                chan.exec_command(start)
                return self._stream(chan, stop, out)
            finally:
                chan.close()
        except (OSError, EOFError, paramiko.SSHException) as exc:
            raise DriverError(f"{self.address}: {exc or type(exc).__name__}") from None

    def _stream(self, chan: paramiko.Channel, stop: str, out: Output) -> int:
        """Copy output until the job is over and return its exit status.

        The job is over when its shell has exited: it is stopped then, so
        nothing it started in the background outlives it, and also when the
        build is stopped. Output still held open by such processes is waited
        for at most _GRACE seconds after that.
        """
        eof = False
        stopped_at = 0.0
        while not (eof and chan.exit_status_ready()):
            if eof:
                chan.status_event.wait(_POLL)
            else:
                try:
                    data = chan.recv(_READ_SIZE)
                except socket.timeout:
                    data = None
                if data:
                    out.write(data)
                    continue
                eof = data == b""
            if stopped_at and time.monotonic() - stopped_at > _GRACE:
                break
            if not stopped_at and (self._killed or chan.exit_status_ready()):
                self._stop(stop)
                stopped_at = time.monotonic()
        if not stopped_at:
            # sshd may end the session with the shell although processes it
            # started in the background live on.
            self._stop(stop)
        return chan.recv_exit_status() if chan.exit_status_ready() else -1

    def _stop(self, command: str) -> None:
        try:
            self._exec(command)
        except (OSError, EOFError, paramiko.SSHException):
            pass  # the connection is gone: the watchdog stops the job

    def _exec(self, command: str) -> None:
        """Run a short housekeeping command on a channel of its own."""
        chan = self._transport.open_session(timeout=_ATTEMPT)
        try:
            chan.settimeout(_ATTEMPT)
            chan.exec_command(command)
            while chan.recv(_READ_SIZE):
                pass
        finally:
            chan.close()

    def kill(self) -> None:
        self._killed = True
        sock = self._sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def destroy(self) -> None:
        if self._dir and self._transport is not None and self._transport.is_active():
            try:
                self._exec(f"rm -rf -- {shlex.quote(self._dir)}")
            except (OSError, EOFError, paramiko.SSHException):
                pass
        self._close()

    def _close(self) -> None:
        for part in (self._sftp, self._transport, self._sock):
            if part is not None:
                part.close()
        self._sftp = self._transport = self._sock = None


def _exports(env: dict[str, str]) -> str:
    """Variables as shell lines ahead of the script: sshd usually refuses to
    pass environment variables, and single quotes keep every value literal."""
    for key in env:
        if not _NAME.fullmatch(key):
            raise DriverError(f"variable {key!r} is not a valid shell variable name")
    return "".join(f"export {key}={shlex.quote(value)}\n" for key, value in env.items())


def _job_commands(script: str, pidfile: str) -> tuple[str, str]:
    """The commands that start and that stop one job.

    The job's shell writes its pid, which is its process group, to pidfile.
    Stopping kills that group and removes the job's files (the script holds
    the build's variables, which may be secrets). A watchdog in the group
    does the same when the session's input ends, which happens only when the
    connection does: if the build process dies without stopping the job,
    the job is stopped all the same. The job itself reads /dev/null.
    """
    script, pidfile = shlex.quote(script), shlex.quote(pidfile)
    inner = (
        f"echo $$ > {pidfile} || exit 1; exec 3<&0; "
        f"(cat <&3 >/dev/null 2>&1; rm -f {script} {pidfile}; kill -s KILL -- -$$) "
        f">/dev/null 2>&1 & exec /bin/sh {script} </dev/null 3<&-"
    )
    stop = (f'[ -s {pidfile} ] && kill -s KILL -- -"$(cat {pidfile})" 2>/dev/null; '
            f"rm -f {script} {pidfile}")
    return f"exec /bin/sh -c {shlex.quote(inner)}", stop


@contextmanager
def _quiet(logger: str) -> Iterator[None]:
    log = logging.getLogger(logger)
    level = log.level
    log.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        log.setLevel(level)
