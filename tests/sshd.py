"""A throwaway OpenSSH server for the ssh driver tests.

It runs as root on a free 127.0.0.1 port with its own host key and config in a
temporary directory, and lets exactly one freshly created local user log in
with a password. That user is not root, so builds cannot touch the test
machine's own /root/.ssh, and its home is a temporary directory the tests can
inspect. The config deliberately has no AcceptEnv: build variables must reach
jobs without the server's help.
"""

from __future__ import annotations

import os
import pwd
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from services import free_port

SSHD = "/usr/sbin/sshd"


class Sshd:
    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="djinn-test-sshd-"))
        self.dir.chmod(0o755)
        self.port = free_port()
        self.user = f"djinn-t-{secrets.token_hex(4)}"
        self.password = secrets.token_urlsafe(12)
        self.home = self.dir / "home"
        self.proc: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> Sshd:
        subprocess.run(["useradd", "--no-create-home", "--home-dir", str(self.home),
                        "--shell", "/bin/sh", self.user], check=True)
        subprocess.run(["chpasswd"], input=f"{self.user}:{self.password}\n", text=True, check=True)
        pw = pwd.getpwnam(self.user)
        self.home.mkdir(0o755)
        os.chown(self.home, pw.pw_uid, pw.pw_gid)
        key = self.dir / "host_ed25519"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
        config = self.dir / "sshd_config"
        config.write_text(
            f"Port {self.port}\n"
            "ListenAddress 127.0.0.1\n"
            f"HostKey {key}\n"
            f"PidFile {self.dir / 'sshd.pid'}\n"
            f"AllowUsers {self.user}\n"
            "PermitRootLogin no\n"
            "PasswordAuthentication yes\n"
            "KbdInteractiveAuthentication no\n"
            "PubkeyAuthentication no\n"
            "UsePAM no\n"
            "UseDNS no\n"
            "Subsystem sftp internal-sftp\n"
            "LogLevel VERBOSE\n"
        )
        # The privilege separation directory the Debian package normally creates.
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
        self.proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(config)],
                                     stdout=subprocess.DEVNULL,
                                     stderr=open(self.dir / "sshd.log", "wb"))
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return self
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"sshd did not start:\n{self.log}")
                time.sleep(0.05)

    @property
    def log(self) -> str:
        path = self.dir / "sshd.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        if self.proc:
            self.proc.terminate()
            self.proc.wait(15)
        # --force: sessions of the user may not have exited yet.
        subprocess.run(["userdel", "--force", self.user], check=False, stderr=subprocess.DEVNULL)
        shutil.rmtree(self.dir, ignore_errors=True)
