"""Output throughput, memory and database cost of big job output (`make bench`).

Runs the real djinn-worker (os driver) against throwaway PostgreSQL and
Redis. Each build runs one job that prints SIZE bytes as fast as it can
(`head -c SIZE` of a repeated 64-byte line), then the VmHWM of the build
process (the job shell's parent), and prints for each size:

- MB/s from the job's started_at to its finished_at (end to end: the build
  process reads, masks and caps the output and stores it);
- the build process's peak RSS;
- what PostgreSQL wrote: WAL bytes (pg_stat_wal) over the build, and the
  stored sizes of the job's output and the build log;
- with --masked (the default runs both), the same with three masked
  variables whose values appear in every line.

Then it prints the growth exponent of the time between sizes: 1.0 is
linear, 2.0 quadratic.

Targets on a 2-core machine: >= 200 MB/s for 1 GB, the build process
<= 64 MiB.
"""

from __future__ import annotations

import argparse
import base64
import math
import sys

from harness import djinn
from djinn import Server  # noqa: E402 (harness puts tests/ on the path)

from djinn_worker.crypto import BlockCipher

KEY = b"0123456789abcdef0123456789abcdef"
SECRETS = ["s3cr3t-alpha-value", "second-secret-value", "third-one-xyz"]
LINE = "0123456789 s3cr3t-alpha-value second-secret-value third-one-xyz .....\n"
SIZES = {"10 MB": 10**7, "100 MB": 10**8, "1 GB": 10**9}


def job(size: int) -> str:
    return (f"yes '{LINE.rstrip()}' | head -c {size}\n"
            "grep VmHWM /proc/$PPID/status")


def wal_bytes(server: Server) -> int:
    return int(server.sql("SELECT wal_bytes FROM pg_stat_wal")[0]["wal_bytes"])


def run(server: Server, size: int, masked: bool, cipher: BlockCipher) -> dict:
    variables = [(f"SECRET_{i}", base64.b64encode(cipher.encrypt(v.encode())).decode())
                 for i, v in enumerate(SECRETS)] if masked else []
    build = server.insert([("print", False, [("print", job(size))])])
    for key, value in variables:
        server.sql("INSERT INTO build_variables (build_id, key, value, masked) "
                   "VALUES (%s, %s, %s, TRUE)", build.id, key, value)
    server.sql("SELECT pg_stat_reset_shared('wal')")
    before = wal_bytes(server)
    server.push(build.id)
    row = server.wait(build.id, timeout=600)
    assert row["status"] == "passed", row["output"][-2000:]
    wal = wal_bytes(server) - before
    jobrow = server.job(build.jobs["print"])
    seconds = (jobrow["finished_at"] - jobrow["started_at"]).total_seconds()
    output = jobrow["output"]
    rss = int(output.split("VmHWM:")[-1].split()[0])
    if masked:
        assert not any(s in output or s in row["output"] for s in SECRETS), "a secret was stored"
    return {"seconds": seconds, "rss_mib": rss / 1024, "wal": wal,
            "job_bytes": len(output.encode()), "build_bytes": len(row["output"].encode())}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10 MB,100 MB,1 GB",
                        help="comma-separated, from: " + ", ".join(SIZES))
    parser.add_argument("--limit", default="8MiB", help="output_limit for the worker")
    args = parser.parse_args()
    sizes = [s.strip() for s in args.sizes.split(",")]
    cipher = BlockCipher(KEY)

    with djinn(parallelism=1, timeout="10m", output_limit=args.limit,
               crypto={"block": KEY.decode()}) as (server, _):
        print(f"output_limit = {args.limit}")
        for masked in (False, True):
            results = []
            for name in sizes:
                r = run(server, SIZES[name], masked, cipher)
                results.append((SIZES[name], r))
                print(f"{'masked' if masked else 'plain '} {name:>6}: "
                      f"{SIZES[name] / r['seconds'] / 1e6:7.1f} MB/s, {r['seconds']:6.2f} s, "
                      f"child peak RSS {r['rss_mib']:5.1f} MiB, WAL {r['wal'] / 2**20:7.1f} MiB, "
                      f"stored job {r['job_bytes'] / 2**20:.1f} MiB, build {r['build_bytes'] / 2**20:.1f} MiB")
            for (s1, r1), (s2, r2) in zip(results, results[1:]):
                exponent = math.log(r2["seconds"] / r1["seconds"]) / math.log(s2 / s1)
                print(f"  growth exponent {s1 / 1e6:g} MB -> {s2 / 1e6:g} MB: {exponent:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
