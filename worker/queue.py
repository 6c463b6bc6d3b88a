"""Every Redis key, channel and payload the worker touches.

Producers LPUSH a JSON payload onto a list and workers pop from the right, so
the queue is FIFO. The server kills a build by publishing its secret on the
channel kill-<build id>.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from dataclasses import dataclass

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from .config import RedisConfig

log = logging.getLogger(__name__)


class PayloadError(ValueError):
    """A queue payload the worker cannot act on; the message says why."""


@dataclass(frozen=True)
class Payload:
    build_id: int
    host: str


def parse_payload(raw: bytes) -> Payload:
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise PayloadError("not valid JSON") from None
    if not isinstance(data, dict):
        raise PayloadError("not a JSON object")
    build_id = data.get("build_id")
    if isinstance(build_id, bool) or not isinstance(build_id, int) or build_id <= 0:
        raise PayloadError(f"build_id must be a positive integer, got {build_id!r}")
    host = data.get("host", "")
    if not isinstance(host, str):
        raise PayloadError(f"host must be a string, got {host!r}")
    return Payload(build_id, host)


def encode_payload(build_id: int, host: str) -> str:
    return json.dumps({"build_id": build_id, "host": host})


# Kills are published on KILL_PREFIX + the build id.
KILL_PREFIX = "kill-"


def _address(config: RedisConfig) -> dict:
    address = config.address
    if address.unix:
        return {"unix_socket_path": address.host}
    return {"host": address.host, "port": address.port}


def connect(config: RedisConfig) -> redis.Redis:
    """A client that tries once: redis-py's own retries would sleep inside
    the supervisor's event loop (seconds with Redis away); the worker backs
    off by itself, between turns of the loop."""
    return redis.Redis(
        **_address(config), password=config.password or None, db=config.db,
        socket_connect_timeout=10, retry=Retry(NoBackoff(), 0),
    )


def claims_key(identity: str) -> str:
    return f"djinn-worker:{identity}:claimed"


def lease_key(identity: str) -> str:
    return f"djinn-worker:lease:{identity}"


# Every identity that has recorded claims: where any worker looks for builds
# whose worker is gone.
WORKERS_KEY = "djinn-worker:workers"


@dataclass(frozen=True)
class Claim:
    """A build a worker claimed, as recorded until it ends."""

    payload: Payload
    queue: str
    boot: str = ""  # the boot of the claimer's host: its files are there


class Reply:
    """Commands sent at once on a connection of the client's pool, whose
    answers are read later by wait(): one round trip that overlaps other work."""

    def __init__(self, client: redis.Redis, commands: list[tuple]):
        self.pool = client.connection_pool
        self.conn = self.pool.get_connection()
        self.count = len(commands)
        try:
            self.conn.send_packed_command(self.conn.pack_commands(commands))
        except BaseException:
            self._release(broken=True)
            raise

    def wait(self) -> None:
        """Raises RedisError if a command failed or Redis went away."""
        error, broken = None, True
        try:
            for _ in range(self.count):
                try:
                    self.conn.read_response()
                except redis.ResponseError as exc:  # the next answers still come
                    error = error or exc
            broken = False
        finally:
            self._release(broken)
        if error:
            raise error

    def _release(self, broken: bool) -> None:
        if broken:
            self.conn.disconnect()
        self.pool.release(self.conn)


class Claims:
    """The builds one worker identity claimed and has not seen end, in Redis.

    Whoever finds the worker gone (its own next start, or any worker once
    its lease has expired) reads this record to settle those builds, and to
    remove the temporary files of theirs that were on its host.
    """

    def __init__(self, client: redis.Redis, identity: str):
        self.client, self.identity, self.key = client, identity, claims_key(identity)

    def add(self, payload: Payload, queue: str) -> Reply:
        """Send the note of a claim; the caller claims the build in
        PostgreSQL while Redis answers, then waits for the Reply.

        Noting a build before it is claimed is safe: recovery leaves a
        noted build that is not running to whoever runs or ran it.
        """
        value = json.dumps({"build_id": payload.build_id, "host": payload.host, "queue": queue,
                            "boot": boot_id()})
        return Reply(self.client, [("SADD", WORKERS_KEY, self.identity),
                                   ("HSET", self.key, str(payload.build_id), value)])

    def add_path(self, build_id: int, path: str) -> None:
        """A file or directory of the build's driver, to remove if nobody else does."""
        self.client.rpush(self._paths(build_id), path)

    def paths(self, build_id: int) -> list[str]:
        return [p.decode() for p in self.client.lrange(self._paths(build_id), 0, -1)]

    def remove(self, build_id: int) -> None:
        self.client.pipeline().hdel(self.key, str(build_id)).delete(self._paths(build_id)).execute()

    def _paths(self, build_id: int) -> str:
        return f"{self.key}:{build_id}:paths"

    def claims(self) -> list[Claim]:
        found = []
        for raw in self.client.hvals(self.key):
            try:
                data = json.loads(raw)
                found.append(Claim(parse_payload(raw), str(data.get("queue") or ""),
                                   str(data.get("boot") or "")))
            except (PayloadError, ValueError, AttributeError):
                log.error("ignored %r in %s: not a claim", raw[:200], self.key)
        return sorted(found, key=lambda c: c.payload.build_id)

    def forget_if_empty(self) -> None:
        """Drop this identity from the workers to look at once nothing is claimed."""
        if not self.client.exists(self.key):
            self.client.srem(WORKERS_KEY, self.identity)


