"""Settling the builds of workers that are gone, from any worker on the queue.

Every worker records the builds it claims under its identity and holds a
lease in Redis while it lives. A build is orphaned when its worker's lease
has expired (or, for this worker's own record, when no process of this
worker runs it) and no process holds its PostgreSQL lock. An orphaned build
runs again once, tagged `orphaned`; orphaned a second time, it fails.
"""

from __future__ import annotations

import logging
import shutil
from datetime import datetime, timezone
from typing import Callable

import redis

from . import db
from .model import FAILED, RUNNING, done_line
from .queue import Claim, Claims, Lease, boot_id, encode_payload, identities

log = logging.getLogger(__name__)


class Recovery:
    def __init__(self, client: redis.Redis, identity: str, default_queue: str,
                 database: Callable[[Callable], object], settled: Callable[[Claim, str], None]):
        # database(work) runs work(conn) on the supervisor's connection.
        self.client, self.identity, self.default_queue = client, identity, default_queue
        # Told each orphan put back to run again ("requeued") or failed.
        self.database, self.settled = database, settled

    def run(self, running: set[int]) -> None:
        """One pass over every identity's record; RedisError or psycopg2.Error
        end the pass early (the next pass goes on)."""
        for identity in sorted(set(identities(self.client)) | {self.identity}):
            own = identity == self.identity
            if not own and not Lease.expired(self.client, identity):
                continue
            record = Claims(self.client, identity)
            for claim in record.claims():
                if own and claim.payload.build_id in running:
                    continue
                self._settle(record, claim, own)
            record.forget_if_empty()

    def _settle(self, record: Claims, claim: Claim, own: bool) -> None:
        build_id = claim.payload.build_id
        who = "this worker" if own else f"worker {record.identity}"
        when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
        rerun = f"Build orphaned: {who} lost it at {when}; running it again\n"
        failed = f"\nBuild orphaned again: {who} lost it at {when}\n{done_line(FAILED)}"
        queue = claim.queue or self.default_queue

        def requeue() -> None:
            self.client.rpush(queue, encode_payload(build_id, claim.payload.host))

        outcome = self.database(lambda conn: db.recover_orphan(conn, build_id, rerun, failed, requeue))
        if outcome == RUNNING:
            log.debug("build %d: still run by a process of %s; left to it", build_id, who)
            return
        if outcome == "requeued":
            log.error("build %d: orphaned by %s; put back on %s to run again", build_id, who, queue)
        elif outcome == FAILED:
            log.error("build %d: orphaned a second time by %s; marked failed", build_id, who)
        if outcome in ("requeued", FAILED):
            self.settled(claim, outcome)
        if outcome != "finished" and claim.boot == boot_id():  # its files are on this host
            remove_paths(build_id, record.paths(build_id))
        record.remove(build_id)


def remove_paths(build_id: int, paths: list[str]) -> None:
    """The temporary files and directories a build's driver left."""
    for path in paths:
        shutil.rmtree(path, ignore_errors=True)
        log.info("build %d: removed %s", build_id, path)
