"""Faults of the servers and hosts around the worker, for real: PostgreSQL and
Redis stopped and restarted, kills at the worst moment, workers lost with
their builds. Each test has PostgreSQL and Redis of its own (the `private`
fixture), so restarting them disturbs no other test."""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from datetime import datetime, timezone

from cutter import Cutter
from djinn import Server, marker, processes_with


def reconnect(server: Server) -> None:
    """The test's own connection after a PostgreSQL restart."""
    server.conn = server.pg.connect("djinn")


def build_dirs(server: Server, build_id: int) -> list[str]:
    """The os driver's directories of every run of the build that still exist."""
    found = re.findall(r"^Build directory (\S+)$", server.build(build_id)["output"] or "", re.M)
    return [d for d in found if os.path.exists(d)]


def assert_nothing_left(server: Server, build_id: int, sleep: str | None = None) -> None:
    deadline = time.monotonic() + 10
    while build_dirs(server, build_id) or (sleep and processes_with(f"sleep {sleep}")):
        assert time.monotonic() < deadline, (build_dirs(server, build_id),
                                             sleep and processes_with(sleep))
        time.sleep(0.1)


TICKS = "for i in $(seq 1 8); do echo \"line $i\"; sleep 1; done"


def test_postgres_restarted_mid_build_loses_nothing(private):
    server, workers = private
    worker = workers.start({"parallelism": 2})
    ticking = server.queue_build([("tick", False, [("tick", TICKS)])])
    server.wait_job(ticking.jobs["tick"])
    time.sleep(1.5)
    # This one ends while the database is away.
    short = server.queue_build([("short", False, [("short", "sleep 1.5; echo done")])])
    server.wait_job(short.jobs["short"])
    server.pg.restart(down=3)
    reconnect(server)
    row = server.wait(ticking.id, timeout=60)
    assert row["status"] == "passed", row["output"]
    job = server.job(ticking.jobs["tick"])["output"]
    for i in range(1, 9):
        assert job.count(f"\nline {i}\n") == 1, job
        assert row["output"].count(f"\nline {i}\n") == 1
    short_row = server.wait(short.id, timeout=60)
    assert short_row["status"] == "passed", short_row["output"]
    assert "done\n" in server.job(short.jobs["short"])["output"]
    worker.wait_log("database back; carrying on")
    assert_nothing_left(server, ticking.id)
    assert_nothing_left(server, short.id)
    # And the worker goes on taking builds.
    assert server.wait(server.queue_build().id)["status"] == "passed"


def test_redis_restarted_mid_build(private):
    server, workers = private
    worker = workers.start()
    running = server.queue_build([("tick", False, [("tick", "sleep 4; echo ok")])])
    server.wait_job(running.jobs["tick"])
    server.rds.restart(down=2)
    server.redis = server.rds.client()
    assert server.wait(running.id, timeout=30)["status"] == "passed"
    assert server.wait(server.queue_build().id, timeout=30)["status"] == "passed"
    sleep = marker()
    killed = server.queue_build([("slow", False, [("slow", f"sleep {sleep}")])])
    server.wait_job(killed.jobs["slow"])
    server.redis.publish(f"kill-{killed.id}", killed.secret)
    assert server.wait(killed.id, timeout=10)["status"] == "killed"
    assert worker.log.count("(retrying until it is back)") >= 1
    worker.wait_log("is back after")
    assert_nothing_left(server, killed.id, sleep)


def test_a_kill_sent_as_the_build_turns_running_is_never_lost(private):
    server, workers = private
    workers.start()
    for _ in range(10):
        sleep = marker()
        build = server.queue_build([("slow", False, [("slow", f"sleep {sleep}")])])
        while server.build(build.id)["status"] != "running":
            pass
        published = datetime.now(timezone.utc).replace(tzinfo=None)
        server.redis.publish(f"kill-{build.id}", build.secret)
        row = server.wait(build.id, timeout=10)
        assert row["status"] == "killed", row["output"]
        # bench/compare.py measures the latency; this only bounds it loosely.
        assert (row["finished_at"] - published).total_seconds() < 1.0
        assert_nothing_left(server, build.id, sleep)


def lost_host_build(server, flag, sleep: str) -> object:
    return server.queue_build([("slow", False, [(
        "slow", f"if [ -e {flag} ]; then echo again; else touch {flag}; sleep {sleep}; fi")])])


def kill_with_builds(worker, sleep: str) -> None:
    """The host is gone: supervisor, build processes and their jobs die at once.

    The supervisor is stopped first: otherwise it may reap a build process
    killed before it and settle the build itself, as it does on a live host.
    """
    worker.proc.send_signal(signal.SIGSTOP)
    for pid in worker.children():
        os.killpg(pid, signal.SIGKILL)
    worker.proc.kill()
    worker.proc.wait()
    for line in processes_with(f"sleep {sleep}"):
        os.kill(int(line.split(":")[0]), signal.SIGKILL)