def identities(client: redis.Redis) -> list[str]:
    return sorted(i.decode() for i in client.smembers(WORKERS_KEY))


class LeaseHeld(Exception):
    """Another live worker holds the lease of this identity."""


# Refreshes the lease only while it is still ours.
_REFRESH = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
    return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
    return redis.call('DEL', KEYS[1])
end
return 0
"""


class Lease:
    """A worker's claim to its identity while it lives: a key with a TTL.

    Refreshed from the supervisor's loop; when it expires, the worker is
    taken for gone and any worker on the queue settles its builds. The
    value names the holder's host boot and pid, so a restart on the same
    host after a crash can tell that the holder is dead and take over at once.
    """

    def __init__(self, client: redis.Redis, identity: str, ttl: float):
        self.client, self.identity, self.ttl = client, identity, ttl
        self.key = lease_key(identity)
        self.value = json.dumps({"identity": identity, "boot": boot_id(), "pid": os.getpid(),
                                 "since": time.time()})

    def acquire(self) -> str | None:
        """Take the lease; returns a note when a dead holder's lease was taken over.

        Raises LeaseHeld while another live worker holds it.
        """
        ttl = int(self.ttl * 1000)
        if self.client.set(self.key, self.value, px=ttl, nx=True):
            return None
        raw = self.client.get(self.key)
        try:
            holder = json.loads(raw) if raw else {}
        except ValueError:
            holder = {}
        if raw and not (holder.get("boot") == boot_id() and not _alive(holder.get("pid"))):
            raise LeaseHeld(
                f"another worker with identity {self.identity} holds its lease "
                f"(pid {holder.get('pid', '?')}, boot {str(holder.get('boot', '?'))[:8]}); "
                f"it expires {self.ttl:g}s after that worker stops refreshing it")
        self.client.set(self.key, self.value, px=ttl)
        return f"took over the lease of process {holder.get('pid')}, which is gone" if raw else None

    def refresh(self) -> bool:
        """False if the lease was lost (it expired and was taken meanwhile)."""
        ttl = int(self.ttl * 1000)
        if self.client.eval(_REFRESH, 1, self.key, self.value, ttl):
            return True
        return bool(self.client.set(self.key, self.value, px=ttl, nx=True))

    def release(self) -> None:
        self.client.eval(_RELEASE, 1, self.key, self.value)

    @staticmethod
    def expired(client: redis.Redis, identity: str) -> bool:
        return not client.exists(lease_key(identity))


def boot_id() -> str:
    """This boot of this host: a pid means nothing across a reboot."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as fh:
            return fh.read().strip()
    except OSError:
        return socket.gethostname()


