"""The qemu driver end to end: the real worker booting real virtual machines.

The images come from tests/images/build-qemu-image.sh (a small Debian with
sshd), built on first use and cached outside the repository. KVM does not
work on the CI machines, so every VM is emulated (accel = "tcg") and takes
some 20-60 seconds to boot: each test boots as few machines as it can and
checks many things in each build.

The worker runs with TMPDIR pointing into the test's own directory, so the
QEMU processes and temporary files of a test are exactly those whose paths
lie below it.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import signal
import socket
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from djinn import processes_with
from djinn_worker.config import QemuConfig
from djinn_worker.crypto import BlockCipher
from djinn_worker.drivers import qemu
from qemu_image import link_tree

BLOCK = "0123456789abcdef"
KEY = b"-----BEGIN OPENSSH PRIVATE KEY-----\nnot really a key\n-----END OPENSSH PRIVATE KEY-----\n"
BOOT = 300  # seconds a test waits for a build that boots one machine


@pytest.fixture
def vm(tmp_path, monkeypatch, make_worker, vm_images):
    """Starts a qemu worker; base images debian/kernel and debian/selfboot."""
    disks = tmp_path / "disks"
    link_tree(vm_images / "kernel", disks / "_base" / "x86_64" / "debian" / "kernel")
    link_tree(vm_images / "selfboot.qcow2", disks / "_base" / "x86_64" / "debian" / "selfboot")
    temp = tmp_path / "tmp"
    temp.mkdir()
    monkeypatch.setenv("TMPDIR", str(temp))

    def start(**config):
        settings = {"disks": str(disks), "cpus": 1, "memory": 512, "accel": "tcg"}
        return make_worker({"timeout": "10m", "crypto": {"block": BLOCK}, **config},
                           drivers={"qemu": settings}, driver="qemu-x86_64")

    start.temp = temp
    start.leftovers = lambda: processes_with(str(temp))
    return start


def sha256(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def port_of(server, build) -> int:
    create = server.job(build.jobs["create driver"])["output"]
    return int(re.search(r"Established SSH connection to machine on 127\.0\.0\.1:(\d+)", create)[1])


def test_build_in_a_vm_with_inputs_outputs_and_a_failure(server, vm, vm_images, tmp_path):
    vm(artifacts={"limit": 0})
    disk = vm_images / "kernel" / "disk.qcow2"
    before = sha256(disk)
    user = server.user()
    data = os.urandom(1024 * 1024 + 5)
    obj = server.add_object(user, "blob.bin", data, tmp_path / "stores" / "objects")
    tricky = "spaces 'single' \"double\" $HOME `date` \\ a=b\nsecond line"
    build = server.queue_build(
        [
            ("test", False, [("check", (
                "cat /etc/djinn-test-image\n"
                'printf "%s|" "$PLAIN" "$TRICKY"\n'
                f"echo '{hashlib.sha256(data).hexdigest()}  /root/data/blob.bin' | sha256sum -c\n"
                'stat -c "%a %n" /root/.ssh /root/.ssh/id_deploy /root/.ssh/config\n'
                "grep -q 'Host git.example.com' /root/.ssh/config\n"
                "sha256sum /root/.ssh/id_deploy\n"
                "head -c 300000 /dev/urandom > out.bin\nsha256sum out.bin"
            ))]),
            ("fail", False, [("bad", "echo before\nexit 3"), ("never", "echo never")]),
        ],
        user_id=user,
        driver={"type": "qemu", "image": "debian/kernel"},
        variables=[("PLAIN", "value"), ("TRICKY", tricky)],
        objects=[("blob.bin", "data/blob.bin", obj)],
        keys=[("id_deploy", BlockCipher(BLOCK.encode()).encrypt(KEY), "Host git.example.com",
               "/root/.ssh/id_deploy")],
        artifacts={"check": [("/root/out.bin", "out.bin")]},
    )
    row = server.wait(build.id, timeout=BOOT)
    assert row["status"] == "failed", row["output"]
    create = server.job(build.jobs["create driver"])
    assert create["status"] == "passed"
    assert "Running with QEMU driver..." in create["output"]
    assert "Booting machine with image debian/kernel (tcg, 1 CPU, 512 MiB)" in create["output"]
    check = server.job(build.jobs["check"])
    assert check["status"] == "passed", check["output"]
    out = check["output"]
    assert "djinn-worker test image" in out
    assert f"value|{tricky}|" in out
    assert "/root/data/blob.bin: OK" in out
    assert "700 /root/.ssh\n600 /root/.ssh/id_deploy\n600 /root/.ssh/config\n" in out
    assert hashlib.sha256(KEY).hexdigest() in out
    artifact = server.sql("SELECT hash, size, sha256 FROM build_artifacts WHERE build_id = %s",
                          build.id)[0]
    stored = (tmp_path / "stores" / "artifacts" / str(user) / artifact["hash"]).read_bytes()
    assert artifact["size"] == len(stored) == 300000
    assert f"{hashlib.sha256(stored).hexdigest()}  out.bin" in out
    bad = server.job(build.jobs["bad"])
    assert bad["status"] == "failed" and "+ exit 3" in bad["output"]
    assert server.job(build.jobs["never"])["output"] is None
    assert row["output"].endswith("Done. Run failed\n")
    # The machine, its overlay and its files are gone; the image is untouched.
    assert vm.leftovers() == []
    assert list(vm.temp.iterdir()) == []
    assert sha256(disk) == before


def test_two_builds_at_once_then_a_kill(server, vm, vm_images, tmp_path, redis_server):
    """Two machines boot side by side on their own ports: a user's
    self-booting image found through the build's namespace, and a base image
    booted by its kernel. The second one is then killed in a job."""
    vm(parallelism=2)
    owner, member = server.user(), server.user()
    namespace = server.sql("INSERT INTO namespaces (user_id, name, path, level) "
                           "VALUES (%s, 'team', 'team', 1) RETURNING id", owner)[0]["id"]
    digest = uuid.uuid4().hex
    server.sql("INSERT INTO images (user_id, author_id, namespace_id, driver, hash, name) "
               "VALUES (%s, %s, %s, 'qemu', %s, 'team-image')", owner, owner, namespace, digest)
    uploads = tmp_path / "stores" / "images" / "qemu"
    link_tree(vm_images / "selfboot.qcow2", uploads / str(owner) / digest)
    uploaded = server.queue_build([("test", False, [("show", "cat /proc/cmdline\nsleep 3")])],
                                  user_id=member, namespace_id=namespace,
                                  driver={"type": "qemu", "image": "team-image"})
    base = server.queue_build([("test", False, [("show", "cat /proc/cmdline\nsleep 3")]),
                               ("slow", False, [("slow", "echo waiting\nsleep 1000")])],
                              driver={"type": "qemu", "image": "debian/kernel"})
    assert server.wait(uploaded.id, timeout=BOOT)["status"] == "passed"
    server.wait_job(base.jobs["slow"], timeout=BOOT)
    assert "root=/dev/vda2" in server.job(uploaded.jobs["show"])["output"]  # booted via its ESP
    assert "root=/dev/vda " in server.job(base.jobs["show"])["output"]
    assert port_of(server, uploaded) != port_of(server, base)
    creates = [server.job(b.jobs["create driver"]) for b in (uploaded, base)]
    assert max(c["started_at"] for c in creates) < min(c["finished_at"] for c in creates), \
        "the two machines booted at the same time"

    redis_server.client().publish(f"kill-{base.id}", base.secret)
    row = server.wait(base.id, timeout=60)
    assert row["status"] == "killed", row["output"]
    assert server.job(base.jobs["slow"])["status"] == "killed"
    assert vm.leftovers() == []
    assert list(vm.temp.iterdir()) == []


def test_timeout_while_booting_leaves_nothing(server, vm):
    vm(timeout="12s")
    started = time.monotonic()
    build = server.queue_build(driver={"type": "qemu", "image": "debian/selfboot"})
    row = server.wait(build.id, timeout=60)
    assert row["status"] == "timed_out", row["output"]
    assert time.monotonic() - started < 30
    create = server.job(build.jobs["create driver"])["output"]
    console = Path(re.search(r"Boot console log: (\S+)", create)[1])
    assert console.parent == vm.temp and console.stat().st_size > 0
    assert vm.leftovers() == []
    assert list(vm.temp.iterdir()) == [console]


def test_killed_build_process_takes_its_vm_along(server, vm):
    worker = vm()
    build = server.queue_build(driver={"type": "qemu", "image": "debian/kernel"})
    deadline = time.monotonic() + 60
    while not [p for p in vm.leftovers() if "qemu-system-x86_64" in p]:
        assert time.monotonic() < deadline, "qemu did not start"
        time.sleep(0.1)
    (child,) = worker.children()
    os.kill(child, signal.SIGKILL)
    row = server.wait(build.id, timeout=60)
    assert row["status"] == "failed"
    deadline = time.monotonic() + 15
    while vm.leftovers() or list(vm.temp.iterdir()):
        assert time.monotonic() < deadline, (vm.leftovers(), list(vm.temp.iterdir()))
        time.sleep(0.1)


def test_a_taken_port_is_given_up_for_another(monkeypatch, vm_images, tmp_path):
    """Another process holds the first port chosen (twice): QEMU cannot bind
    it, and the driver, reading why QEMU exited, boots with another port."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        choices = [port, port]
        free = qemu._free_port
        monkeypatch.setattr(qemu, "_free_port", lambda: choices.pop() if choices else free())
        driver = qemu.QemuDriver(1, {"image": "debian/kernel"},
                                 QemuConfig(disks=str(vm_images), memory=512, accel="tcg"),
                                 image_path=str(vm_images / "kernel"))
        output = io.BytesIO()
        try:
            driver.create(output)
            assert driver.run("#!/bin/sh\necho booted\n", {}, output) == 0
        finally:
            driver.destroy()
    assert choices == []
    assert "Established SSH connection to machine on 127.0.0.1:" in output.getvalue().decode()
    assert driver.address != f"127.0.0.1:{port}"
    assert output.getvalue().endswith(b"booted\n")
    assert processes_with(str(tmp_path)) == []
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("image, line", [
    ("nope/nope", "image nope/nope not found"),
    ("../../../etc", "image name '../../../etc' is refused"),
    ("/var/cache/djinn-worker-tests/qemu/selfboot.qcow2", "is refused: it must be relative"),
])
def test_bad_image_names_fail_clearly(server, vm, image, line):
    vm()
    build = server.queue_build(driver={"type": "qemu", "image": image})
    row = server.wait(build.id, timeout=60)
    assert row["status"] == "failed"
    assert line in server.job(build.jobs["create driver"])["output"]
    assert vm.leftovers() == []