def test_another_worker_reruns_the_builds_of_a_lost_host(private, tmp_path):
    server, workers = private
    lease = {"lease_ttl": "3s"}
    lost = workers.start(lease, hostname="host-a")
    sleep = marker()
    build = lost_host_build(server, tmp_path / "ran", sleep)
    server.wait_job(build.jobs["slow"])
    (left,) = build_dirs(server, build.id)
    kill_with_builds(lost, sleep)
    started = time.monotonic()
    other = workers.start(lease, hostname="host-b")
    row = server.wait(build.id, timeout=20)
    assert row["status"] == "passed", row["output"]
    assert time.monotonic() - started < 3 + 5
    assert re.match(r"Build orphaned: worker host-a:\S+ lost it at ", row["output"])
    assert "again" in server.job(build.jobs["slow"])["output"]
    other.wait_log(f"build {build.id}: orphaned by worker host-a:{server.queue}")
    other.wait_log(f"build {build.id}: removed {left}")  # the same machine: its files are here
    assert not os.path.exists(left)
    assert_nothing_left(server, build.id, sleep)


def test_a_build_whose_hosts_are_lost_twice_fails(private, tmp_path):
    server, workers = private
    lease = {"lease_ttl": "3s"}
    first = workers.start(lease, hostname="host-a")
    sleep = marker()
    build = server.queue_build([("slow", False, [("slow", f"sleep {sleep}")])])
    server.wait_job(build.jobs["slow"])
    kill_with_builds(first, sleep)
    second = workers.start(lease, hostname="host-b")
    second.wait_log(f"build {build.id}: orphaned by worker host-a", timeout=15)
    server.wait_job(build.jobs["slow"])
    kill_with_builds(second, sleep)
    third = workers.start(lease, hostname="host-c")
    row = server.wait(build.id, timeout=20)
    assert row["status"] == "failed"
    assert "Build orphaned again: worker host-b:" in row["output"]
    assert row["output"].endswith("Done. Run failed\n")
    third.wait_log(f"build {build.id}: orphaned a second time by worker host-b")
    assert_nothing_left(server, build.id, sleep)


def test_a_claim_whose_answer_is_lost_is_settled_and_the_build_runs(private):
    """The claim commits but its answer never arrives: the worker cannot
    know it holds the build, so it leaves its note for recovery, which runs
    the build again instead of leaving it `running` for ever."""
    server, workers = private
    cutter = Cutter(server.pg.port)
    try:
        worker = workers.start({"database": {"addr": cutter.addr}, "lease_ttl": "3s"})
        cutter.lose_answer_to(b"EXECUTE djinn_claim")
        build = server.queue_build()
        row = server.wait(build.id, timeout=30)
    finally:
        cutter.close()
    assert cutter.cuts == 1
    assert row["status"] == "passed", row["output"]
    assert re.match(r"Build orphaned: this worker lost it at ", row["output"])
    assert server.sql("SELECT name FROM build_tags WHERE build_id = %s", build.id) == [{"name": "orphaned"}]
    worker.wait_log(f"build {build.id}: an earlier claim of this worker may have gone through")
    worker.wait_log(f"build {build.id}: orphaned by this worker; put back on")
    assert_nothing_left(server, build.id)
    assert server.wait(server.queue_build().id)["status"] == "passed"


def test_one_live_worker_per_identity(private):
    server, workers = private
    first = workers.start(hostname="host-a")
    second = workers.start(hostname="host-a", start=False).start(wait=None)
    assert second.proc.wait(30) == 3
    lines = second.stderr.strip().splitlines()
    assert len(lines) == 1 and "holds its lease" in lines[0] and "host-a:" in lines[0], lines
    # A crash: the same identity starts again at once, the dead holder's lease taken over.
    first.proc.kill()
    first.proc.wait()
    again = workers.start(hostname="host-a")
    again.wait_log("took over the lease of process")
    assert server.wait(server.queue_build().id)["status"] == "passed"
    # A clean stop releases the lease: a restart is not refused either.
    assert again.stop() == 0
    workers.start(hostname="host-a")
    assert server.wait(server.queue_build().id)["status"] == "passed"


def test_a_database_away_longer_than_the_outage_limit_reruns_the_build(private, tmp_path):
    server, workers = private
    worker = workers.start({"database": {"outage": "2s"}, "lease_ttl": "3s"})
    flag = tmp_path / "ran"
    build = server.queue_build([("tick", False, [(
        "tick", f"if [ -e {flag} ]; then echo again; else touch {flag}; {TICKS}; fi")])])
    server.wait_job(build.jobs["tick"])
    (left,) = build_dirs(server, build.id)
    server.pg.restart(down=6)
    reconnect(server)
    row = server.wait(build.id, timeout=30)
    assert row["status"] == "passed", row["output"]
    assert row["output"].startswith("Build orphaned: this worker lost it at ")
    assert "again" in server.job(build.jobs["tick"])["output"]
    worker.wait_log("stayed away longer than database.outage (2s)")
    assert not os.path.exists(left)
    assert_nothing_left(server, build.id)


