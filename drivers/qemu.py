"""The `qemu` driver: every build in a fresh virtual machine, reached over SSH.

The machine boots a copy-on-write overlay of the image in a temporary
directory, so the image itself is only ever read and whatever a build does
is thrown away with the overlay. Once booted, the machine is driven exactly
like an `ssh` host (this class is an SSHDriver): root, no password, on a
127.0.0.1 port QEMU forwards to the guest's port 22.

Two image forms are accepted:

- a self-booting QCOW2 disk (Djinn's own images). If its MBR holds no boot
  code it can only boot through UEFI, so it gets OVMF as firmware;
- a directory with `disk.qcow2`, `vmlinuz`, `initrd.img` and optionally
  `cmdline`, booted straight into that kernel (no bootloader, faster).

QEMU stays in the build process's group: if the build process is SIGKILLed,
the supervisor kills that group, and so the VM, and removes the temporary
directory it was told about. Nothing a build did can outlive it.
"""

from __future__ import annotations

import os
import posixpath
import re
import shutil
import signal
import socket
import subprocess
import tempfile
from djinn_worker.config import QemuConfig, host_arch

from .base import DriverError, NoTracker, Output, Tracker
from .ssh import SSHDriver

# The runner's 5-minute limit on driver creation normally ends a boot first.
BOOT_TIMEOUT = 300.0
DEFAULT_CMDLINE = "root=/dev/vda rw console=ttyS0"
UEFI_FIRMWARE = {"x86_64": "/usr/share/ovmf/OVMF.fd"}
# Another process may take the port between our choosing it and QEMU binding it.
_PORT_ATTEMPTS = 10
_CONSOLE_TAIL = 15
# How often the wait for QEMU's monitor looks at the kill flag.
_POLL = 0.2
# Firmware and kernels draw on the serial console with escape sequences.
_TERMINAL_CODES = re.compile(r"\x1b\[[0-9;=?]*[A-Za-z]|[\x00-\x08\x0b-\x1f\x7f]")


