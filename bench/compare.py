"""djinn-worker against RQ on the same trivial jobs, in one run (`make bench`).

Both run on this machine against one throwaway Redis: djinn-worker (os
driver, parallelism 2) with a throwaway PostgreSQL that, like an operator's
database, takes scram-sha-256 passwords over TCP; RQ as two `rq worker`
processes, each forking a work-horse per job. For each figure it prints both
values, djinn/RQ, the target and PASS or FAIL:

Both run at once and are measured in turns (see side_by_side), so that
this shared machine's noisy moments fall on both alike.

- dispatch latency (median, p95): N jobs pushed one at a time to an idle
  worker, alternating between the two, from the wall clock just before the push (LPUSH, or RQ's enqueue)
  to the job's command running, as told by `date +%s.%N` in the job (djinn:
  the job's stored output; RQ: the job function's subprocess, returned);
- burst throughput: M jobs running `sh -c true` pushed at once (djinn: one
  LPUSH each; RQ: enqueue_many, one pipeline), count / (last finish - first
  push), finish being builds.finished_at or RQ's job.ended_at; the median of
  K bursts each, taken in turns;
- peak RSS (VmHWM) of the djinn supervisor and of the larger RQ worker main
  process, after all their jobs;
- private memory (USS, Private_Clean + Private_Dirty of smaps_rollup) and peak
  RSS of a djinn build child (read by a job from /proc/$PPID) and of an RQ
  work-horse (read by the job function from /proc/self);
- djinn only: kill latency, publishing the build's secret on kill-<id> to
  builds.finished_at of a running `sleep`, and timeout overshoot, a worker
  with timeout = "2s" running `sleep`: finished_at - started_at - 2 s.

Database timestamps are naive UTC (the throwaway database runs in UTC). The
exit status is 0 whatever the verdicts (it is a report), non-zero only if the
benchmark itself failed.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

import psycopg2
import rq
from rq.job import Job
from rq.results import Result

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from djinn import FINISHED, Server, Worker, processes_with  # noqa: E402
from services import DIST_SCHEMA, Postgres, Redis  # noqa: E402

PASSWORD = "bench"
RQ_BIN = str(Path(sys.executable).parent / "rq")
RQ_QUEUE = "bench"
TIMEOUT = 2.0
# A sleep of about 600 s whose length is this run's own, so that job
# processes outliving their build can be found (and ended) at the end.
SLEEP = f"sleep 600.{os.getpid()}"
# Pause after each dispatch sample, so that the next push finds the worker idle.
SETTLE = 0.1

DATE = "date +%s.%N"
MEMORY = "grep -E 'Private_(Clean|Dirty)' /proc/$PPID/smaps_rollup; grep VmHWM /proc/$PPID/status"

# The RQ side's jobs, importable by the rq workers from a temporary folder.
RQ_JOBS = '''\
import subprocess
from pathlib import Path


def date():
    return subprocess.run(["sh", "-c", "date +%s.%N"], capture_output=True, text=True, check=True).stdout


def true():
    subprocess.run(["sh", "-c", "true"], check=True)


def memory():
    """The work-horse, the process running this job, reading its own /proc."""
    return Path("/proc/self/smaps_rollup").read_text() + Path("/proc/self/status").read_text()
'''


def utcnow() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


def p95(samples: list[float]) -> float:
    return sorted(samples)[math.ceil(len(samples) * 0.95) - 1]


def kib(text: str, field: str) -> int:
    found = re.search(rf"^{field}:\s+(\d+) kB", text, re.MULTILINE)
    if not found:
        raise RuntimeError(f"no {field} in:\n{text}")
    return int(found.group(1))


def uss_mib(text: str) -> float:
    return (kib(text, "Private_Clean") + kib(text, "Private_Dirty")) / 1024


def peak_rss_mib(pid: int) -> float:
    return kib(Path(f"/proc/{pid}/status").read_text(), "VmHWM") / 1024


# --- the services ----------------------------------------------------------

class PasswordPostgres(Postgres):
    """A throwaway PostgreSQL that, once started, asks for scram-sha-256
    passwords over TCP (trust stays only on its Unix socket)."""

    def start(self) -> PasswordPostgres:
        super().start()
        conn = self.connect("postgres")
        with conn.cursor() as cur:
            cur.execute("SET password_encryption = 'scram-sha-256'")
            cur.execute("ALTER ROLE postgres PASSWORD %s", (PASSWORD,))
            (self.dir / "data" / "pg_hba.conf").write_text(
                "local all all trust\nhost all all 127.0.0.1/32 scram-sha-256\n")
            cur.execute("SELECT pg_reload_conf()")
        conn.close()
        self._wait_for_password_auth()
        return self

    def _wait_for_password_auth(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                psycopg2.connect(host="127.0.0.1", port=self.port, user="postgres",
                                 dbname="postgres", password="not-" + PASSWORD).close()
            except psycopg2.OperationalError:
                return  # a wrong password refused: the new pg_hba.conf is in force
            time.sleep(0.05)
        raise RuntimeError("PostgreSQL still lets the postgres role in with a wrong password")

    def connect(self, dbname: str) -> psycopg2.extensions.connection:
        conn = psycopg2.connect(host="127.0.0.1", port=self.port, user="postgres",
                                password=PASSWORD, dbname=dbname)
        conn.autocommit = True
        return conn


@contextmanager
def services(base: Path) -> Iterator[tuple[PasswordPostgres, Redis]]:
    postgres = redis = None
    try:
        postgres = PasswordPostgres(base).start()
        postgres.create_database("djinn", DIST_SCHEMA)
        redis = Redis(base).start()
        yield postgres, redis
    finally:
        if redis:
            redis.stop()
        if postgres:
            postgres.stop()


@contextmanager
def djinn_worker(base: Path, postgres: Postgres, redis: Redis, name: str,
                 **config) -> Iterator[tuple[Server, Worker]]:
    """A djinn-worker on queue "builds", config's keys over the defaults."""
    workdir = base / name
    workdir.mkdir()
    settings = {
        "parallelism": 2, "driver": "os", "queue": "builds", "timeout": "1m",
        "database": {"addr": postgres.addr, "name": "djinn", "username": "postgres",
                     "password": PASSWORD},
        "redis": {"addr": redis.addr},
        **{s: {"type": "file", "path": str(workdir / s)} for s in ("images", "artifacts", "objects")},
        "log": {"level": "info", "file": str(workdir / "worker.log")},
        **config,
    }
    worker = Worker(workdir, settings, {"ssh": {}})
    conn = postgres.connect("djinn")
    try:
        worker.start()
        yield Server(conn, redis.client(), "builds"), worker
    finally:
        if worker.proc:
            worker.stop()
        conn.close()