def _alive(pid) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class KillChannel:
    """The supervisor's one subscription to every build's kill channel.

    One pattern subscription (kill-*) is in force from start to stop, so a
    kill the server sends the moment a build turns running always finds a
    listener, and claiming a build costs no subscription round trip; kills
    of builds this worker does not run are dropped by the supervisor. The
    connection's socket is watched by the event loop; after Redis comes
    back, the pattern is subscribed again.
    """

    def __init__(self, config: RedisConfig):
        self.config = config
        self._pubsub = None
        self._waiting: list[tuple[int, bytes]] = []

    def socket(self):
        """The subscription's socket, or None; redis-py may replace it when it
        reconnects by itself, so watchers compare the object, not its number."""
        conn = self._pubsub.connection if self._pubsub is not None else None
        return conn._sock if conn is not None else None

    def fileno(self) -> int:
        sock = self.socket()
        return sock.fileno() if sock is not None else -1

    def connect(self) -> None:
        """(Re)subscribe and wait for Redis to confirm; RedisError if Redis is
        away. Kills read meanwhile are kept."""
        self.close()
        self._pubsub = connect(self.config).pubsub()
        self._pubsub.psubscribe(KILL_PREFIX + "*")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            message = self._pubsub.get_message(timeout=1.0)
            if message is not None and message["type"] == "psubscribe":
                return
            if message is not None:
                self._keep(message)
        raise redis.TimeoutError(f"redis at {self.config.addr} did not confirm a subscription")

    def read(self) -> list[tuple[int, bytes]]:
        """The kill messages that have arrived: (build id, message)."""
        while True:
            message = self._pubsub.get_message(timeout=0.0)
            if message is None:
                break
            self._keep(message)
        found, self._waiting = self._waiting, []
        return found

    def _keep(self, message: dict) -> None:
        if message.get("type") != "pmessage":
            return
        channel = message["channel"].decode(errors="replace")
        build = channel.removeprefix(KILL_PREFIX)
        if build.isdigit():
            data = message["data"]
            self._waiting.append((int(build), data if isinstance(data, bytes) else str(data).encode()))

    def close(self) -> None:
        if self._pubsub is not None:
            try:
                self._pubsub.close()
            except redis.RedisError:
                pass
            self._pubsub = None


class Popper:
    """A BRPOP that the supervisor's event loop can wait on like any file.

    The command is sent on a connection of its own and its socket is watched
    by the loop, so the supervisor never blocks inside Redis. stop() ends a
    pending BRPOP with CLIENT UNBLOCK from a second connection: Redis then
    answers either nil or a payload it had already popped, never both, so a
    build can't be lost while the worker shuts down.
    """

    def __init__(self, config: RedisConfig, queues: list[str]):
        self.config, self.queues = config, queues
        self.client = connect(config)
        self._conn = None
        self._client_id = 0
        self.pending = False

    def fileno(self) -> int:
        """The BRPOP connection's socket, or -1 before the first start()."""
        if self._conn is None or self._conn._sock is None:
            return -1
        return self._conn._sock.fileno()

    def start(self) -> None:
        """Send BRPOP; the socket becomes readable when a payload (or nil) is in."""
        if self._conn is None:
            self._conn = self.client.connection_pool.make_connection()
            self._conn.connect()
            self._conn.send_command("CLIENT", "ID")
            self._client_id = int(self._conn.read_response())
        self._conn.send_command("BRPOP", *self.queues, 0)
        self.pending = True

    def read(self) -> tuple[str, bytes] | None:
        """The popped (queue, payload), or None when the pop was unblocked."""
        self.pending = False
        reply = self._conn.read_response()
        if reply is None:
            return None
        queue, raw = reply
        return queue.decode(), raw

    def unblock(self) -> None:
        if self.pending:
            self.client.client_unblock(self._client_id)

    def requeue(self, queue: str, raw: bytes) -> None:
        """Put a popped payload back where the next BRPOP will take it first."""
        self.client.rpush(queue, raw)

    def reset(self) -> None:
        """Forget a broken connection; the next start() makes a new one."""
        self.pending = False
        if self._conn is not None:
            self._conn.disconnect()
            self._conn = None

    def close(self) -> None:
        self.reset()
        self.client.close()