class QemuDriver(SSHDriver):
    name = "qemu"

    def __init__(self, build_id: int, manifest: dict, config: QemuConfig,
                 tracker: Tracker | None = None, image_path: str | None = None):
        """image_path is where the manifest's image name was found (None when
        there is no such image): the worker looks it up in its image stores
        and database before the driver is made."""
        self._session(build_id, "", "root", "", BOOT_TIMEOUT)
        name = manifest.get("image")
        if not isinstance(name, str) or not name:
            raise DriverError("the qemu driver needs an image in the manifest")
        if not image_name_ok(name):
            raise DriverError(f"image name {name!r} is refused: it must be relative, without '..'")
        if image_path is None or not os.path.exists(image_path):
            raise DriverError(f"image {name} not found")
        self.tracker = tracker or NoTracker()
        self.image = name
        self.image_path = image_path
        self.arch = host_arch()
        self.cpus = config.cpus
        self.memory = config.memory
        self.accel = config.accel
        self._proc: subprocess.Popen | None = None
        self._tmp = ""

    def create(self, out: Output) -> None:
        out.write(b"Running with QEMU driver...\n")
        out.write(f"Creating machine with arch {self.arch}...\n".encode())
        image = self.image_path
        self._tmp = tempfile.mkdtemp(prefix=f"djinn-qemu-{self.build_id}-")
        self.tracker.path(self._tmp)
        try:
            boot = self._boot_args(image)
            accel = _accel(self.accel)
            out.write(f"Booting machine with image {self.image} "
                      f"({accel}, {self.cpus} CPU, {self.memory} MiB)...\n".encode())
            self._start(boot, accel)
            self._connect()
        except DriverError as exc:
            raise DriverError(f"{exc}{self._keep_console()}") from None
        out.write(f"Established SSH connection to machine on {self.address}...\n".encode())

    def _boot_args(self, image: str) -> list[str]:
        """The disk overlay and how to boot it, for either image form."""
        overlay = os.path.join(self._tmp, "disk.qcow2")
        if os.path.isdir(image):
            disk = os.path.join(image, "disk.qcow2")
            for part in (disk, os.path.join(image, "vmlinuz"), os.path.join(image, "initrd.img")):
                if not os.path.isfile(part):
                    raise DriverError(f"image {self.image} has no {os.path.basename(part)}")
            cmdline_file = os.path.join(image, "cmdline")
            cmdline = DEFAULT_CMDLINE
            if os.path.isfile(cmdline_file):
                with open(cmdline_file) as fh:
                    cmdline = fh.read().strip() or DEFAULT_CMDLINE
            boot = ["-kernel", os.path.join(image, "vmlinuz"),
                    "-initrd", os.path.join(image, "initrd.img"), "-append", cmdline]
        else:
            disk, boot = image, self._firmware(image)
        _qemu_img("create", "-q", "-f", "qcow2", "-F", "qcow2",
                  "-b", os.path.realpath(disk), overlay)
        return boot + ["-drive", f"file={overlay},format=qcow2,if=virtio"]

    def _firmware(self, image: str) -> list[str]:
        """UEFI firmware for disks that cannot boot from a BIOS.

        A disk whose MBR holds no boot code but a GPT protective partition
        (type 0xEE) has nothing a BIOS could run; hybrid disks that carry both
        boot the default BIOS way.
        """
        mbr = os.path.join(self._tmp, "mbr")
        _qemu_img("dd", "-O", "raw", "bs=512", "count=1", f"if={image}", f"of={mbr}")
        with open(mbr, "rb") as fh:
            sector = fh.read(512)
        if len(sector) < 512 or any(sector[:440]) or sector[450] != 0xEE:
            return []
        firmware = UEFI_FIRMWARE.get(self.arch, "")
        if not os.path.isfile(firmware):
            raise DriverError(f"image {self.image} boots with UEFI, but no UEFI firmware for "
                              f"{self.arch} is installed ({firmware or 'none known'})")
        return ["-bios", firmware]

    def _start(self, boot: list[str], accel: str) -> None:
        """Start QEMU with SSH forwarded from a free port, choosing another
        port if that one was taken before QEMU could bind it.

        The port is only known to be QEMU's once its monitor greets us: QEMU
        binds the forwarded port before it starts any monitor, and exits if
        it cannot. Connecting earlier could reach another build's machine.
        """
        errors = os.path.join(self._tmp, "qemu.log")
        for _ in range(_PORT_ATTEMPTS):
            port = _free_port()
            ours, theirs = socket.socketpair()
            argv = [
                f"qemu-system-{self.arch}", "-name", f"djinn-build-{self.build_id}",
                "-nodefaults", "-no-user-config", "-display", "none",
                "-accel", accel, "-cpu", "host" if accel == "kvm" else "max",
                "-smp", str(self.cpus), "-m", str(self.memory),
                "-netdev", f"user,id=net0,hostfwd=tcp:127.0.0.1:{port}-:22",
                "-device", "virtio-net-pci,netdev=net0",
                "-serial", f"file:{os.path.join(self._tmp, 'console.log')}",
                "-chardev", f"socket,id=monitor,fd={theirs.fileno()}",
                "-mon", "chardev=monitor,mode=control",
            ] + boot
            with ours, theirs, open(errors, "wb") as stderr:
                try:
                    self._proc = subprocess.Popen(
                        argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                        stderr=stderr, pass_fds=[theirs.fileno()],
                    )
                except FileNotFoundError:
                    raise DriverError(f"{argv[0]} is not installed") from None
                theirs.close()
                if self._greeted(ours):
                    self.address = f"127.0.0.1:{port}"
                    return
            self._proc.wait()
            with open(errors, errors="replace") as fh:
                error = fh.read().strip()
            if "host forwarding" not in error:
                raise DriverError(f"{argv[0]} exited with status {self._proc.returncode}: {error}")
        raise DriverError(f"no free port to forward SSH to after {_PORT_ATTEMPTS} attempts")

    def _greeted(self, monitor: socket.socket) -> bool:
        """True once QEMU's monitor greets us, False if QEMU exited first."""
        monitor.settimeout(_POLL)
        while not self._killed:
            try:
                return monitor.recv(64).startswith(b'{"QMP"')
            except socket.timeout:
                pass
        raise DriverError("the build was stopped")

    def _check_alive(self) -> None:
        """While connecting: a machine that has stopped will never answer."""
        super()._check_alive()
        if self._proc is not None and self._proc.poll() is not None:
            with open(os.path.join(self._tmp, "qemu.log"), errors="replace") as fh:
                error = fh.read().strip()
            raise DriverError(f"the machine stopped while booting (qemu exit status "
                              f"{self._proc.returncode}){': ' + error if error else ''}")

    def _keep_console(self) -> str:
        """Save the boot console out of the temporary directory (which
        destroy() removes) and show its end: why a boot failed is in there."""
        console = os.path.join(self._tmp, "console.log")
        if not os.path.exists(console) or not os.path.getsize(console):
            return ""
        fd, kept = tempfile.mkstemp(prefix=f"djinn-build-{self.build_id}-console-", suffix=".log")
        os.close(fd)
        shutil.move(console, kept)
        with open(kept, errors="replace") as fh:
            tail = [_TERMINAL_CODES.sub("", line) for line in fh.read().splitlines()]
        return f"\nBoot console log: {kept}\n" + "".join(
            f"  {line}\n" for line in tail[-_CONSOLE_TAIL:] if line.strip())

    def kill(self) -> None:
        """Stopping the machine stops every process of the job at once."""
        super().kill()
        proc = self._proc
        if proc is not None and proc.returncode is None:
            try:
                os.kill(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def destroy(self) -> None:
        # No remote clean-up: the machine and its disk overlay are thrown away.
        self._close()
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
        if self._tmp:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = ""


def image_name_ok(name: str) -> bool:
    """Image names are paths inside the image stores: never absolute, no '..'."""
    return not (posixpath.isabs(name) or ".." in name.split("/") or "\0" in name)


def _accel(choice: str) -> str:
    """auto is KVM when this process may use /dev/kvm, else TCG (emulation)."""
    if choice != "auto":
        return choice
    try:
        os.close(os.open("/dev/kvm", os.O_RDWR))
    except OSError:
        return "tcg"
    return "kvm"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _qemu_img(*args: str) -> None:
    try:
        subprocess.run(["qemu-img", *args], check=True, capture_output=True, text=True)
    except FileNotFoundError:
        raise DriverError("qemu-img is not installed") from None
    except subprocess.CalledProcessError as exc:
        raise DriverError(f"qemu-img {args[0]} failed: {exc.stderr.strip()}") from None
