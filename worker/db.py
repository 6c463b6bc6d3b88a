"""Every SQL statement the worker issues, against the tables of Djinn's schema.

Connections run in autocommit: each statement is one small change that is
visible to the server at once (live job output, statuses), and the few
multi-statement changes use an explicit transaction.
"""

from __future__ import annotations

import base64
import logging
import os
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Callable

import psycopg2
import psycopg2.extensions

from .config import DatabaseConfig
from .model import (
    FAILED, RUNNING, Artifact, Build, FailureNotice, Job, Key, Object, PullRequest, Stage, StopBuild,
    Trigger, Variable,
)

log = logging.getLogger(__name__)

Connection = psycopg2.extensions.connection
# What pg_stat_activity shows for the connections build processes use.
BUILD_APPLICATION = "djinn-worker build"
Error = psycopg2.Error


class BuildRowError(Exception):
    """The build's rows cannot be run as they are; the message says which row."""


def connect(config: DatabaseConfig, application: str = "djinn-worker") -> Connection:
    """Every connection the worker makes, so that each one (supervisor, build
    process, spare, mail) goes over the same TLS. GSSAPI encryption is off
    unless PGGSSENCMODE asks for it: the worker logs in with a password, and
    libpq's default would look for Kerberos credentials at every connection,
    which costs each build its time and the supervisor memory."""
    address = config.address
    conn = psycopg2.connect(
        host=address.host, port=address.port, dbname=config.name, user=config.username,
        password=config.password, connect_timeout=10, application_name=application,
        client_encoding="UTF8", gssencmode=os.environ.get("PGGSSENCMODE", "disable"),
        **(config.ssl.params if config.ssl else {}),
    )
    conn.autocommit = True
    return conn


def one_line(exc: Exception) -> str:
    """libpq's message as one line for the log and a daemon's start report.

    libpq writes a line per address tried and indents its hints under them;
    an indented line that starts in lower case wraps the sentence above it.
    """
    parts: list[str] = []
    for line in str(exc).splitlines():
        text = line.strip()
        if text and parts and line[0].isspace() and text[0].islower():
            parts[-1] += " " + text
        elif text:
            parts.append(text)
    return "; ".join(parts) or type(exc).__name__


def ping(conn: Connection) -> None:
    """Ask the server for nothing: it is there and answering."""
    with conn.cursor() as cur:
        cur.execute("SELECT 1")


class ClaimRefused(Exception):
    """The build cannot be claimed; the message says why."""


@dataclass(frozen=True)
class Claimed:
    """A claim: the build's kill secret, and its started_at, which tells this
    run of the build from any later one."""

    build_id: int
    secret: str | None
    started_at: datetime
    # For the supervisor's metrics: the build's driver and its time in the queue.
    driver: str = ""
    waited: float = 0.0


_CLAIM = (
    "UPDATE builds SET status = 'running', started_at = clock_timestamp() "
    "WHERE id = %s AND status = 'queued' RETURNING secret, started_at, "
    "(SELECT type FROM build_drivers WHERE build_id = builds.id ORDER BY id LIMIT 1), "
    "EXTRACT(EPOCH FROM started_at - created_at)"
)


def claim(conn: Connection, build_id: int) -> Claimed:
    """Mark a queued build running, or raise ClaimRefused.

    The status check and the update are one statement, so two workers given
    the same build id can never both run it. conn must be prepared.
    """
    with conn.cursor() as cur:
        cur.execute("EXECUTE djinn_claim(%s)", (build_id,))
        row = cur.fetchone()
        if row:
            return Claimed(build_id, row[0], row[1], row[2] or "", max(float(row[3] or 0), 0.0))
        cur.execute("SELECT status FROM builds WHERE id = %s", (build_id,))
        row = cur.fetchone()
    raise ClaimRefused("no such build" if row is None else f"the build is already {row[0]}")


