"""The docker driver end to end: the real worker process against a real dockerd.

Builds run in a busybox image imported locally (tests/docker_image.py), so no
registry is needed. After every build the tests ask the engine, by label,
whether any container or volume of the build is left.
"""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import threading
import time
import uuid

import docker
import pytest

from djinn_worker.crypto import BlockCipher
from djinn_worker.drivers.docker import LABEL_BUILD, LABEL_WORKER
from docker_image import busybox_image

ENGINE = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
WORKSPACE = "/go"
BLOCK = "0123456789abcdef"


def identity(queue: str) -> str:
    """The worker identity djinn-worker labels its containers with (WorkerConfig.identity)."""
    return f"{socket.gethostname()}:{queue}"


def _connect() -> docker.DockerClient:
    try:
        client = docker.DockerClient(base_url=ENGINE, timeout=30)
        client.ping()
        return client
    except docker.errors.DockerException as exc:
        message = (f"no Docker engine at {ENGINE} ({exc}); run `.ci/setup test` as root "
                   "to install docker.io and start dockerd")
        if os.environ.get("CI"):
            raise RuntimeError(f"CI must run the docker tests: {message}") from None
        pytest.skip(message, allow_module_level=True)


ENGINE_CLIENT = _connect()


@pytest.fixture(scope="module")
def image() -> str:
    return busybox_image(ENGINE_CLIENT)


@pytest.fixture
def driver(image):
    return {"type": "docker", "image": image, "workspace": WORKSPACE}


@pytest.fixture
def start(make_worker):
    """make_worker for the docker driver, with the engine under test."""
    def start_docker(config: dict | None = None, docker_config: dict | None = None):
        return make_worker(config, drivers={"docker": {"host": ENGINE, **(docker_config or {})}},
                           driver="docker")
    return start_docker


def _labels(server, build_id: int | None) -> dict:
    labels = [f"{LABEL_WORKER}={identity(server.queue)}"]
    if build_id is not None:
        labels.append(f"{LABEL_BUILD}={build_id}")
    return {"label": labels}


def containers(server, build_id: int | None = None, **filters) -> list:
    """This test worker's containers (of one build), as the engine has them."""
    return ENGINE_CLIENT.containers.list(all=True, filters={**_labels(server, build_id), **filters})


def leftovers(server, build_id: int | None = None) -> list:
    return containers(server, build_id) + ENGINE_CLIENT.volumes.list(filters=_labels(server, build_id))


def assert_clean(server, build_id: int) -> None:
    assert leftovers(server, build_id) == [], "containers or volumes of the build are left"


def output_of(server, job_id: int) -> str:
    return server.job(job_id)["output"] or ""


