"""Dispatch latency, throughput and memory of the supervisor (`make bench`).

Runs the real djinn-worker (os driver, parallelism 2) against throwaway
PostgreSQL and Redis and prints:

- dispatch latency: payload pushed -> build started_at (the claim), and on to
  the `create driver` job's started_at (the forked child at work), for builds
  pushed one at a time to an idle worker (median and p95);
- throughput: N trivial builds (one job, `true`) pushed at once, first push to
  last finished_at;
- peak RSS (VmHWM) of the supervisor, and of a build child as reported by a
  job that reads its parent's /proc status.

Timestamps are compared in UTC, the time zone the throwaway database runs in.

Targets on a 2-core machine: median latency under 20 ms, at least 50 builds/s.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from harness import djinn
from djinn import Server  # noqa: E402 (harness puts tests/ on the path)

TRIVIAL = [("test", False, [("true", "true")])]
CHILD_RSS = [("test", False, [("rss", "grep VmHWM /proc/$PPID/status")])]


def peak_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmHWM for process {pid}")


def wait_all(server: Server, ids: list[int], timeout: float) -> list[dict]:
    deadline = time.monotonic() + timeout
    while True:
        rows = server.sql("SELECT id, status, started_at, finished_at FROM builds "
                          "WHERE id = ANY(%s)", ids)
        if all(r["status"] not in ("queued", "running") for r in rows):
            return rows
        if time.monotonic() > deadline:
            raise RuntimeError(f"builds still unfinished after {timeout}s")
        time.sleep(0.01)


def latency(server: Server, user: int, count: int) -> tuple[list[float], list[float]]:
    """Milliseconds from LPUSH to the build's and the first job's started_at."""
    claimed, running = [], []
    for _ in range(count):
        build = server.insert(TRIVIAL, user_id=user)
        pushed = datetime.now(timezone.utc).replace(tzinfo=None)
        server.push(build.id)
        row = server.wait(build.id, timeout=30)
        assert row["status"] == "passed", row["output"]
        job = server.job(build.jobs["create driver"])
        claimed.append((row["started_at"] - pushed).total_seconds() * 1000)
        running.append((job["started_at"] - pushed).total_seconds() * 1000)
    return sorted(claimed), sorted(running)


def summary(samples: list[float]) -> str:
    p95 = samples[int(len(samples) * 0.95) - 1]
    return f"median {statistics.median(samples):.1f} ms, p95 {p95:.1f} ms"


def throughput(server: Server, user: int, count: int) -> float:
    ids = [server.insert(TRIVIAL, user_id=user).id for _ in range(count)]
    start = datetime.now(timezone.utc).replace(tzinfo=None)
    for build_id in ids:
        server.push(build_id)
    rows = wait_all(server, ids, timeout=max(60, count))
    failed = [r["id"] for r in rows if r["status"] != "passed"]
    assert not failed, f"builds did not pass: {failed}"
    last = max(r["finished_at"] for r in rows)
    return count / (last - start).total_seconds()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latency-builds", type=int, default=100)
    parser.add_argument("--throughput-builds", type=int, default=500)
    args = parser.parse_args()

    with djinn() as (server, worker):
        user = server.user()

        latency(server, user, 10)  # warm up caches and connections
        claimed, running = latency(server, user, args.latency_builds)
        rate = throughput(server, user, args.throughput_builds)
        probe = server.queue_build(CHILD_RSS, user_id=user)
        server.wait(probe.id)
        child_rss = server.job(probe.jobs["rss"])["output"].split("VmHWM:")[-1].split()[0]
        supervisor_rss = peak_rss_kib(worker.proc.pid)

        print(f"dispatch latency over {len(claimed)} builds, push to build started_at: "
              f"{summary(claimed)} (target: median < 20 ms)")
        print(f"  push to the first job's started_at in the child: {summary(running)}")
        print(f"throughput over {args.throughput_builds} builds: {rate:.1f} builds/s (target: >= 50)")
        print(f"peak RSS: supervisor {supervisor_rss / 1024:.1f} MiB, build child {int(child_rss) / 1024:.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