# The build and all its rows in one round trip: each list is a JSON array of
# rows (NULL when empty), in the order the worker runs or applies them. The
# first three columns tell take_build whether the build is this claim's.
_LOAD_BUILD = """
SELECT current_setting('djinn_worker.locked', TRUE), b.status, b.started_at,
  b.user_id, b.namespace_id, b.number, b.secret, d.type, d.config,
  (SELECT json_agg(json_build_array(id, name, can_fail) ORDER BY created_at, id)
     FROM build_stages WHERE build_id = b.id),
  (SELECT json_agg(json_build_array(id, stage_id, name, commands) ORDER BY created_at, id)
     FROM build_jobs WHERE build_id = b.id),
  (SELECT json_agg(json_build_array(id, job_id, source, name, hash) ORDER BY id)
     FROM build_artifacts WHERE build_id = b.id AND deleted_at IS NULL),
  -- to_jsonb reads the masked column of later schemas, and is NULL where the
  -- column does not exist, without asking for the schema.
  (SELECT json_agg(json_build_array(key, value,
            COALESCE((to_jsonb(v)->>'masked')::boolean, FALSE)) ORDER BY id)
     FROM build_variables v WHERE build_id = b.id),
  (SELECT json_agg(json_build_array(name, encode(key, 'base64'), config, location) ORDER BY id)
     FROM build_keys WHERE build_id = b.id),
  (SELECT json_agg(json_build_array(bo.id, bo.source, bo.name, o.hash) ORDER BY bo.id)
     FROM build_objects bo LEFT JOIN objects o ON o.id = bo.object_id AND o.deleted_at IS NULL
     WHERE bo.build_id = b.id),
  (SELECT username FROM users WHERE id = b.user_id),
  (SELECT json_build_array(p.name, encode(p.access_token, 'base64'), r.name, r.repo_id,
                           t.data->>'sha')
     FROM build_triggers t JOIN providers p ON p.id = t.provider_id
     LEFT JOIN provider_repos r ON r.id = t.repo_id
     WHERE t.build_id = b.id AND t.type = 'pull' ORDER BY t.id LIMIT 1)
FROM builds b LEFT JOIN LATERAL (
  SELECT type, config FROM build_drivers WHERE build_id = b.id ORDER BY id LIMIT 1
) d ON TRUE WHERE b.id = %s
"""


# Planning the load costs the server more than running it, and planning the
# claim almost as much: both run prepared, planned once per connection.
_PREPARE = "; ".join(f"PREPARE {name}(int) AS " + sql.replace("%s", "$1")
                     for name, sql in (("djinn_load", _LOAD_BUILD), ("djinn_claim", _CLAIM)))


def prepare(conn: Connection) -> None:
    """Make a new connection ready for claim and take_and_load."""
    _execute(conn, _PREPARE, None)


def warm(conn: Connection) -> None:
    """prepare, and run the build's statements once, so that the backend's
    catalog caches are warm before a build needs them."""
    prepare(conn)
    with conn.cursor() as cur:
        cur.execute(f"{_LOCK}; EXECUTE djinn_load(0)", (_BUILD_LOCKS, 0))
        cur.execute("SELECT pg_advisory_unlock(%s, 0)", (_BUILD_LOCKS,))


def load_build(conn: Connection, build_id: int) -> Build:
    """The build's rows, for a process that does not run it."""
    with conn.cursor() as cur:
        cur.execute(_LOAD_BUILD, (build_id,))
        return _build(build_id, cur.fetchone())