def wait_output(server, job_id: int, text: str, timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    while text not in output_of(server, job_id):
        assert time.monotonic() < deadline, f"{text!r} not in the job's output after {timeout}s"
        time.sleep(0.05)
    return server.job(job_id)


def test_passing_build(server, start, driver, image):
    start()
    build = server.queue_build([("test", False, [("hello", "echo hello world")])], driver=driver)
    row = server.wait(build.id, timeout=60)
    assert row["status"] == "passed", row["output"]
    create = output_of(server, build.jobs["create driver"])
    image_id = ENGINE_CLIENT.images.get(image).id
    assert f"Using Driver image {image} - {image_id}\n" in create
    assert "Pulling" not in create, "an image the engine has is not pulled"
    assert output_of(server, build.jobs["hello"]) == "+ echo hello world\nhello world\n"
    assert row["output"].endswith("Done. Run passed\n")
    assert_clean(server, build.id)


def test_failing_build(server, start, driver):
    start()
    build = server.queue_build([
        ("one", False, [("bad", "echo before\necho to stderr >&2\nexit 3\necho after"),
                        ("skipped", "true")]),
    ], driver=driver)
    row = server.wait(build.id, timeout=60)
    assert row["status"] == "failed"
    bad = output_of(server, build.jobs["bad"])
    assert "before\n+ echo to stderr\nto stderr\n+ exit 3\n" in bad
    assert "after" not in bad
    assert server.job(build.jobs["skipped"])["status"] == "failed"
    assert_clean(server, build.id)


def test_workspace_persists_between_jobs(server, start, driver):
    start()
    build = server.queue_build([
        ("make", False, [("write", "echo kept > file\necho lost > /tmp/outside\nmkdir -p sub/dir")]),
        ("check", False, [("read", "pwd\ncat file\ntest -d sub/dir\ntest ! -e /tmp/outside")]),
    ], driver=driver)
    row = server.wait(build.id, timeout=60)
    assert row["status"] == "passed", row["output"]
    read = output_of(server, build.jobs["read"])
    assert f"+ pwd\n{WORKSPACE}\n+ cat file\nkept\n" in read
    assert_clean(server, build.id)


def test_variables_are_the_jobs_environment(server, start, driver):
    start()
    tricky = "spaces and 'quotes' \"double\" a=b $HOME `x`\nsecond line"
    build = server.queue_build(
        [("env", False, [("show", 'printf "%s|" "$PLAIN" "$TRICKY"')])],
        driver=driver, variables=[("PLAIN", "value"), ("TRICKY", tricky)],
    )
    row = server.wait(build.id, timeout=60)
    assert row["status"] == "passed", row["output"]
    assert f"value|{tricky}|" in output_of(server, build.jobs["show"])


def test_objects_and_keys_are_placed_with_modes(server, start, driver, tmp_path):
    start({"crypto": {"block": BLOCK}})
    user = server.user()
    content = os.urandom(200_000)
    objects = []
    for name in ("relative", "absolute"):
        digest = uuid.uuid4().hex
        path = tmp_path / "stores" / "objects" / str(user) / digest
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
        objects.append(server.sql(
            "INSERT INTO objects (user_id, author_id, hash, name, type, size, md5, sha256) "
            "VALUES (%s, %s, %s, %s, 'application/octet-stream', %s, %s, %s) RETURNING id",
            user, user, digest, name, len(content), hashlib.md5(content).digest(),
            hashlib.sha256(content).digest(),
        )[0]["id"])
    server.conn.commit()
    key = b"-----BEGIN OPENSSH PRIVATE KEY-----\nnot really\n-----END OPENSSH PRIVATE KEY-----\n"
    ssh_config = "Host example.com\n    IdentityFile /root/.ssh/id_deploy"
    stat = ("stat -c '%a %n' data/in.bin /opt/tools/in.bin "
            "/root/.ssh /root/.ssh/id_deploy /root/.ssh/config")
    show = "sha256sum data/in.bin /opt/tools/in.bin\ncat /root/.ssh/id_deploy /root/.ssh/config"
    build = server.queue_build(
        [("check", False, [("first", f"{stat}\n{show}"), ("second", stat)])],
        driver=driver, user_id=user,
        objects=[("relative", "data/in.bin", objects[0]),
                 ("absolute", "/opt/tools/in.bin", objects[1])],
        keys=[("deploy", BlockCipher(BLOCK.encode()).encrypt(key), ssh_config,
               "/root/.ssh/id_deploy")],
    )
    row = server.wait(build.id, timeout=60)
    assert row["status"] == "passed", row["output"]
    modes = ("644 data/in.bin\n644 /opt/tools/in.bin\n700 /root/.ssh\n"
             "600 /root/.ssh/id_deploy\n600 /root/.ssh/config\n")
    first = output_of(server, build.jobs["first"])
    assert modes in first
    sha = hashlib.sha256(content).hexdigest()
    assert f"{sha}  data/in.bin\n{sha}  /opt/tools/in.bin\n" in first
    # The key's lines are masked in the log: it is placed, never shown.
    assert "xxxxxx\nxxxxxx\nxxxxxx\nStrictHostKeyChecking no\n" in first
    assert "not really" not in first
    assert ssh_config in first
    assert modes in output_of(server, build.jobs["second"]), "every job's container has them"
    placed = server.sql("SELECT placed FROM build_objects WHERE build_id = %s", build.id)
    assert [p["placed"] for p in placed] == [True, True]
    assert_clean(server, build.id)


def _stored_artifacts(server, build, tmp_path) -> dict[str, tuple[dict, bytes | None]]:
    rows = server.sql("SELECT * FROM build_artifacts WHERE build_id = %s", build.id)
    stored = {}
    for row in rows:
        path = tmp_path / "stores" / "artifacts" / str(build.user_id) / row["hash"]
        stored[row["name"]] = (row, path.read_bytes() if path.exists() else None)
    return stored


def _assert_digests(row: dict, data: bytes) -> None:
    assert row["size"] == len(data)
    assert bytes(row["md5"]) == hashlib.md5(data).digest()
    assert bytes(row["sha256"]) == hashlib.sha256(data).digest()


NUMBERS = "".join(f"{i}\n" for i in range(1, 100_001)).encode()
MAKE_ARTIFACTS = "seq 1 100000 > numbers.txt\nln -s numbers.txt latest\nmkdir -p /tmp/out dir\n" \
                 "echo report > /tmp/out/report.txt"


def test_artifacts_are_collected_with_checksums(server, start, driver, tmp_path):
    start()
    build = server.queue_build(
        [("build", False, [("make", MAKE_ARTIFACTS)])], driver=driver,
        artifacts={"make": [("numbers.txt", "numbers"), ("latest", "via-link"),
                            ("/tmp/out/report.txt", "report"), ("missing.txt", "missing"),
                            ("dir", "directory")]},
    )
    row = server.wait(build.id, timeout=60)
    assert row["status"] == "passed", row["output"]
    stored = _stored_artifacts(server, build, tmp_path)
    for name, expected in (("numbers", NUMBERS), ("via-link", NUMBERS), ("report", b"report\n")):
        artifact, data = stored[name]
        assert data == expected, name
        _assert_digests(artifact, expected)
    assert stored["missing"][0]["size"] is None and stored["missing"][1] is None
    output = output_of(server, build.jobs["make"])
    assert "Failed to collect artifact missing.txt: no such file" in output
    assert "Failed to collect artifact dir: dir is not a regular file" in output
    assert_clean(server, build.id)


def test_artifact_limit_cuts_what_is_stored(server, start, driver, tmp_path):
    start({"artifacts": {"limit": 1000}})
    build = server.queue_build([("build", False, [("make", MAKE_ARTIFACTS)])], driver=driver,
                               artifacts={"make": [("numbers.txt", "numbers")]})
    row = server.wait(build.id, timeout=60)
    assert row["status"] == "passed", row["output"]
    artifact, data = _stored_artifacts(server, build, tmp_path)["numbers"]
    assert data == NUMBERS[:1000]
    _assert_digests(artifact, NUMBERS[:1000])
    assert_clean(server, build.id)


# A job holds here until the test releases it (at most two minutes), so tests
# look at a running job without guessing how long anything takes.
HOLD = "set +x\ni=0\nwhile [ ! -e released ] && [ $i -lt 1200 ]; do sleep 0.1; i=$((i + 1)); done\n"


def release(server, build_id: int) -> None:
    (running,) = containers(server, build_id, status="running")
    running.exec_run(["touch", f"{WORKSPACE}/released"])


def test_output_is_live_and_limits_apply(server, start, driver):
    start(docker_config={"cpus": 0.5, "memory": 64, "pids_limit": 50})
    build = server.queue_build([("live", False, [("live", f"echo first\n{HOLD}echo second")])],
                               driver=driver)
    row = wait_output(server, build.jobs["live"], "first\n")
    assert row["status"] == "running"
    assert "second" not in row["output"]
    (running,) = containers(server, build.id, status="running")
    limits = running.attrs["HostConfig"]
    assert (limits["NanoCpus"], limits["Memory"], limits["PidsLimit"]) == (500_000_000, 64 << 20, 50)
    release(server, build.id)
    row = server.wait(build.id, timeout=60)
    assert row["status"] == "passed", row["output"]
    assert output_of(server, build.jobs["live"]).endswith("first\n+ set +x\nsecond\n")
    assert_clean(server, build.id)


def test_parallel_builds_keep_their_own_volumes(server, start, driver):
    """One build's teardown, by label, must not touch another build's volume."""
    start({"parallelism": 2})
    job = f"echo mine > file\necho waiting\n{HOLD}cat file"
    slow = server.queue_build([("slow", False, [("slow", job)])], driver=driver)
    wait_output(server, slow.jobs["slow"], "waiting\n")
    quick = server.queue_build(driver=driver)
    assert server.wait(quick.id, timeout=60)["status"] == "passed"
    assert_clean(server, quick.id)
    release(server, slow.id)
    row = server.wait(slow.id, timeout=60)
    assert row["status"] == "passed", row["output"]
    assert output_of(server, slow.jobs["slow"]).endswith("+ set +x\nmine\n")
    assert_clean(server, slow.id)


def test_timeout_stops_the_container(server, start, driver):
    start({"timeout": "15s"})
    build = server.queue_build([("slow", False, [("slow", "echo started\nsleep 600")]),
                                ("next", False, [("next", "echo never")])], driver=driver)
    wait_output(server, build.jobs["slow"], "started\n")
    row = server.wait(build.id, timeout=45)
    assert row["status"] == "timed_out"
    assert server.job(build.jobs["slow"])["status"] == "timed_out"
    assert server.job(build.jobs["next"])["status"] == "timed_out"
    assert_clean(server, build.id)


def test_kill_stops_the_container(server, start, driver, redis_server):
    start()
    build = server.queue_build([("slow", False, [("slow", "echo waiting\nsleep 600")])], driver=driver)
    wait_output(server, build.jobs["slow"], "waiting\n")
    redis_server.client().publish(f"kill-{build.id}", build.secret)
    row = server.wait(build.id, timeout=30)
    assert row["status"] == "killed"
    assert server.job(build.jobs["slow"])["status"] == "killed"
    assert_clean(server, build.id)


def test_nonexistent_image_fails_fast(server, start, driver):
    start()
    missing = f"djinn-worker-test/does-not-exist:{uuid.uuid4().hex[:8]}"
    started = time.monotonic()
    build = server.queue_build(driver={**driver, "image": missing})
    row = server.wait(build.id, timeout=30)
    assert time.monotonic() - started < 30
    assert row["status"] == "failed"
    create = output_of(server, build.jobs["create driver"])
    assert f"Pulling image {missing}\n" in create
    assert f"Failed to create driver: cannot pull image {missing}: " in create
    assert server.job(build.jobs["test"])["status"] == "failed"
    assert_clean(server, build.id)


def test_kill_ends_a_stalled_pull(server, start, driver, redis_server):
    """A "registry" on localhost that accepts connections and never answers."""
    start()
    registry = socket.create_server(("127.0.0.1", 0))
    accepted = []
    threading.Thread(target=lambda: accepted.append(registry.accept()), daemon=True).start()
    stalled = f"127.0.0.1:{registry.getsockname()[1]}/stalled:latest"
    try:
        build = server.queue_build(driver={**driver, "image": stalled})
        wait_output(server, build.jobs["create driver"], f"Pulling image {stalled}\n")
        redis_server.client().publish(f"kill-{build.id}", build.secret)
        row = server.wait(build.id, timeout=15)
    finally:
        for connection, _ in accepted:
            connection.close()
        registry.close()
    assert row["status"] == "killed"
    assert f"Failed to create driver: pulling {stalled} was stopped" in row["output"]
    assert_clean(server, build.id)


@pytest.mark.parametrize("config, problem", [
    ({"workspace": WORKSPACE}, '"image"'),
    ({"image": "x"}, '"workspace" to an absolute path other than /, got None'),
    ({"image": "x", "workspace": "go"}, "got 'go'"),
    ({"image": "x", "workspace": "/"}, "got '/'"),
])
def test_bad_manifest_fails_with_one_line(server, start, config, problem):
    start()
    build = server.queue_build(driver={"type": "docker", **config})
    row = server.wait(build.id, timeout=30)
    assert row["status"] == "failed"
    (line,) = output_of(server, build.jobs["create driver"]).splitlines()
    assert line.startswith("Failed to create driver: docker driver: the manifest must set ")
    assert problem in line


def test_supervisor_removes_what_a_killed_child_left(server, start, driver):
    worker = start()
    build = server.queue_build([("slow", False, [("slow", "echo waiting\nsleep 600")])], driver=driver)
    wait_output(server, build.jobs["slow"], "waiting\n")
    assert containers(server, build.id, status="running")
    (child,) = worker.children()
    os.kill(child, signal.SIGKILL)
    row = server.wait(build.id, timeout=30)
    assert row["status"] == "failed"
    assert "The build process died: killed by signal 9 (SIGKILL)" in row["output"]
    worker.wait_log(f"docker: removed leftovers of build {build.id}")
    assert_clean(server, build.id)
    again = server.queue_build(driver=driver)
    assert server.wait(again.id, timeout=60)["status"] == "passed"


def test_leftovers_are_removed_at_start(server, start, image):
    mine = {LABEL_WORKER: identity(server.queue), LABEL_BUILD: "999999999"}
    other = {LABEL_WORKER: f"another-host:{server.queue}", LABEL_BUILD: "999999999"}
    volume = ENGINE_CLIENT.volumes.create(f"djinn-test-{uuid.uuid4().hex[:8]}", labels=mine)
    left = ENGINE_CLIENT.containers.create(image, ["sleep", "600"], labels=mine,
                                           mounts=[docker.types.Mount(WORKSPACE, volume.name)])
    left.start()
    foreign = ENGINE_CLIENT.containers.create(image, ["true"], labels=other)
    try:
        worker = start()
        assert leftovers(server) == []
        assert ENGINE_CLIENT.containers.get(foreign.id), "other workers' containers are left alone"
        worker.wait_log(f"removed leftovers of worker {identity(server.queue)}")
    finally:
        foreign.remove(force=True)