@contextmanager
def rq_workers(base: Path, redis: Redis, count: int) -> Iterator[list[subprocess.Popen]]:
    """count long-running `rq worker` processes on RQ_QUEUE, importing RQ_JOBS."""
    workdir = base / "rq"
    workdir.mkdir()
    (workdir / "rqbench.py").write_text(RQ_JOBS)
    env = {**os.environ, "PYTHONPATH": str(workdir)}
    log = open(workdir / "workers.log", "wb")
    procs: list[subprocess.Popen] = []
    try:
        for i in range(count):
            procs.append(subprocess.Popen(
                [RQ_BIN, "worker", "--url", f"redis://{redis.addr}", "--name", f"bench-{i}", RQ_QUEUE],
                cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT))
        deadline = time.monotonic() + 30
        while len(rq.Worker.all(connection=redis.client())) < count:
            if any(p.poll() is not None for p in procs) or time.monotonic() > deadline:
                raise RuntimeError(f"rq workers did not start:\n{(workdir / 'workers.log').read_text()}")
            time.sleep(0.05)
        yield procs
    finally:
        for proc in procs:
            proc.terminate()  # RQ's warm shutdown: the current job ends first
        for proc in procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.close()


# --- djinn -----------------------------------------------------------------

def one_job(command: str) -> list[tuple[str, bool, list[tuple[str, str]]]]:
    return [("bench", False, [("job", command)])]


