"""The ssh driver end to end: the real worker against a real local sshd.

The sshd (tests/sshd.py) runs on this machine, so the tests can look at what
a build left on the "remote" host directly: files in the test user's home,
and leftover processes in /proc.
"""

from __future__ import annotations

import hashlib
import os
import pwd
import signal
import time
import uuid
from pathlib import Path

import pytest

from djinn import marker, processes_with
from djinn_worker.crypto import BlockCipher
from services import free_port
from sshd import Sshd

BLOCK = "0123456789abcdef"
KEY = b"-----BEGIN OPENSSH PRIVATE KEY-----\nnot really a key\n-----END OPENSSH PRIVATE KEY-----\n"


@pytest.fixture(scope="module")
def sshd():
    if os.getuid() != 0:
        pytest.skip("the test sshd needs root (a throwaway user that logs in with a password)")
    server = Sshd()
    try:
        yield server.start()
    finally:
        server.stop()


def ssh_worker(make_worker, sshd: Sshd, password: str | None = None, connect: str = "10s",
               **config):
    """A worker running the ssh driver as the test sshd's user; connect is ssh.timeout."""
    drivers = {"ssh": {"timeout": connect, "user": sshd.user,
                       "password": sshd.password if password is None else password}}
    return make_worker({"crypto": {"block": BLOCK}, **config}, drivers=drivers, driver="ssh")


def remote_temp(sshd: Sshd) -> set[Path]:
    """What the test user owns in /tmp (user ids are reused: compare, don't expect none)."""
    uid = pwd.getpwnam(sshd.user).pw_uid
    return {p for p in Path("/tmp").iterdir() if p.lstat().st_uid == uid}


def test_jobs_variables_objects_keys_and_artifacts(server, make_worker, sshd, tmp_path):
    ssh_worker(make_worker, sshd, artifacts={"limit": 1000})
    temp_before = remote_temp(sshd)
    user = server.user()
    data = os.urandom(300 * 1024 + 3)
    obj = server.add_object(user, "blob.bin", data, tmp_path / "stores" / "objects")
    tricky = "spaces 'single' \"double\" $HOME `date` \\ a=b\nsecond line"
    secret = BlockCipher(BLOCK.encode()).encrypt(KEY)
    build = server.queue_build(
        [("test", False, [
            ("env", 'printf "%s|" "$PLAIN" "$TRICKY"'),
            ("files", f"echo '{hashlib.sha256(data).hexdigest()}  data/blob.bin' | sha256sum -c\n"
                      'stat -c "%a %n" .ssh .ssh/id_deploy .ssh/config\n'
                      "head -c 5000 /dev/zero > big.out\nmkdir -p out\necho small > out/small.txt"),
        ])],
        user_id=user,
        driver={"type": "ssh", "address": sshd.address},
        variables=[("PLAIN", "value"), ("TRICKY", tricky)],
        objects=[("blob.bin", "data/blob.bin", obj)],
        keys=[("id_deploy", secret, "Host git.example.com", "/root/.ssh/id_deploy")],
        artifacts={"files": [("big.out", "big.out"), ("out/small.txt", "small.txt"),
                             ("missing.txt", "missing.txt")]},
    )
    row = server.wait(build.id, timeout=60)
    assert row["status"] == "passed", row["output"]
    create = server.job(build.jobs["create driver"])["output"]
    assert f"Established SSH connection to {sshd.address}" in create
    assert f"value|{tricky}|" in server.job(build.jobs["env"])["output"]
    files = server.job(build.jobs["files"])["output"]
    assert "data/blob.bin: OK" in files
    # /root/ in a manifest is the login user's home on the host.
    assert "700 .ssh\n600 .ssh/id_deploy\n600 .ssh/config\n" in files
    assert (sshd.home / ".ssh" / "id_deploy").read_bytes() == KEY
    assert "Host git.example.com" in (sshd.home / ".ssh" / "config").read_text()
    assert "Failed to collect artifact missing.txt: no such file" in files
    artifacts = {r["name"]: r for r in server.sql(
        "SELECT name, hash, size, sha256 FROM build_artifacts WHERE build_id = %s", build.id)}
    store = tmp_path / "stores" / "artifacts" / str(user)
    assert artifacts["big.out"]["size"] == 1000
    assert (store / artifacts["big.out"]["hash"]).read_bytes() == b"\0" * 1000
    assert (store / artifacts["small.txt"]["hash"]).read_bytes() == b"small\n"
    assert bytes(artifacts["small.txt"]["sha256"]) == hashlib.sha256(b"small\n").digest()
    placed = server.sql("SELECT placed FROM build_objects WHERE build_id = %s", build.id)
    assert placed == [{"placed": True}]
    # The job scripts (which hold the variables) are gone from the host.
    assert remote_temp(sshd) == temp_before


@pytest.mark.parametrize("schema", ["dist", "original"], indirect=True)
def test_failing_job_fails_the_build_and_addr_is_accepted(server, make_worker, sshd):
    ssh_worker(make_worker, sshd)
    build = server.queue_build(
        [("one", False, [("bad", "echo before\nexit 3\necho after"), ("skipped", "true")])],
        driver={"type": "ssh", "addr": sshd.address},
    )
    row = server.wait(build.id, timeout=60)
    assert row["status"] == "failed", row["output"]
    bad = server.job(build.jobs["bad"])
    assert bad["status"] == "failed"
    assert "before" in bad["output"] and "+ exit 3" in bad["output"]
    assert "after" not in bad["output"]
    assert server.job(build.jobs["skipped"])["output"] is None