def _build(build_id: int, row: tuple | None) -> Build:
    if row is None:
        raise BuildRowError(f"build {build_id} does not exist")
    _, _, _, user_id, namespace_id, number, secret, driver_type, driver, *lists, username, pull = row
    stage_rows, job_rows, artifact_rows, variable_rows, key_rows, object_rows = (
        rows or [] for rows in lists)
    if driver_type is None:
        raise BuildRowError(f"build {build_id} has no build_drivers row")
    if not isinstance(driver, dict):
        raise BuildRowError(f"build_drivers.config of build {build_id} is not a JSON object")
    build = Build(
        id=build_id, user_id=user_id, namespace_id=namespace_id, number=number,
        secret=secret, driver_type=driver_type, driver=driver, username=username or "",
        pull=_pull_request(pull),
    )
    stages = {sid: Stage(sid, name, can_fail) for sid, name, can_fail in stage_rows}
    build.stages = list(stages.values())
    jobs: dict[int, Job] = {}
    for jid, stage_id, name, commands in job_rows:
        if stage_id not in stages:
            raise BuildRowError(f"build_jobs row {jid} belongs to stage {stage_id} of another build")
        jobs[jid] = Job(jid, name, commands)
        stages[stage_id].jobs.append(jobs[jid])
    for aid, job_id, source, name, hash_ in artifact_rows:
        if job_id not in jobs:
            raise BuildRowError(f"build_artifacts row {aid} belongs to job {job_id} of another build")
        jobs[job_id].artifacts.append(Artifact(aid, source, name, hash_))
    build.variables = [Variable(*row) for row in variable_rows]
    build.keys = [
        Key(name, base64.b64decode(key), config, location or f"/root/.ssh/{name}")
        for name, key, config, location in key_rows
    ]
    build.objects = [Object(*row) for row in object_rows]
    return build


def _pull_request(row: list | None) -> PullRequest | None:
    """The first pull trigger's commit, if it names a provider, repository and commit."""
    if row is None:
        return None
    provider, token, repo, repo_id, sha = row
    if repo_id is None or not sha:
        return None
    return PullRequest(provider, base64.b64decode(token) if token else None, repo or "",
                       repo_id, sha)


def find_image(conn: Connection, user_id: int, namespace_id: int | None, driver: str,
               name: str) -> tuple[int, str] | None:
    """(owner's user id, hash) of the image a build names, or None.

    A build in a namespace uses that namespace's images, any other build its
    user's, as the original worker looks them up; the newest wins a tie.
    """
    column = "namespace_id" if namespace_id is not None else "user_id"
    with conn.cursor() as cur:
        cur.execute(
            f"SELECT user_id, hash FROM images WHERE {column} = %s AND driver = %s "
            "AND name = %s ORDER BY id DESC LIMIT 1",
            (namespace_id if namespace_id is not None else user_id, driver, name),
        )
        row = cur.fetchone()
    return (row[0], row[1]) if row else None


def _execute(conn: Connection, sql: str, args: tuple | None) -> None:
    with conn.cursor() as cur:
        cur.execute(sql, args)


# Bigger writes go one statement at a time: each is a copy of the text in
# the query, and the build process's memory is bounded by the largest.
_ONE_TRIP = 256 * 1024


class Utf8Text:
    """Output already encoded as UTF-8 (without NUL), sent as a string literal
    as it is: decoding megabytes only for psycopg2 to encode them again would
    cost a copy or two of the whole text."""

    def __init__(self, data: bytes):
        self.data = data

    def getquoted(self) -> bytes:
        data = self.data
        if b"\\" in data or b"'" in data:
            data = data.replace(b"\\", b"\\\\").replace(b"'", b"''")
        return b"".join((b"E'", data, b"'"))


psycopg2.extensions.register_adapter(Utf8Text, lambda text: text)


# One statement and its arguments, for execute() to send with others.
Statement = tuple[str, tuple]


def execute(conn: Connection, statements: list[Statement]) -> None:
    """Send statements in as few round trips as memory allows, in one transaction."""
    if not statements:
        return
    size = sum(len(arg.data) for _, args in statements for arg in args if isinstance(arg, Utf8Text))
    if size <= _ONE_TRIP:
        # Several statements in one simple query are one implicit transaction:
        # no BEGIN and COMMIT round trips around them.
        _execute(conn, "; ".join(sql for sql, _ in statements),
                 tuple(arg for _, args in statements for arg in args))
        return
    with conn:
        for sql, args in statements:
            _execute(conn, sql, args)


