"""End to end through the real djinn-worker process, os driver, real PostgreSQL and Redis."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest

from djinn import marker, processes_with

BOTH = pytest.mark.parametrize("schema", ["dist", "original"], indirect=True)


@BOTH
def test_passing_build_writes_every_row(server, make_worker):
    make_worker()
    build = server.queue_build([("test", False, [("hello", "echo hello world")])])
    row = server.wait(build.id)
    assert row["status"] == "passed", row["output"]
    assert row["started_at"] <= row["finished_at"]
    assert row["output"].endswith("Done. Run passed\n")
    create = server.job(build.jobs["create driver"])
    assert create["status"] == "passed"
    assert "Running with OS driver" in create["output"]
    job = server.job(build.jobs["hello"])
    assert job["status"] == "passed"
    assert job["output"] == "+ echo hello world\nhello world\n"
    assert job["started_at"] <= job["finished_at"]
    assert "hello world" in row["output"]
    stages = server.sql("SELECT status FROM build_stages WHERE build_id = %s", build.id)
    assert {s["status"] for s in stages} == {"passed"}


@BOTH
def test_failing_job_ends_the_build(server, make_worker):
    make_worker()
    build = server.queue_build([
        ("one", False, [("ok", "true"), ("bad", "echo before\nexit 3\necho after"), ("skipped", "true")]),
        ("two", False, [("never", "echo never")]),
    ])
    row = server.wait(build.id)
    assert row["status"] == "failed"
    bad = server.job(build.jobs["bad"])
    assert bad["status"] == "failed"
    assert "before" in bad["output"] and "+ exit 3" in bad["output"]
    assert "after" not in bad["output"]
    for name in ("skipped", "never"):
        job = server.job(build.jobs[name])
        assert job["status"] == "failed" and job["output"] is None and job["finished_at"]
    assert server.job(build.jobs["ok"])["status"] == "passed"
    assert row["output"].endswith("Done. Run failed\n")


@BOTH
def test_allowed_failure_passes_with_failures(server, make_worker):
    make_worker()
    build = server.queue_build([
        ("flaky", True, [("may-fail", "exit 1"), ("still-runs", "echo yes")]),
        ("after", False, [("later", "echo later")]),
    ])
    row = server.wait(build.id)
    assert row["status"] == "passed_with_failures"
    assert server.job(build.jobs["may-fail"])["status"] == "passed_with_failures"
    assert server.job(build.jobs["still-runs"])["status"] == "passed"
    assert server.job(build.jobs["later"])["status"] == "passed"
    assert row["output"].endswith("Done. Run passed_with_failures\n")


def test_variables_are_the_jobs_environment(server, make_worker):
    make_worker()
    tricky = "spaces and 'quotes' \"double\" a=b $HOME `x`\nsecond line"
    build = server.queue_build(
        [("env", False, [("show", 'printf "%s|" "$PLAIN" "$TRICKY" > out\ncat out')])],
        variables=[("PLAIN", "value"), ("TRICKY", tricky)],
    )
    row = server.wait(build.id)
    assert row["status"] == "passed", row["output"]
    assert f"value|{tricky}|" in server.job(build.jobs["show"])["output"]


def test_stages_and_jobs_run_in_order(server, make_worker):
    make_worker()
    stages = [
        (f"stage-{s}", False, [(f"job-{s}-{j}", f"echo {s}{j} >> ~/order") for j in "abc"])
        for s in "123"
    ]
    stages.append(("check", False, [("check", "cat ~/order | tr -d '\\n'")]))
    build = server.queue_build(stages)
    row = server.wait(build.id)
    assert row["status"] == "passed", row["output"]
    assert "1a1b1c2a2b2c3a3b3c" in server.job(build.jobs["check"])["output"]


def test_binary_and_nul_output_is_stored(server, make_worker):
    make_worker()
    build = server.queue_build([("bin", False, [
        ("bin", "printf 'nul:\\000: bad:\\377\\376: split:\\342\\202\\254\\n'\nhead -c 4096 /dev/urandom"),
    ])])
    row = server.wait(build.id)
    assert row["status"] == "passed", row["output"]
    output = server.job(build.jobs["bin"])["output"]
    assert "nul:\u2400: bad:\ufffd\ufffd: split:\u20ac" in output


def test_background_processes_die_with_their_job(server, make_worker):
    make_worker()
    sleep = marker()
    build = server.queue_build([("bg", False, [("bg", f"sleep {sleep} &\necho started")])])
    assert server.wait(build.id)["status"] == "passed"
    assert processes_with(f"sleep {sleep}") == []


def test_timeout_kills_the_whole_job_tree(server, make_worker):
    make_worker({"timeout": "2s"})
    sleep = marker()
    build = server.queue_build([
        ("slow", False, [("slow", f"sleep {sleep} &\nsleep {sleep}")]),
        ("next", False, [("next", "echo never")]),
    ])
    started = time.monotonic()
    row = server.wait(build.id, timeout=30)
    assert row["status"] == "timed_out"
    assert time.monotonic() - started < 15
    assert server.job(build.jobs["slow"])["status"] == "timed_out"
    assert server.job(build.jobs["next"])["status"] == "timed_out"
    assert row["output"].endswith("Done. Run timed_out\n")
    assert processes_with(f"sleep {sleep}") == []


def test_kill_with_the_secret(server, make_worker, redis_server):
    make_worker()
    sleep = marker()
    build = server.queue_build([("slow", False, [("slow", f"echo waiting\nsleep {sleep}")])])
    server.wait_job(build.jobs["slow"])
    client = redis_server.client()
    client.publish(f"kill-{build.id}", "not the secret")
    time.sleep(0.5)
    assert server.build(build.id)["status"] == "running"
    client.publish(f"kill-{build.id}", build.secret)
    row = server.wait(build.id, timeout=15)
    assert row["status"] == "killed"
    assert server.job(build.jobs["slow"])["status"] == "killed"
    assert processes_with(f"sleep {sleep}") == []


def test_wrong_secret_is_ignored(server, make_worker, redis_server):
    worker = make_worker()
    build = server.queue_build([("slow", False, [("slow", "sleep 2")])])
    server.wait_job(build.jobs["slow"])
    client = redis_server.client()
    client.publish("kill-987654321", "another worker's build")
    client.publish(f"kill-{build.id}", "guess")
    assert server.wait(build.id)["status"] == "passed"
    worker.wait_log("ignored a kill message")
    # Every kill channel is heard; those of builds run elsewhere are no news.
    assert "987654321" not in worker.log


def test_child_killed_with_sigkill_fails_the_build(server, make_worker):
    worker = make_worker()
    sleep = marker()
    build = server.queue_build([("slow", False, [("slow", f"sleep {sleep}")])])
    server.wait_job(build.jobs["slow"])
    (child,) = worker.children()
    assert os.getsid(child) == child, "the build child has a session of its own"
    os.kill(child, signal.SIGKILL)
    row = server.wait(build.id, timeout=15)
    assert row["status"] == "failed"
    assert "The build process died: killed by signal 9 (SIGKILL)" in row["output"]
    assert server.job(build.jobs["slow"])["status"] == "failed"
    assert processes_with(f"sleep {sleep}") == []
    # The worker goes on taking builds.
    again = server.queue_build()
    assert server.wait(again.id)["status"] == "passed"


def test_backstop_kills_a_child_that_outlives_its_timeout(server, make_worker):
    worker = make_worker({"timeout": "1s"})
    build = server.queue_build([("slow", False, [("slow", "sleep 100")])])
    server.wait_job(build.jobs["slow"])
    (child,) = worker.children()
    os.kill(child, signal.SIGSTOP)  # deaf to its own timer
    row = server.wait(build.id, timeout=30)
    assert row["status"] == "timed_out"
    assert "The build process died" in row["output"]
    worker.wait_log("past the timeout; killing it")


def test_bad_payloads_are_dropped_and_the_worker_goes_on(server, make_worker):
    worker = make_worker()
    done = server.insert()
    server.sql("UPDATE builds SET status = 'passed' WHERE id = %s", done.id)
    for payload in ("not json", "[1, 2]", '{"host": "x"}', '{"build_id": "seven"}',
                    '{"build_id": 99999999}', f'{{"build_id": {done.id}}}'):
        server.push(payload)
    good = server.queue_build()
    assert server.wait(good.id)["status"] == "passed"
    log = worker.log
    assert "not valid JSON" in log
    assert "no such build" in log
    assert "the build is already passed" in log
    assert server.build(done.id)["status"] == "passed"
    assert worker.proc.poll() is None
    # Noted for recovery as they were popped, and forgotten once refused.
    noted = {int(b) for key in server.redis.keys("djinn-worker:*:claimed")
             for b in server.redis.hkeys(key)}
    assert not noted & {done.id, 99999999}


def test_driver_not_enabled_kills_the_build(server, make_worker):
    make_worker()
    build = server.insert(driver={"type": "docker", "image": "x", "workspace": "/w"})
    server.push(build.id, queue=f"{server.queue}")
    row = server.wait(build.id)
    assert row["status"] == "killed"
    assert "driver docker has not been configured for the worker" in row["output"]
    assert server.job(build.jobs["create driver"])["status"] == "killed"
    assert server.job(build.jobs["test"])["status"] == "killed"


def test_build_without_driver_row_fails_clearly(server, make_worker):
    make_worker()
    build = server.insert()
    server.sql("DELETE FROM build_drivers WHERE build_id = %s", build.id)
    server.push(build.id)
    row = server.wait(build.id)
    assert row["status"] == "failed"
    assert f"build {build.id} has no build_drivers row" in row["output"]
    assert {j["status"] for j in server.jobs(build.id)} == {"failed"}


def test_driver_queue_is_popped_too(server, make_worker):
    make_worker()
    build = server.insert()
    server.push(build.id, queue=f"{server.queue}_os")
    assert server.wait(build.id)["status"] == "passed"


def test_parallelism_two_never_runs_a_third(server, make_worker, redis_server):
    make_worker({"parallelism": 2})
    builds = [server.queue_build([("slow", False, [("slow", "sleep 3")])]) for _ in range(3)]
    client = redis_server.client()
    deadline = time.monotonic() + 10
    while True:
        statuses = [server.build(b.id)["status"] for b in builds]
        if statuses.count("running") == 2:
            break
        assert time.monotonic() < deadline, statuses
        time.sleep(0.05)
    assert statuses.count("queued") == 1
    assert client.llen(server.queue) == 1, "the third build stays in Redis for other workers"
    time.sleep(1)
    assert [server.build(b.id)["status"] for b in builds].count("running") == 2
    for b in builds:
        assert server.wait(b.id)["status"] == "passed"


def test_sigterm_lets_running_builds_finish(server, make_worker):
    worker = make_worker()
    build = server.queue_build([("slow", False, [("slow", "sleep 2\necho finished")])])
    server.wait_job(build.jobs["slow"])
    worker.signal(signal.SIGTERM)
    waiting = server.queue_build()
    assert worker.proc.wait(30) == 0
    assert server.build(build.id)["status"] == "passed"
    assert server.build(waiting.id)["status"] == "queued", "nothing is popped after SIGTERM"
    assert worker.log.count("received SIGTERM") == 1


def test_second_sigterm_kills_running_builds(server, make_worker):
    worker = make_worker()
    sleep = marker()
    build = server.queue_build([("slow", False, [("slow", f"sleep {sleep}")])])
    server.wait_job(build.jobs["slow"])
    worker.signal(signal.SIGTERM)
    worker.wait_log("received SIGTERM")
    worker.signal(signal.SIGINT)
    assert worker.proc.wait(30) == 0
    assert server.build(build.id)["status"] == "killed"
    assert processes_with(f"sleep {sleep}") == []


def once_then(text: str, sleep: str, flag) -> str:
    """Job commands that sleep on their first run and pass on the next."""
    return f"if [ -e {flag} ]; then echo {text}; else touch {flag}; sleep {sleep}; fi"


def kill_worker_and_build(worker, sleep: str) -> None:
    """What a reboot or the OOM killer does: supervisor and build process die."""
    (child,) = worker.children()
    worker.proc.kill()
    os.killpg(child, signal.SIGKILL)
    worker.proc.wait()
    for line in processes_with(f"sleep {sleep}"):
        os.kill(int(line.split(":")[0]), signal.SIGKILL)


def test_restart_reruns_builds_whose_processes_died_with_the_worker(server, make_worker, tmp_path):
    """The next start finds the build orphaned: it runs it again, once."""
    worker = make_worker()
    sleep = marker()
    build = server.queue_build([("slow", False, [("slow", once_then("second run", sleep,
                                                                   tmp_path / "ran"))])])
    server.wait_job(build.jobs["slow"])
    kill_worker_and_build(worker, sleep)
    assert server.build(build.id)["status"] == "running"
    (build_dir,) = [line.split()[-1] for line in server.job(build.jobs["create driver"])["output"].splitlines()
                    if line.startswith("Build directory ")]
    assert os.path.isdir(build_dir)

    again = make_worker()
    row = server.wait(build.id, timeout=15)
    assert row["status"] == "passed", row["output"]
    assert row["output"].startswith("Build orphaned: this worker lost it at ")
    assert "second run" in server.job(build.jobs["slow"])["output"]
    assert server.sql("SELECT name FROM build_tags WHERE build_id = %s", build.id) == [{"name": "orphaned"}]
    again.wait_log(f"build {build.id}: orphaned by this worker; put back on {server.queue}")
    again.wait_log(f"build {build.id}: removed {build_dir}")
    assert not os.path.exists(build_dir)


def test_a_build_orphaned_twice_fails(server, make_worker):
    worker = make_worker()
    sleep = marker()
    build = server.queue_build([("slow", False, [("slow", f"sleep {sleep}")])])
    server.wait_job(build.jobs["slow"])
    kill_worker_and_build(worker, sleep)
    again = make_worker()
    again.wait_log(f"build {build.id}: orphaned by this worker")
    server.wait_job(build.jobs["slow"])
    kill_worker_and_build(again, sleep)
    third = make_worker()
    row = server.wait(build.id, timeout=15)
    assert row["status"] == "failed"
    assert row["output"].endswith("Done. Run failed\n")
    assert "Build orphaned again: this worker lost it at " in row["output"]
    assert server.job(build.jobs["slow"])["status"] == "failed"
    third.wait_log(f"build {build.id}: orphaned a second time by this worker; marked failed")
    assert server.wait(server.queue_build().id)["status"] == "passed"


def test_restart_leaves_builds_that_outlived_the_worker_to_their_process(server, make_worker):
    worker = make_worker()
    build = server.queue_build([("slow", False, [("slow", "sleep 3")])])
    server.wait_job(build.jobs["slow"])
    worker.proc.kill()
    worker.proc.wait()
    again = make_worker()
    again.wait_log(f"build {build.id}: still run by a process of this worker; left to it")
    assert server.wait(build.id)["status"] == "passed"


def test_build_whose_end_could_not_be_recorded_is_run_again_when_the_database_is_back(
        server, make_worker, postgres, schema, tmp_path):
    worker = make_worker({"lease_ttl": "3s"})
    build = server.queue_build([("slow", False, [("slow", once_then("again", "60", tmp_path / "f"))])])
    server.wait_job(build.jobs["slow"])
    dbname = f"djinn_{schema}"
    admin = postgres.connect("postgres")
    try:
        with admin.cursor() as cur:
            cur.execute(f'ALTER DATABASE "{dbname}" WITH ALLOW_CONNECTIONS false')
            cur.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                        "WHERE datname = %s AND application_name = 'djinn-worker'", (dbname,))
        (child,) = worker.children()
        os.killpg(child, signal.SIGKILL)
        worker.wait_log(f"build {build.id}, whose process died, is settled once it is back")
        time.sleep(3)
        assert server.build(build.id)["status"] == "running"
        assert worker.log.count("(retrying until it is back)") == 1, "one line per outage"
    finally:
        with admin.cursor() as cur:
            cur.execute(f'ALTER DATABASE "{dbname}" WITH ALLOW_CONNECTIONS true')
        admin.close()
    row = server.wait(build.id, timeout=15)
    assert row["status"] == "passed", row["output"]
    assert row["output"].startswith("Build orphaned: this worker lost it at ")
    worker.wait_log("is back after")


def ps_args(pid: int) -> str:
    return subprocess.run(["ps", "-o", "args=", "-p", str(pid)], capture_output=True,
                          text=True).stdout.strip()


def test_ps_shows_what_each_process_is(server, make_worker):
    worker = make_worker({"parallelism": 2})
    assert ps_args(worker.proc.pid) == f"djinn-worker: supervisor ({server.queue}, 0/2 running)"
    build = server.queue_build([("slow", False, [("slow", f"sleep {marker()}")])])
    server.wait_job(build.jobs["slow"])
    (child,) = worker.children()
    assert ps_args(child) == f"djinn-worker: build {build.id} (os)"
    assert ps_args(worker.proc.pid) == f"djinn-worker: supervisor ({server.queue}, 1/2 running)"
    os.kill(child, signal.SIGKILL)
    server.wait(build.id)
    deadline = time.monotonic() + 10
    while ps_args(worker.proc.pid) != f"djinn-worker: supervisor ({server.queue}, 0/2 running)":
        assert time.monotonic() < deadline, ps_args(worker.proc.pid)
        time.sleep(0.05)
