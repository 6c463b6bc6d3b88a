"""Build processes run on database connections the supervisor lends them
(worker/lending.py): asserted on the server's own view of its sessions and
advisory locks, on a PostgreSQL of the test's own."""

from __future__ import annotations

import os
import shutil
import signal
import time

from djinn import marker, processes_with
from test_faults import build_dirs

BUILD_SESSIONS = ("SELECT pid, backend_start FROM pg_stat_activity "
                  "WHERE application_name = 'djinn-worker build' ORDER BY pid")
# The advisory lock space of build processes ("djin"), as db.py takes it.
LOCK_HOLDER = ("SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND classid = 1684695406 "
               "AND objid = %s AND granted")


def sessions(server) -> list[tuple]:
    return [(r["pid"], r["backend_start"]) for r in server.sql(BUILD_SESSIONS)]


def lock_holders(server, build_id: int) -> list[int]:
    return [r["pid"] for r in server.sql(LOCK_HOLDER, build_id)]


def test_builds_run_on_the_connections_opened_at_start(private):
    server, workers = private
    workers.start({"parallelism": 2})
    lent = sessions(server)
    assert len(lent) == 3  # one per slot and one for the spare build process
    for _ in range(4):
        assert server.wait(server.queue_build().id)["status"] == "passed"
    sleep = marker()
    slow = [server.queue_build([("slow", False, [("slow", f"sleep {sleep}")])]) for _ in range(2)]
    for build in slow:
        server.wait_job(build.jobs["slow"])
        (holder,) = lock_holders(server, build.id)
        assert holder in [pid for pid, _ in lent]
    assert sessions(server) == lent
    for line in processes_with(f"sleep {sleep}"):
        os.kill(int(line.split(":")[0]), signal.SIGKILL)
    for build in slow:
        server.wait(build.id)
        assert not lock_holders(server, build.id)
    assert sessions(server) == lent


def test_a_build_dying_without_its_supervisor_still_ends_its_session(private):
    """Only the borrower holds a lent connection's socket besides the
    supervisor: a build process forked later does not keep it alive."""
    server, workers = private
    worker = workers.start({"parallelism": 2})
    sleep = marker()
    first, second = [server.queue_build([("slow", False, [("slow", f"sleep {sleep}")])])
                     for _ in range(2)]
    for build in (first, second):
        server.wait_job(build.jobs["slow"])
    processes = {int(p) for p in worker.children()}
    (first_process,) = [p for p in processes
                        if f"build {first.id} " in open(f"/proc/{p}/cmdline").read()]
    worker.proc.kill()
    worker.proc.wait()
    assert lock_holders(server, first.id) and lock_holders(server, second.id)
    os.killpg(first_process, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while lock_holders(server, first.id):
        assert time.monotonic() < deadline, "the dead build's session is still open"
        time.sleep(0.05)
    assert lock_holders(server, second.id)
    for line in processes_with(f"sleep {sleep}"):
        os.kill(int(line.split(":")[0]), signal.SIGKILL)
    for path in build_dirs(server, first.id):  # what recovery would remove
        shutil.rmtree(path)
