"""The offline runner end to end: the real `djinn` command on real drivers.

Every test runs the installed console script as a user would, in a project
directory of its own, with XDG_CONFIG_HOME and TMPDIR inside the test's
directory: the user's own driver.toml is never read, and whatever a build
leaves in the temporary directory is seen. No PostgreSQL or Redis is
started; the command must not even import their libraries.
"""

from __future__ import annotations

import hashlib
import io
import os
import pty
import re
import select
import signal
import subprocess
import sys
import tarfile
import threading
import time
import uuid
from pathlib import Path

import docker
import pytest

from djinn import processes_with, write_toml
from djinn_worker import manifest
from djinn_worker.drivers.docker import LABEL_BUILD
from docker_image import git_image
from qemu_image import link_tree

DJINN = str(Path(sys.executable).parent / "djinn")
EXAMPLE = Path(__file__).parent.parent / "dist" / "example.djinn.yml"
ENGINE = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
# Modules whose import would mean the command reaches for a server.
SERVER_MODULES = {"psycopg2", "redis", "smtplib"}
HEADER = re.compile(r"^==> (\S+): (.+)$", re.M)
FOOTER = re.compile(r"^<== (\S+): (.+) (\S+) in [0-9.ms]+$", re.M)
BOOT = 300  # seconds a qemu build may take to boot and run


class Project:
    """A directory with a manifest, where `djinn` is run as a user runs it."""

    def __init__(self, root: Path):
        self.root = root
        self.dir = root / "project"
        self.tmp = root / "tmp"
        self.config = root / "config"
        for path in (self.dir, self.tmp, self.config):
            path.mkdir()
        self.env = {**os.environ, "XDG_CONFIG_HOME": str(self.config), "TMPDIR": str(self.tmp)}
        self.env.pop("NO_COLOR", None)

    def manifest(self, text: str, name: str = ".djinn.yml") -> Path:
        path = self.dir / name
        path.write_text(text)
        return path

    def run(self, *args: str, timeout: float = 120, **env: str) -> subprocess.CompletedProcess:
        return subprocess.run([DJINN, *args], cwd=self.dir, env={**self.env, **env},
                              capture_output=True, text=True, timeout=timeout)

    def start(self, *args: str) -> Running:
        return Running(subprocess.Popen([DJINN, *args], cwd=self.dir, env=self.env,
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE))