def refuse_job_output(server: Server, when: str, message: str) -> None:
    """PostgreSQL refuses (not an outage) every job output write for which
    the SQL condition `when` holds (NEW is the row written)."""
    server.sql(f"""
        CREATE FUNCTION refuse_output() RETURNS trigger AS $$
        BEGIN
            IF {when} THEN
                RAISE EXCEPTION '{message}';
            END IF;
            RETURN NEW;
        END $$ LANGUAGE plpgsql;
        CREATE TRIGGER refuse_output BEFORE UPDATE ON build_jobs
            FOR EACH ROW EXECUTE FUNCTION refuse_output();
    """)
    server.conn.commit()


def refuse_output_with(server: Server, poison: str) -> None:
    """Every job output holding poison is refused."""
    refuse_job_output(server, f"NEW.output LIKE '%%{poison}%%'", "output refused by a trigger")


def test_output_the_database_refuses_is_said_once_and_fails_the_build(private):
    """A write PostgreSQL refuses (not an outage) is logged once, not at every
    tick of the writer, and the build fails instead of losing the text."""
    server, workers = private
    poison = marker()
    refuse_output_with(server, poison)
    worker = workers.start()
    build = server.queue_build([("test", False, [("test", f"echo {poison}; sleep 3; echo after")])])
    row = server.wait(build.id, timeout=60)
    assert row["status"] == "failed"
    assert "The build process died" in row["output"]
    assert worker.log.count("output not yet written: output refused by a trigger") == 1, worker.log


def test_a_refused_end_of_one_job_stops_the_build_at_the_next(private, tmp_path):
    """A job's end is written while the next job runs. If PostgreSQL refuses
    it, the next job's end fails the build and no later job runs."""
    server, workers = private
    poison = marker()
    refuse_output_with(server, poison)
    workers.start()
    flag = tmp_path / "third"
    build = server.queue_build([("test", False, [
        ("first", f"echo {poison}"), ("second", "echo second"), ("third", f"touch {flag}")])])
    row = server.wait(build.id, timeout=60)
    assert row["status"] == "failed"
    assert "The build process died" in row["output"]
    assert not flag.exists()
    assert_nothing_left(server, build.id)


def test_jobs_wait_while_an_ended_job_cannot_be_written(private, tmp_path):
    """While PostgreSQL is away, one ended job's text is held while the next
    job runs; the end after that waits for the database, so a build's memory
    stays bounded however many jobs it has, and nothing is lost."""
    server, workers = private
    workers.start()
    flag = tmp_path / "third"
    build = server.queue_build([("test", False, [
        ("first", "sleep 1; echo first"), ("second", "echo second"),
        ("third", f"touch {flag}; echo third")])])
    server.wait_job(build.jobs["first"])
    restart = threading.Thread(target=server.pg.restart, args=(5,))
    restart.start()
    time.sleep(3.5)
    assert not flag.exists()
    restart.join()
    reconnect(server)
    row = server.wait(build.id, timeout=60)
    assert row["status"] == "passed", row["output"]
    assert flag.exists()
    for name in ("first", "second", "third"):
        job = server.job(build.jobs[name])
        assert job["status"] == "passed"
        assert job["output"].count(f"\n{name}\n") == 1, job["output"]
        assert row["output"].count(f"\n{name}\n") == 1, row["output"]


def test_statuses_queued_behind_a_refused_big_write_are_not_lost(private, tmp_path):
    """A big write goes alone, before the status changes queued with it. If
    PostgreSQL refuses it for a while, those changes wait and go later: here
    the first job's end and the second one's start, queued while the first
    job's 400 kB are refused."""
    server, workers = private
    server.sql("CREATE TABLE refuse_big (refusing boolean); INSERT INTO refuse_big VALUES (TRUE)")
    refuse_job_output(server, "length(NEW.output) > 300000 AND (SELECT refusing FROM refuse_big)",
                      "big output refused for now")
    workers.start()
    second = tmp_path / "second"
    build = server.queue_build([("test", False, [
        ("big", "head -c 400000 /dev/zero | tr '\\0' x; echo"),
        ("next", f"touch {second}; sleep 2; echo after")])])
    deadline = time.monotonic() + 30
    while not second.exists():
        assert time.monotonic() < deadline, server.build(build.id)["output"]
        time.sleep(0.05)
    time.sleep(0.5)  # a few of the writer's ticks, each refused
    server.sql("UPDATE refuse_big SET refusing = FALSE")
    server.conn.commit()
    row = server.wait(build.id, timeout=60)
    assert row["status"] == "passed", row["output"]
    for name in ("big", "next"):
        job = server.job(build.jobs[name])
        assert job["status"] == "passed" and job["started_at"] is not None, job
    assert server.job(build.jobs["big"])["output"].count("x" * 400000) == 1
    assert server.job(build.jobs["next"])["output"].endswith("after\n")