def run_build(server: Server, user: int, command: str) -> str:
    """The output of a build's only job, after it passed."""
    build = server.queue_build(one_job(command), user_id=user)
    row = server.wait(build.id)
    if row["status"] != "passed":
        raise RuntimeError(f"build {build.id} {row['status']}:\n{row['output']}")
    return server.job(build.jobs["job"])["output"]


def djinn_dispatch(server: Server, user: int, count: int) -> list[float]:
    """Milliseconds from just before the push to `date` running in the job."""
    samples = []
    for _ in range(count):
        build = server.insert(one_job(DATE), user_id=user)
        pushed = time.time()
        server.push(build.id)
        row = server.wait(build.id)
        output = server.job(build.jobs["job"])["output"]
        if row["status"] != "passed" or f"+ {DATE}\n" not in output:
            raise RuntimeError(f"build {build.id} {row['status']}:\n{row['output']}\n{output}")
        ran = float(output.split(f"+ {DATE}\n", 1)[1].split()[0])
        samples.append((ran - pushed) * 1000)
        time.sleep(SETTLE)
    return samples


def wait_builds(server: Server, ids: list[int], timeout: float) -> list[dict]:
    deadline = time.monotonic() + timeout
    while True:
        rows = server.sql("SELECT id, status, output, started_at, finished_at FROM builds "
                          "WHERE id = ANY(%s)", ids)
        if all(r["status"] in FINISHED for r in rows):
            return rows
        if time.monotonic() > deadline:
            raise RuntimeError(f"builds still unfinished after {timeout}s")
        time.sleep(0.05)


def djinn_burst(server: Server, user: int, count: int) -> float:
    """Builds per second, all pushed at once."""
    ids = [server.insert(one_job("sh -c true"), user_id=user).id for _ in range(count)]
    start = utcnow()
    for build_id in ids:
        server.push(build_id)
    rows = wait_builds(server, ids, timeout=max(120, count))
    failed = [r["id"] for r in rows if r["status"] != "passed"]
    if failed:
        raise RuntimeError(f"builds did not pass: {failed}")
    return count / (max(r["finished_at"] for r in rows) - start).total_seconds()


def djinn_kill(server: Server, user: int, count: int) -> list[float]:
    """Milliseconds from publishing the kill to finished_at."""
    samples = []
    for _ in range(count):
        build = server.queue_build(one_job(SLEEP), user_id=user)
        server.wait_job(build.jobs["job"], ("running",))
        published = utcnow()
        if not server.redis.publish(f"kill-{build.id}", build.secret):
            raise RuntimeError(f"no one listens on kill-{build.id}")
        row = server.wait(build.id)
        if row["status"] != "killed":
            raise RuntimeError(f"killed build {build.id} ended {row['status']}:\n{row['output']}")
        samples.append((row["finished_at"] - published).total_seconds() * 1000)
    return samples


def djinn_overshoot(server: Server, user: int, count: int) -> list[float]:
    """Milliseconds past the TIMEOUT builds of one `sleep` job took."""
    samples = []
    for _ in range(count):
        build = server.queue_build(one_job(SLEEP), user_id=user)
        row = server.wait(build.id)
        if row["status"] != "timed_out":
            raise RuntimeError(f"build {build.id} ended {row['status']}, not timed_out:\n{row['output']}")
        samples.append(((row["finished_at"] - row["started_at"]).total_seconds() - TIMEOUT) * 1000)
    return samples


def djinn_memory_and_kills(server: Server, user: int, worker: Worker, args) -> dict:
    memory = run_build(server, user, MEMORY)
    kill = djinn_kill(server, user, args.kills)
    return {"kill": kill, "main_rss": peak_rss_mib(worker.proc.pid),
            "child_uss": uss_mib(memory), "child_rss": kib(memory, "VmHWM") / 1024}