class Running:
    """A djinn process whose output is read as it comes, to act on it mid-build."""

    def __init__(self, proc: subprocess.Popen):
        self.proc = proc
        self.stdout = b""
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for chunk in iter(lambda: self.proc.stdout.read1(65536), b""):
            self.stdout += chunk

    def wait_for(self, text: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while text.encode() not in self.stdout:
            assert self.proc.poll() is None, f"djinn exited before printing {text!r}:\n{self.text}"
            assert time.monotonic() < deadline, f"{text!r} not printed in {timeout}s:\n{self.text}"
            time.sleep(0.05)

    def finish(self, timeout: float = 60) -> int:
        code = self.proc.wait(timeout)
        self._reader.join(10)
        return code

    @property
    def text(self) -> str:
        return self.stdout.decode(errors="replace")


@pytest.fixture
def project(tmp_path) -> Project:
    return Project(tmp_path)


def jobs_run(stdout: str) -> list[tuple[str, str]]:
    return HEADER.findall(stdout)


def statuses(stdout: str) -> dict[str, str]:
    return {f"{stage}: {name}": status for stage, name, status in FOOTER.findall(stdout)}


def imported(stderr: str) -> set[str]:
    """Top-level modules in a PYTHONPROFILEIMPORTTIME report."""
    return {line.rsplit("|", 1)[1].strip().split(".")[0]
            for line in stderr.splitlines() if line.startswith("import time:") and "|" in line}


def object_dir(root: Path, size: int) -> tuple[Path, Path, bytes]:
    """An -objects directory holding blob.bin of random bytes, and where
    -artifacts will go: (objects, artifacts, the blob's content)."""
    objects, data = root / "objects", os.urandom(size)
    objects.mkdir()
    (objects / "blob.bin").write_bytes(data)
    return objects, root / "artifacts", data


def bare_repository(root: Path) -> Path:
    """A bare repository whose tag v1 has README "v1" and whose HEAD has "v2"."""
    work, bare = root / "work", root / "repo.git"
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.com"}

    def git(*args: str, cwd: Path = work) -> None:
        subprocess.run(["git", *args], cwd=cwd, env=env, check=True, capture_output=True)

    work.mkdir()
    git("init", "-q")
    (work / "README").write_text("v1\n")
    git("add", "README")
    git("commit", "-q", "-m", "one")
    git("tag", "v1")
    (work / "README").write_text("v2\n")
    git("commit", "-q", "-am", "two")
    git("clone", "-q", "--bare", str(work), str(bare), cwd=root)
    return bare


# The os driver: the build runs on this host.


def test_stages_in_order_with_env_allow_failures_and_the_output_path(project):
    project.manifest("""\
namespace: ignored/here
driver:
  type: os
env:
  - GREETING=from the manifest
  - KEPT=manifest value
stages:
  - build
  - test
  - deploy
allow_failures:
  - test
jobs:
  - stage: build
    commands:
      - echo "$GREETING|$KEPT"
      - printf 'a\\0b\\n'
  - stage: test
    commands:
      - exit 3
  - stage: test
    name: after the failure
    commands:
      - echo still running
  - stage: deploy
    commands:
      - echo deploying
""")
    result = project.run("-env", "GREETING=from the flag", PYTHONPROFILEIMPORTTIME="1")
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert jobs_run(out) == [("setup", "create driver"), ("build", "build.1"), ("test", "test.1"),
                             ("test", "after the failure"), ("deploy", "deploy.1")]
    assert statuses(out) == {
        "setup: create driver": "passed", "build: build.1": "passed",
        "test: test.1": "passed_with_failures", "test: after the failure": "passed",
        "deploy: deploy.1": "passed",
    }
    assert "\nfrom the flag|manifest value\n" in out
    assert "\na\u2400b\n" in out, "a NUL byte is shown as the worker stores it"
    assert "\nstill running\n" in out and "\ndeploying\n" in out
    assert out.endswith("Done. Run passed_with_failures\n")
    assert "\x1b[" not in out, "no colour when stdout is not a terminal"
    modules = imported(result.stderr)
    assert "djinn_worker" in modules and "yaml" in modules, "the import report is read"
    assert modules & SERVER_MODULES == set()
    assert list(project.tmp.iterdir()) == []


@pytest.mark.parametrize("manifest, ran, failed", [
    ("""\
driver: {type: os}
stages: [one, two]
jobs:
  - stage: one
    name: breaks
    commands: [echo before, "false", echo after]
  - stage: one
    commands: [echo never]
  - stage: two
    commands: [echo never]
""", [("setup", "create driver"), ("one", "breaks")], "one: breaks"),
    ("""\
driver: {type: os}
sources:
  - file:///nonexistent/djinn-test-repository.git
stages: [build]
jobs:
  - stage: build
    commands: [echo never]
""", [("setup", "create driver"), ("setup", "clone.1")], "setup: clone.1"),
])
def test_a_failed_job_or_clone_ends_the_build_with_status_1(project, manifest, ran, failed):
    project.manifest(manifest)
    result = project.run()
    assert result.returncode == 1, result.stdout + result.stderr
    assert jobs_run(result.stdout) == ran
    assert statuses(result.stdout)[failed] == "failed"
    assert "+ echo after" not in result.stdout and "\nnever\n" not in result.stdout
    assert result.stdout.endswith("Done. Run failed\n")


def test_objects_artifacts_and_sources_cloned_from_a_bare_repository(project, tmp_path):
    bare = bare_repository(tmp_path)
    objects, artifacts, data = object_dir(tmp_path, 300_000)
    project.manifest(f"""\
driver:
  type: os
objects:
  - blob.bin => /root/in/blob.bin
sources:
  - file://{bare} v1 => pinned
  - file://{bare}
stages: [build]
jobs:
  - stage: build
    commands:
      - cat pinned/README repo/README
      - mkdir out
      - cp in/blob.bin out/copy.bin
    artifacts:
      - out/copy.bin
      - pinned/README => readme-v1.txt
      - out/missing.txt
""")
    result = project.run("-objects", str(objects), "-artifacts", str(artifacts))
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert jobs_run(out) == [("setup", "create driver"), ("setup", "clone.1"), ("setup", "clone.2"),
                             ("build", "build.1")]
    assert "Placing object blob.bin => /root/in/blob.bin\n" in out
    assert "\nv1\nv2\n" in out, "the pinned clone is at the tag, the other at HEAD"
    assert (artifacts / "copy.bin").read_bytes() == data
    assert (artifacts / "readme-v1.txt").read_text() == "v1\n"
    assert f"Stored artifact copy.bin (300000 bytes, sha256 {hashlib.sha256(data).hexdigest()})" in out
    assert "Failed to collect artifact out/missing.txt: no such file\n" in out
    assert sorted(p.name for p in artifacts.iterdir()) == ["copy.bin", "readme-v1.txt"]


def test_stage_runs_only_that_stage(project):
    project.manifest("""\
driver: {type: os}
stages: [first, second, third]
jobs:
  - {stage: first, commands: [echo one]}
  - {stage: second, commands: [echo two]}
  - {stage: second, commands: [echo two again]}
  - {stage: third, commands: [echo three]}
""")
    result = project.run("--stage", "second")
    assert result.returncode == 0, result.stdout + result.stderr
    assert jobs_run(result.stdout) == [("setup", "create driver"), ("second", "second.1"),
                                       ("second", "second.2")]
    unknown = project.run("-stage", "fourth")
    assert unknown.returncode == 2
    assert unknown.stderr == ("djinn: -stage: .djinn.yml has no stage 'fourth'; "
                              "its stages are first, second, third\n")
    assert unknown.stdout == ""


def one_job(stage: str, *commands: str) -> str:
    """A manifest of one os-driver job in one stage."""
    listed = "".join(f"      - {command}\n" for command in commands)
    return f"driver: {{type: os}}\nstages: [{stage}]\njobs:\n  - stage: {stage}\n    commands:\n{listed}"


def sleeper(marker: str) -> str:
    return one_job("wait", f"sleep {marker} &", "echo started", f"sleep {marker}")


def test_timeout_stops_the_build_with_status_124(project):
    marker = str(1000 + uuid.uuid4().int % 1000)  # a sleep no other test runs
    project.manifest(sleeper(marker))
    started = time.monotonic()
    result = project.run("-timeout", "2s")
    assert result.returncode == 124, result.stdout + result.stderr
    assert time.monotonic() - started < 30
    assert statuses(result.stdout)["wait: wait.1"] == "timed_out"
    assert result.stdout.endswith("Done. Run timed_out\n")
    assert processes_with(f"sleep {marker}") == []
    assert list(project.tmp.iterdir()) == []


def test_ctrl_c_kills_the_build_with_status_130_and_leaves_nothing(project):
    marker = str(2000 + uuid.uuid4().int % 1000)
    project.manifest(sleeper(marker))
    running = project.start()
    running.wait_for("started\n", timeout=30)
    deadline = time.monotonic() + 10
    while len(processes_with(f"sleep {marker}")) < 2:
        assert time.monotonic() < deadline, "the job's two sleeps did not start"
        time.sleep(0.05)
    assert len(list(project.tmp.iterdir())) == 1, "the build directory is in TMPDIR"
    running.proc.send_signal(signal.SIGINT)
    assert running.finish() == 130, running.text
    assert statuses(running.text)["wait: wait.1"] == "killed"
    assert running.text.endswith("Done. Run killed\n")
    assert processes_with(f"sleep {marker}") == []
    assert list(project.tmp.iterdir()) == []


def test_a_reader_that_goes_away_stops_the_build_and_leaves_nothing(project):
    """`djinn | head`: once nobody reads its output, the build is stopped as
    Ctrl-C stops it, and djinn exits as SIGPIPE would end it, without a
    traceback."""
    marker = str(3000 + uuid.uuid4().int % 1000)
    project.manifest(one_job("talk", f"sleep {marker} &",
                             "while true; do echo line; sleep 0.01; done"))
    proc = subprocess.Popen([DJINN], cwd=project.dir, env=project.env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    while proc.stdout.readline() != b"line\n":
        assert proc.poll() is None, proc.stderr.read().decode()
    proc.stdout.close()
    assert proc.wait(60) == 128 + signal.SIGPIPE
    assert proc.stderr.read() == b""
    assert processes_with(f"sleep {marker}") == []
    assert list(project.tmp.iterdir()) == []


@pytest.mark.parametrize("manifest, error", [
    ("driver:\n  type: os\nstages: [a]\njobs:\n  - stage: a\n    commands:\n      - echo: hi\n",
     ".djinn.yml:7: jobs[0].commands[0]: must be a string, not a mapping"),
    ("driver: {type: os}\njobs: []\n",
     ".djinn.yml:1: stages: is required"),
    ("driver: {type: os}\nstage: [a]\njobs: []\n",
     ".djinn.yml:2: stage: unknown key"),
    ("driver: {type: os}\nenv:\n  - A=1\n  - NOEQUALS\nstages: [a]\njobs: []\n",
     ".djinn.yml:4: env[1]: 'NOEQUALS' is not KEY=VALUE"),
    ("driver:\n  type: podman\nstages: [a]\njobs: []\n",
     ".djinn.yml:2: driver.type: unknown driver 'podman': use one of docker, qemu, ssh, os"),
    ("driver:\n  type: docker\n  image: debian\nstages: [a]\njobs: []\n",
     '.djinn.yml:2: driver: docker driver: the manifest must set "workspace" to an absolute path'),
    ("driver: {type: qemu, image: debian/nowhere}\nstages: [a]\njobs: []\n",
     ".djinn.yml:1: driver: image debian/nowhere not found"),
    ("driver: {type: os}\nstages: [a, b, a]\njobs: []\n",
     ".djinn.yml:2: stages[2]: stage 'a' is listed twice"),
    ("driver: {type: os}\nstages: [a]\njobs:\n  - commands: [true]\n",
     ".djinn.yml:4: jobs[0].stage: is required"),
    ("driver: {type: os}\nstages: [a]\njobs:\n  - stage: a\n    artifacts: [out.bin =>]\n",
     ".djinn.yml:5: jobs[0].artifacts[0]: 'out.bin =>' has nothing after =>"),
    ("driver: {type: os}\nsources: [a b c]\nstages: [a]\njobs: []\n",
     ".djinn.yml:2: sources[0]: 'a b c' is not URL [ref] [=> directory]"),
    ("driver: {type: os}\nstages: [a]\njobs: [\n",
     ".djinn.yml:4: not valid YAML"),
])
def test_manifest_errors_name_the_line_and_the_key(project, manifest, error):
    project.manifest(manifest)
    result = project.run()
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.startswith(f"djinn: {error}"), result.stderr
    assert result.stdout == "", "nothing ran"


def test_a_job_of_no_stage_is_ignored_with_a_warning(project):
    project.manifest("driver: {type: os}\nstages: [a]\njobs:\n  - {stage: a, commands: [echo a]}\n"
                     "  - {stage: typo, commands: [echo b]}\n")
    result = project.run()
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stderr == ("djinn: warning: .djinn.yml:5: jobs[1].stage: "
                             "no stage 'typo' in stages; the job is ignored\n")
    assert jobs_run(result.stdout) == [("setup", "create driver"), ("a", "a.1")]


@pytest.mark.parametrize("args, driver_toml, error", [
    (["-manifest", "other.yml"], None, "other.yml: manifest not found (set its path with -manifest)"),
    (["-driver", "missing.toml"], None, "missing.toml: driver config not found (set its path with -driver)"),
    ([], "[docker]\nhots = 'x'\n", "driver.toml: docker.hots: unknown key"),
    (["-timeout", "5 minutes"], None, "-timeout: bad duration '5 minutes'"),
    (["-env", "NOEQUALS"], None, "-env: 'NOEQUALS' is not KEY=VALUE"),
])
def test_flag_and_config_errors_exit_2(project, args, driver_toml, error):
    project.manifest("driver: {type: os}\nstages: [a]\njobs: [{stage: a, commands: [true]}]\n")
    if driver_toml is not None:
        (project.config / "djinn").mkdir()
        (project.config / "djinn" / "driver.toml").write_text(driver_toml)
    result = project.run(*args)
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.startswith("djinn: ") and error in result.stderr, result.stderr
    assert result.stdout == ""


def test_colour_on_a_terminal(project):
    project.manifest("driver: {type: os}\nstages: [a]\njobs: [{stage: a, commands: [true, echo hi]}]\n")
    leader, follower = pty.openpty()
    proc = subprocess.Popen([DJINN], cwd=project.dir, env=project.env,
                            stdin=subprocess.DEVNULL, stdout=follower, stderr=subprocess.PIPE)
    os.close(follower)
    seen = b""
    while True:
        ready, _, _ = select.select([leader], [], [], 30)
        assert ready, f"no output from djinn on its terminal: {seen!r}"
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # EIO: the terminal's last writer is gone
            break
        if not chunk:
            break
        seen += chunk
    os.close(leader)
    assert proc.wait(30) == 0, proc.stderr.read()
    assert b"\x1b[1m==> a: a.1\x1b[0m" in seen
    assert b"\x1b[32mpassed\x1b[0m in " in seen


def test_the_example_manifest_in_dist_reads():
    example = manifest.load(str(EXAMPLE))
    assert example.warnings == []
    assert example.driver == {"type": "docker", "image": "golang:1.22", "workspace": "/go"}
    assert example.stages == ["test", "make"] and example.allow_failures == ["test"]
    assert [(job.stage, job.name) for job in example.jobs] == [("test", "test.1"), ("make", "build")]
    assert example.jobs[1].artifacts == [("mdsrv/bin/mdsrv", "mdsrv"), ("mdsrv/go.sum", "mdsrv.sum")]
    assert example.sources == [manifest.Source("https://github.com/andrewpillar/mdsrv.git",
                                               "v1.0.0", "mdsrv")]


def test_version():
    for flag in ("-version", "--version"):
        result = subprocess.run([DJINN, flag], capture_output=True, text=True, timeout=30)
        assert result.returncode == 0
        assert re.fullmatch(r"djinn \d+\.\d+\.\d+\n", result.stdout)


# The docker driver: builds in containers of the local engine.


@pytest.fixture(scope="module")
def engine():
    client = docker.DockerClient(base_url=ENGINE, timeout=30)
    yield client
    client.close()


@pytest.fixture
def docker_project(project, engine):
    (project.config / "djinn").mkdir()
    write_toml(project.config / "djinn" / "driver.toml", {"docker": {"host": ENGINE}})
    return project


@pytest.fixture
def repository_image(engine, tmp_path):
    """The git test image with a bare repository at /srv/repo.git, removed after the test."""
    bare = bare_repository(tmp_path)
    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode="w") as tar:
        tar.add(bare, arcname="srv/repo.git")
    helper = engine.containers.create(git_image(engine), ["true"])
    try:
        helper.put_archive("/", archive.getvalue())
        name = f"djinn-worker-test/offline-repo:{uuid.uuid4().hex[:12]}"
        repository, tag = name.split(":")
        helper.commit(repository, tag)
    finally:
        helper.remove(force=True)
    yield name
    engine.images.remove(name, force=True)


def leftovers(engine, build_id: int) -> list:
    labels = {"label": [f"{LABEL_BUILD}={build_id}"]}
    return engine.containers.list(all=True, filters=labels) + engine.volumes.list(filters=labels)


def test_docker_build_with_objects_artifacts_and_a_source(docker_project, engine, repository_image,
                                                          tmp_path):
    objects, artifacts, data = object_dir(tmp_path, 200_000)
    docker_project.manifest(f"""\
driver:
  type: docker
  image: {repository_image}
  workspace: /go
env:
  - GREETING=hello from docker
objects:
  - blob.bin => in/blob.bin
sources:
  - file:///srv/repo.git v1 => src
stages: [build, test]
allow_failures: [test]
jobs:
  - stage: build
    commands:
      - echo "$GREETING in $(pwd)"
      - cat src/README
      - cp in/blob.bin copy.bin
    artifacts:
      - copy.bin => from-docker.bin
  - stage: test
    commands:
      - exit 4
""")
    running = docker_project.start("-objects", str(objects), "-artifacts", str(artifacts))
    assert running.finish(timeout=120) == 0, running.text + running.proc.stderr.read().decode()
    out = running.text
    assert jobs_run(out) == [("setup", "create driver"), ("setup", "clone.1"), ("build", "build.1"),
                             ("test", "test.1")]
    assert f"Using Driver image {repository_image} - " in out
    assert "\nhello from docker in /go\n+ cat src/README\nv1\n" in out, "the clone is at the tag"
    assert statuses(out)["test: test.1"] == "passed_with_failures"
    assert (artifacts / "from-docker.bin").read_bytes() == data
    assert out.endswith("Done. Run passed_with_failures\n")
    assert leftovers(engine, running.proc.pid) == []
    assert imported(running.proc.stderr.read().decode()) & SERVER_MODULES == set()


def test_docker_ctrl_c_removes_the_container_and_volume(docker_project, engine, repository_image):
    docker_project.manifest(f"""\
driver: {{type: docker, image: {repository_image}, workspace: /go}}
stages: [wait]
jobs:
  - {{stage: wait, commands: [echo started, sleep 300]}}
""")
    running = docker_project.start()
    running.wait_for("started\n", timeout=60)
    assert len(leftovers(engine, running.proc.pid)) >= 2, "the job's container and the volume exist"
    running.proc.send_signal(signal.SIGINT)
    assert running.finish() == 130, running.text
    assert running.text.endswith("Done. Run killed\n")
    assert leftovers(engine, running.proc.pid) == []


# The qemu driver: one boot of the cached test image.


@pytest.fixture
def qemu_project(project, vm_images, tmp_path):
    """driver.toml for TCG; the kernel-boot image as the worker's base image
    debian/kernel and, as the original offline runner laid disks out, as
    x86_64/debian/offline."""
    disks = tmp_path / "disks"
    link_tree(vm_images / "kernel", disks / "_base" / "x86_64" / "debian" / "kernel")
    link_tree(vm_images / "kernel", disks / "x86_64" / "debian" / "offline")
    (project.config / "djinn").mkdir()
    write_toml(project.config / "djinn" / "driver.toml",
               {"qemu": {"disks": str(disks), "cpus": 1, "memory": 512, "accel": "tcg"}})
    return project


def test_qemu_build_then_ctrl_c_leaves_no_vm(qemu_project, tmp_path):
    objects, artifacts, data = object_dir(tmp_path, 100_000)
    qemu_project.manifest(f"""\
driver:
  type: qemu
  image: debian/kernel
env:
  - GREETING=hello from the vm
objects:
  - blob.bin => /root/data/blob.bin
stages: [check, wait]
jobs:
  - stage: check
    commands:
      - cat /etc/djinn-test-image
      - echo "$GREETING"
      - echo '{hashlib.sha256(data).hexdigest()}  /root/data/blob.bin' | sha256sum -c
    artifacts:
      - /root/data/blob.bin => back.bin
  - stage: wait
    commands:
      - echo started
      - sleep 1000
""")
    running = qemu_project.start("-objects", str(objects), "-artifacts", str(artifacts))
    running.wait_for("started\n", timeout=BOOT)
    assert processes_with(str(qemu_project.tmp)), "the VM runs with its overlay in TMPDIR"
    running.proc.send_signal(signal.SIGINT)
    assert running.finish() == 130, running.text
    out = running.text
    assert "Booting machine with image debian/kernel (tcg, 1 CPU, 512 MiB)" in out
    assert "djinn-worker test image" in out
    assert "\nhello from the vm\n" in out
    assert "/root/data/blob.bin: OK" in out
    assert statuses(out)["check: check.1"] == "passed"
    assert (artifacts / "back.bin").read_bytes() == data
    assert out.endswith("Done. Run killed\n")
    assert processes_with(str(qemu_project.tmp)) == []
    assert list(qemu_project.tmp.iterdir()) == []


def test_qemu_image_in_the_original_layout_and_a_timeout_while_booting(qemu_project):
    qemu_project.manifest("driver: {type: qemu, image: debian/offline}\nstages: [a]\n"
                          "jobs: [{stage: a, commands: [true]}]\n")
    result = qemu_project.run("-timeout", "2s")
    assert result.returncode == 124, result.stdout + result.stderr
    assert "Booting machine with image debian/offline" in result.stdout
    assert result.stdout.endswith("Done. Run timed_out\n")
    assert processes_with(str(qemu_project.tmp)) == []