def output(table: str, row_id: int, data: bytes, keep: int | None) -> Statement:
    """New output of the build log (table "builds") or of a job ("build_jobs").

    data is UTF-8; keep is None to append it, else the number of characters
    stored so far to keep (a capped log's head) with the data after them.
    """
    assert table in ("builds", "build_jobs")
    if keep is None:
        return (f"UPDATE {table} SET output = COALESCE(output, '') || %s WHERE id = %s",
                (Utf8Text(data), row_id))
    return (f"UPDATE {table} SET output = left(output, %s) || %s WHERE id = %s",
            (keep, Utf8Text(data), row_id))


# Statement times come from clock_timestamp(): statements sent together share
# one transaction, and so one NOW().

def start_job(job_id: int) -> Statement:
    return ("UPDATE build_jobs SET status = 'running', started_at = clock_timestamp() "
            "WHERE id = %s", (job_id,))


def finish_job(job_id: int, status: str) -> Statement:
    return ("UPDATE build_jobs SET status = %s, finished_at = clock_timestamp() WHERE id = %s",
            (status, job_id))


def start_stage(stage_id: int) -> Statement:
    return ("UPDATE build_stages SET status = 'running', started_at = clock_timestamp() "
            "WHERE id = %s", (stage_id,))


def finish_stage(stage_id: int, status: str) -> Statement:
    return ("UPDATE build_stages SET status = %s, finished_at = clock_timestamp() WHERE id = %s",
            (status, stage_id))


def mark_placed(build_object_id: int) -> Statement:
    return ("UPDATE build_objects SET placed = TRUE WHERE id = %s", (build_object_id,))


def record_artifact(artifact_id: int, size: int, md5: bytes, sha256: bytes) -> Statement:
    return ("UPDATE build_artifacts SET size = %s, md5 = %s, sha256 = %s WHERE id = %s",
            (size, psycopg2.Binary(md5), psycopg2.Binary(sha256), artifact_id))


def finish_build(build_id: int, status: str) -> Statement:
    return ("UPDATE builds SET status = %s, finished_at = clock_timestamp() WHERE id = %s",
            (status, build_id))


def abandon_build(conn: Connection, build_id: int, status: str = FAILED, line: str = "") -> bool:
    """Finish a running build that its process can no longer finish itself.

    Used by the supervisor when a child died without reporting, and by a
    child whose build rows cannot be run. Every unfinished job and stage ends
    with the same status. Returns False when the build was no longer running.
    """
    with conn, conn.cursor() as cur:
        return _abandon(cur, build_id, status, line)


def _abandon(cur, build_id: int, status: str, line: str) -> bool:
    cur.execute(
        "UPDATE builds SET status = %s, finished_at = NOW(), "
        "output = COALESCE(output, '') || %s WHERE id = %s AND status = %s RETURNING id",
        (status, line, build_id, RUNNING),
    )
    if cur.fetchone() is None:
        return False
    for table in ("build_jobs", "build_stages"):
        cur.execute(
            f"UPDATE {table} SET status = %s, finished_at = NOW() "
            "WHERE build_id = %s AND status IN ('queued', 'running')",
            (status, build_id),
        )
    return True


# The advisory lock space of build processes ("djin"), apart from any lock
# the server may take.
_BUILD_LOCKS = 0x646A696E


# The lock is taken by a statement of its own, so that the next one, sent in
# the same round trip, reads the build as it is once the lock is held (each
# statement sees what was committed when it began); the lock's outcome goes
# from one to the other in a setting of the session.
_LOCK = "SELECT set_config('djinn_worker.locked', pg_try_advisory_lock(%s, %s)::text, FALSE)"


def take_build(conn: Connection, claimed: Claimed) -> bool:
    """Take the build's lock for as long as this session lasts, if this
    claim is still the build's run; False if another process has it, or the
    build was settled or run again meanwhile.

    PostgreSQL drops the lock when the session ends, whatever ends it, so
    the lock says whether anybody is still running the build.
    """
    with conn.cursor() as cur:
        cur.execute(f"{_LOCK}; SELECT current_setting('djinn_worker.locked'), b.status, "
                    "b.started_at FROM (SELECT) one LEFT JOIN builds b ON b.id = %s",
                    (_BUILD_LOCKS, claimed.build_id, claimed.build_id))
        return _taken(cur, claimed, cur.fetchone())


