"""`make demo`: one example build, end to end, on throwaway local services.

Starts Redis and the worker under .demo/ and PostgreSQL in the system's
temporary directory, loads dist/schema.sql, writes the build the way the
Djinn server would, runs the real djinn-worker until the build is finished,
prints its log and status, and stops everything again.
"""

from __future__ import annotations

import shutil
import sys

from djinn import Server, Worker
from services import DIST_SCHEMA, REPO, Postgres, Redis

BUILD = [
    ("build", False, [
        ("compile", 'echo "Hello from $GREETING"\nuname -sr\nprintf "built at %s\\n" "$(date)" > report.txt'),
    ]),
    ("test", False, [
        ("check", "test -s report.txt\ncat report.txt\necho all good"),
    ]),
]


def main() -> int:
    base = REPO / ".demo"
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir(mode=0o755)
    postgres = redis = worker = None
    try:
        # Not under the checkout: PostgreSQL runs as its own user, who may not
        # reach a checkout in a private directory such as /root.
        postgres = Postgres().start()
        postgres.create_database("djinn", DIST_SCHEMA)
        redis = Redis(base).start()
        stores = base / "stores"
        config = {
            "parallelism": 1, "driver": "os", "queue": "builds", "timeout": "5m",
            "database": {"addr": postgres.addr, "name": "djinn", "username": "postgres"},
            "redis": {"addr": redis.addr},
            "images": {"type": "file", "path": str(stores / "images")},
            "artifacts": {"type": "file", "path": str(stores / "artifacts")},
            "objects": {"type": "file", "path": str(stores / "objects")},
            "log": {"level": "info", "file": str(base / "worker.log")},
        }
        worker = Worker(base, config, {"ssh": {}}).start()
        server = Server(postgres.connect("djinn"), redis.client(), "builds")
        build = server.queue_build(BUILD, variables=[("GREETING", "djinn-worker")],
                                   artifacts={"check": [("report.txt", "report.txt")]})
        print(f"Queued build {build.id}\n")
        row = server.wait(build.id, timeout=120)
        print(row["output"])
        for job in server.jobs(build.id):
            print(f"  job {job['name']:<16} {job['status']}")
        artifact = server.sql("SELECT size, encode(sha256, 'hex') AS sha256 FROM build_artifacts "
                              "WHERE build_id = %s", build.id)[0]
        print(f"  artifact report.txt: {artifact['size']} bytes, sha256 {artifact['sha256']}")
        print(f"\nBuild {build.id}: {row['status']}")
        return 0 if row["status"] == "passed" else 1
    finally:
        if worker:
            worker.stop()
        for service in (redis, postgres):
            if service:
                service.stop()
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