# --- RQ ----------------------------------------------------------------------

def rq_result(job: Job, timeout: int = 60):
    result = job.latest_result(timeout=timeout)
    if result is None or result.type != Result.Type.SUCCESSFUL:
        raise RuntimeError(f"rq job {job.id} failed: {result and result.exc_string}")
    return result.return_value


def rq_dispatch(queue: rq.Queue, count: int) -> list[float]:
    """Milliseconds from just before enqueue to `date` running in the work-horse."""
    samples = []
    for _ in range(count):
        pushed = time.time()
        job = queue.enqueue("rqbench.date")
        samples.append((float(rq_result(job)) - pushed) * 1000)
        time.sleep(SETTLE)
    return samples


def rq_burst(queue: rq.Queue, count: int) -> float:
    """Jobs per second, all enqueued in one pipeline."""
    datas = [rq.Queue.prepare_data("rqbench.true") for _ in range(count)]
    start = datetime.now(timezone.utc)
    jobs = queue.enqueue_many(datas)
    for job in jobs:
        rq_result(job, timeout=max(120, count))
    ended = [job.ended_at for job in Job.fetch_many([j.id for j in jobs], connection=queue.connection)]
    return count / (max(ended) - start).total_seconds()


def rq_memory(queue: rq.Queue, procs: list[subprocess.Popen]) -> dict:
    memory = rq_result(queue.enqueue("rqbench.memory"))
    return {"main_rss": max(peak_rss_mib(p.pid) for p in procs),
            "child_uss": uss_mib(memory), "child_rss": kib(memory, "VmHWM") / 1024}


def side_by_side(server: Server, worker: Worker, queue: rq.Queue,
                 procs: list[subprocess.Popen], args) -> tuple[dict, dict]:
    """Both measured in turns while both run (each idle while the other
    works), so that a noisy moment of this machine falls on both alike:
    dispatch samples alternate one by one, bursts round by round (their
    median is reported)."""
    user = server.user()
    djinn_dispatch(server, user, 10)  # warm up caches and connections
    rq_dispatch(queue, 10)
    djinn: dict = {"dispatch": [], "bursts": []}
    rq_: dict = {"dispatch": [], "bursts": []}
    for _ in range(args.jobs):
        djinn["dispatch"] += djinn_dispatch(server, user, 1)
        rq_["dispatch"] += rq_dispatch(queue, 1)
    for _ in range(args.bursts):
        djinn["bursts"].append(djinn_burst(server, user, args.burst))
        rq_["bursts"].append(rq_burst(queue, args.burst))
    for side in (djinn, rq_):
        side["burst"] = statistics.median(side["bursts"])
    djinn.update(djinn_memory_and_kills(server, user, worker, args))
    rq_.update(rq_memory(queue, procs))
    return djinn, rq_


# --- the report --------------------------------------------------------------

@dataclass
class Row:
    figure: str
    djinn: float
    rq: float | None
    unit: str
    target: str = ""
    ok: bool | None = None

    def cells(self) -> list[str]:
        ratio = f"{self.djinn / self.rq:.2f}" if self.rq else "n/a"
        verdict = "" if self.ok is None else ("PASS" if self.ok else "FAIL")
        rq_value = "n/a" if self.rq is None else f"{self.rq:.1f} {self.unit}"
        return [self.figure, f"{self.djinn:.1f} {self.unit}", rq_value, ratio, self.target, verdict]