def take_and_load(conn: Connection, claimed: Claimed) -> Build | None:
    """take_build and load_build in one round trip, on a prepared
    connection; None if not taken."""
    with conn.cursor() as cur:
        cur.execute(f"{_LOCK}; EXECUTE djinn_load(%s)",
                    (_BUILD_LOCKS, claimed.build_id, claimed.build_id))
        row = cur.fetchone()
        if row is not None and not _taken(cur, claimed, row):
            return None
    return _build(claimed.build_id, row)


def _taken(cur, claimed: Claimed, row: tuple) -> bool:
    """Whether the lock was taken and the build is this claim's run; the
    lock is let go again if it is not."""
    locked, status, started_at = row[:3]
    if locked != "true":
        return False
    if (status, started_at) == (RUNNING, claimed.started_at):
        return True
    cur.execute("SELECT pg_advisory_unlock(%s, %s)", (_BUILD_LOCKS, claimed.build_id))
    return False


ORPHANED = "orphaned"


def recover_orphan(conn: Connection, build_id: int, rerun_line: str, failed_line: str,
                   requeue: Callable[[], None]) -> str:
    """Settle a build whose worker is gone: what was done, as one word.

    'running' while a build process still holds its lock (it finishes the
    build itself), 'finished' if it already ended. Otherwise the build was
    orphaned: the first time it is run again ('requeued': its rows reset,
    tagged orphaned, requeue() called before the change is committed, so a
    build is never queued with no payload for it), the second time it ends
    'failed'.
    """
    with conn, conn.cursor() as cur:
        cur.execute("SELECT pg_try_advisory_xact_lock(%s, %s)", (_BUILD_LOCKS, build_id))
        if not cur.fetchone()[0]:
            return RUNNING
        cur.execute("SELECT status FROM builds WHERE id = %s FOR UPDATE", (build_id,))
        row = cur.fetchone()
        if row is None or row[0] != RUNNING:
            return "finished"
        cur.execute("SELECT 1 FROM build_tags WHERE build_id = %s AND name = %s",
                    (build_id, ORPHANED))
        if cur.fetchone():
            _abandon(cur, build_id, FAILED, failed_line)
            return FAILED
        cur.execute("INSERT INTO build_tags (user_id, build_id, name) "
                    "SELECT user_id, id, %s FROM builds WHERE id = %s", (ORPHANED, build_id))
        for sql in (
            "UPDATE build_jobs SET status = 'queued', output = NULL, started_at = NULL, "
            "finished_at = NULL WHERE build_id = %s",
            "UPDATE build_stages SET status = 'queued', started_at = NULL, finished_at = NULL "
            "WHERE build_id = %s",
            "UPDATE build_objects SET placed = FALSE WHERE build_id = %s",
            "UPDATE build_artifacts SET size = NULL, md5 = NULL, sha256 = NULL WHERE build_id = %s",
        ):
            cur.execute(sql, (build_id,))
        cur.execute("UPDATE builds SET status = 'queued', output = %s, started_at = NULL, "
                    "finished_at = NULL WHERE id = %s", (rerun_line, build_id))
        requeue()
        return "requeued"


class LostBuild(StopBuild):
    """Another process runs the build now: one writer per build."""


class Unavailable(StopBuild):
    """PostgreSQL stayed away longer than database.outage allows."""