def test_output_is_streamed_while_the_job_runs(server, make_worker, sshd, tmp_path):
    ssh_worker(make_worker, sshd)
    flag = sshd.dir / f"go-{uuid.uuid4().hex}"
    build = server.queue_build(
        [("live", False, [("live", f"echo first\nwhile [ ! -e {flag} ]; do sleep 0.1; done\n"
                                   "echo second")])],
        driver={"type": "ssh", "address": sshd.address},
    )
    deadline = time.monotonic() + 60
    while "first" not in (server.job(build.jobs["live"])["output"] or ""):
        assert time.monotonic() < deadline, server.build(build.id)["output"]
        time.sleep(0.1)
    assert "second" not in server.job(build.jobs["live"])["output"]
    flag.touch()
    row = server.wait(build.id, timeout=60)
    assert row["status"] == "passed", row["output"]
    assert "second" in server.job(build.jobs["live"])["output"]


def test_background_processes_die_with_their_job(server, make_worker, sshd):
    ssh_worker(make_worker, sshd)
    sleep = marker()
    build = server.queue_build([("bg", False, [("bg", f"sleep {sleep} &\necho started")])],
                               driver={"type": "ssh", "address": sshd.address})
    row = server.wait(build.id, timeout=60)
    assert row["status"] == "passed", row["output"]
    assert processes_with(f"sleep {sleep}") == []


def test_timeout_kills_the_remote_process_tree(server, make_worker, sshd):
    ssh_worker(make_worker, sshd, timeout="4s")
    sleep = marker()
    build = server.queue_build(
        [("slow", False, [("slow", f"sleep {sleep} &\n(sleep {sleep}; echo never) &\n"
                                   f"sleep {sleep}")])],
        driver={"type": "ssh", "address": sshd.address},
    )
    server.wait_job(build.jobs["slow"], timeout=30)
    deadline = time.monotonic() + 10
    while len(processes_with(f"sleep {sleep}")) < 3:
        assert time.monotonic() < deadline, processes_with(f"sleep {sleep}")
        time.sleep(0.1)
    started = time.monotonic()
    row = server.wait(build.id, timeout=60)
    assert row["status"] == "timed_out", row["output"]
    assert time.monotonic() - started < 15
    assert server.job(build.jobs["slow"])["status"] == "timed_out"
    assert processes_with(f"sleep {sleep}") == []


def test_unreachable_host_fails_with_one_clear_line(server, make_worker, sshd):
    ssh_worker(make_worker, sshd, connect="3s")
    address = f"127.0.0.1:{free_port()}"
    started = time.monotonic()
    build = server.queue_build(driver={"type": "ssh", "address": address})
    row = server.wait(build.id, timeout=60)
    assert row["status"] == "failed"
    assert 3 <= time.monotonic() - started < 20
    create = server.job(build.jobs["create driver"])["output"]
    lines = [line for line in create.splitlines() if line.startswith("Failed to create driver")]
    assert lines == [f"Failed to create driver: cannot connect to {address} within 3s: "
                     "[Errno 111] Connection refused"], create
    assert "Traceback" not in create


def test_missing_address_fails_clearly(server, make_worker, sshd):
    ssh_worker(make_worker, sshd)
    build = server.queue_build(driver={"type": "ssh"})
    row = server.wait(build.id, timeout=30)
    assert row["status"] == "failed"
    assert "Failed to create driver: the ssh driver needs an address (host:port) in the manifest" \
        in row["output"]


def test_wrong_password_is_not_retried(server, make_worker, sshd):
    ssh_worker(make_worker, sshd, password="wrong", connect="60s")
    build = server.queue_build(driver={"type": "ssh", "address": sshd.address})
    row = server.wait(build.id, timeout=30)
    assert row["status"] == "failed"
    assert f"Failed to create driver: cannot log in to {sshd.address} as {sshd.user}: " \
        "Authentication failed." in row["output"]


def test_killed_build_process_takes_its_remote_job_along(server, make_worker, sshd):
    worker = ssh_worker(make_worker, sshd)
    temp_before = remote_temp(sshd)
    sleep = marker()
    build = server.queue_build([("slow", False, [("slow", f"sleep {sleep} &\nsleep {sleep}")])],
                               driver={"type": "ssh", "address": sshd.address})
    server.wait_job(build.jobs["slow"], timeout=30)
    deadline = time.monotonic() + 10
    while len(processes_with(f"sleep {sleep}")) < 2:
        assert time.monotonic() < deadline, processes_with(f"sleep {sleep}")
        time.sleep(0.1)
    (child,) = worker.children()
    os.kill(child, signal.SIGKILL)
    assert server.wait(build.id, timeout=30)["status"] == "failed"
    deadline = time.monotonic() + 10
    while processes_with(f"sleep {sleep}"):
        assert time.monotonic() < deadline, processes_with(f"sleep {sleep}")
        time.sleep(0.1)
    # Only the build's empty directory is left: the script went with the job.
    (left,) = remote_temp(sshd) - temp_before
    assert list(left.iterdir()) == []
    left.rmdir()