def rows(djinn: dict, rq_: dict, overshoot: list[float], args) -> list[Row]:
    djinn_median, rq_median = statistics.median(djinn["dispatch"]), statistics.median(rq_["dispatch"])
    kill = statistics.median(djinn["kill"])
    return [
        Row(f"dispatch median ({args.jobs} jobs)", djinn_median, rq_median, "ms",
            "<= 0.5 x RQ", djinn_median <= 0.5 * rq_median),
        Row(f"dispatch p95 ({args.jobs} jobs)", p95(djinn["dispatch"]), p95(rq_["dispatch"]), "ms"),
        Row(f"burst ({args.burst} jobs at once, median of {args.bursts})", djinn["burst"], rq_["burst"], "jobs/s",
            ">= 2 x RQ", djinn["burst"] >= 2 * rq_["burst"]),
        Row("peak RSS, supervisor / rq worker", djinn["main_rss"], rq_["main_rss"], "MiB",
            "<= 40 MiB", djinn["main_rss"] <= 40),
        Row("USS, build child / work-horse", djinn["child_uss"], rq_["child_uss"], "MiB",
            "<= 15 MiB", djinn["child_uss"] <= 15),
        Row("peak RSS, build child / work-horse", djinn["child_rss"], rq_["child_rss"], "MiB"),
        Row(f"kill latency median ({args.kills})", kill, None, "ms", "<= 200 ms", kill <= 200),
        Row(f"kill latency max ({args.kills})", max(djinn["kill"]), None, "ms"),
        Row(f"timeout overshoot max ({args.timeouts})", max(overshoot), None, "ms",
            "<= 1000 ms", max(overshoot) <= 1000),
    ]


def print_table(table: list[Row]) -> None:
    lines = [["figure", "djinn", "RQ", "djinn/RQ", "target", ""]] + [r.cells() for r in table]
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    for line in lines:
        print("  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip())


def end_leftovers() -> list[str]:
    """Job processes of this run still alive after their builds ended: named, then ended."""
    leftovers = processes_with(SLEEP)
    for entry in leftovers:
        try:
            os.kill(int(entry.split(":")[0]), signal.SIGKILL)
        except ProcessLookupError:
            pass
    return leftovers


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=100, help="dispatch latency samples")
    parser.add_argument("--burst", type=int, default=500, help="jobs pushed at once")
    parser.add_argument("--bursts", type=int, default=3, help="bursts of each, in turns")
    parser.add_argument("--kills", type=int, default=10, help="kill latency samples")
    parser.add_argument("--timeouts", type=int, default=3, help="timeout overshoot samples")
    parser.add_argument("--rq-workers", type=int, default=2)
    args = parser.parse_args()
    # A SIGTERM unwinds like an error, so every process started here is stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))

    with tempfile.TemporaryDirectory(prefix="djinn-compare-") as tmp:
        base = Path(tmp)
        base.chmod(0o755)  # the postgres user reaches its data folder through it
        try:
            with services(base) as (postgres, redis):
                with djinn_worker(base, postgres, redis, "djinn") as (server, worker), \
                        rq_workers(base, redis, args.rq_workers) as procs:
                    djinn, rq_ = side_by_side(server, worker, rq.Queue(RQ_QUEUE, connection=redis.client()),
                                              procs, args)
                with djinn_worker(base, postgres, redis, "timeout", timeout=f"{TIMEOUT:g}s") as (server, _):
                    overshoot = djinn_overshoot(server, server.user(), args.timeouts)
        finally:
            leftovers = end_leftovers()

    print(f"djinn-worker (parallelism 2, os driver, PostgreSQL with scram-sha-256 over TCP) vs "
          f"RQ {rq.__version__} ({args.rq_workers} `rq worker`s), one Redis, {os.cpu_count()} CPUs")
    print_table(rows(djinn, rq_, overshoot, args))
    print(f"timeout overshoot samples: {', '.join(f'{s:.0f} ms' for s in overshoot)}")
    for name, side in (("djinn", djinn), ("RQ", rq_)):
        print(f"{name} bursts: {', '.join(f'{b:.1f}' for b in side['bursts'])} jobs/s")
    if leftovers:
        print(f"note: {len(leftovers)} job processes outlived their builds (ended now):")
        print("\n".join(f"  {entry}" for entry in leftovers))
    return 0


if __name__ == "__main__":
    sys.exit(main())