class Session:
    """A build process's connection to PostgreSQL, kept through outages.

    Every statement goes through call(): when the server goes away, it
    reconnects with backoff, takes the build's lock again and checks that
    the build is still this run's, then repeats the statement. Shared by the
    build's threads; one of them reconnects while the others wait.
    """

    def __init__(self, config: DatabaseConfig, claimed: Claimed, outage: float,
                 on_event: Callable[[str], None] = lambda event: None):
        self.config, self.claimed, self.outage = config, claimed, outage
        # Told "error" when the connection is lost, "reconnect" once it is back.
        self.on_event = on_event
        self.conn: Connection | None = None
        self._lock = threading.RLock()
        self._stopped: StopBuild | None = None
        self._failed = False  # a statement failed: the connection is not handed back

    def open(self, conn: Connection | None = None) -> Build:
        """Connect (or take over conn, opened ahead), take the build and load
        it; LostBuild if it is no longer ours, BuildRowError if its rows
        cannot be run (the build is taken then)."""
        if conn is None:
            conn = connect(self.config, application=BUILD_APPLICATION)
            prepare(conn)
        self.conn = conn
        build = self.call(take_and_load, self.claimed)
        if build is None:
            self._stop(LostBuild(f"build {self.claimed.build_id} is run by another process"))
        return build

    def call(self, work: Callable, *args):
        with self._lock:
            while True:
                if self._stopped:
                    raise self._stopped
                try:
                    return work(self.conn, *args)
                except (psycopg2.OperationalError, psycopg2.InterfaceError) as exc:
                    self._reconnect(exc)
                except psycopg2.Error:
                    self._failed = True
                    raise

    def _reconnect(self, exc: Exception) -> None:
        build_id = self.claimed.build_id
        self.on_event("error")
        log.error("build %s: database at %s: %s; reconnecting for up to %gs", build_id,
                  self.config.addr, one_line(exc), self.outage)
        self.close()
        deadline, delay = time.monotonic() + self.outage, 0.1
        while True:
            try:
                self.conn = connect(self.config, application=BUILD_APPLICATION)
                prepare(self.conn)
                taken = take_build(self.conn, self.claimed)
            except psycopg2.Error:
                self.close()
                if time.monotonic() + delay > deadline:
                    self._stop(Unavailable(
                        f"build {build_id}: the database at {self.config.addr} stayed away "
                        f"longer than database.outage ({self.outage:g}s)"))
                time.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            if not taken:
                self._stop(LostBuild(f"build {build_id}: another worker took the build over "
                                     "while the database was away"))
            log.info("build %s: database back; carrying on", build_id)
            self.on_event("reconnect")
            return

    def hand_back(self, lent: Connection | None) -> bool:
        """End the session; True if its connection is lent, still the one in
        use, never failed a statement, and has been reset for the lender's
        next build process: the build's lock dropped and settings reset,
        the prepared load kept. This process must not touch it again; any
        other connection is closed."""
        with self._lock:
            conn, self.conn = self.conn, None
            if conn is None:
                return False
            if conn is lent and not self._stopped and not self._failed:
                try:
                    _execute(conn, "SELECT pg_advisory_unlock_all(); RESET ALL", None)
                    if conn.info.transaction_status == psycopg2.extensions.TRANSACTION_STATUS_IDLE:
                        return True
                except psycopg2.Error:
                    pass
            conn.close()
            return False

    def _stop(self, reason: StopBuild) -> None:
        self._stopped = reason
        self.close()
        raise reason

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


def failure_notice(conn: Connection, build_id: int, status: str, host: str) -> FailureNotice:
    """What the failure mail says: owner first, then the namespace's collaborators."""
    with conn.cursor() as cur:
        cur.execute(
            "SELECT b.number, b.namespace_id, b.output, u.username, u.email "
            "FROM builds b JOIN users u ON u.id = b.user_id WHERE b.id = %s",
            (build_id,),
        )
        number, namespace_id, output, username, email = cur.fetchone()
        cur.execute(
            "SELECT u.email FROM namespace_collaborators c JOIN users u ON u.id = c.user_id "
            "WHERE c.namespace_id = %s ORDER BY c.id",
            (namespace_id,),
        )
        recipients = [email] + [row[0] for row in cur.fetchall()]
        cur.execute(
            "SELECT type, comment, data FROM build_triggers WHERE build_id = %s ORDER BY id LIMIT 1",
            (build_id,),
        )
        row = cur.fetchone()
    trigger = Trigger(row[0], row[1] or "", row[2] or {}) if row else None
    return FailureNotice(build_id, number, status, host, username, email, recipients, trigger,
                         output or "")
