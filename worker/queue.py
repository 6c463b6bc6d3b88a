"""Every Redis key, channel and payload the worker touches.

Producers LPUSH a JSON payload onto a list and workers pop from the right, so
the queue is FIFO. The server kills a build by publishing its secret on the
channel kill-<build id>.
"""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass
from typing import Callable

import redis

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


def kill_channel(build_id: int) -> str:
    return f"kill-{build_id}"


def _address(config: RedisConfig) -> dict:
    address = config.address
    if address.unix:
        return {"unix_socket_path": address.host}
    return {"host": address.host, "port": address.port}


def connect(config: RedisConfig) -> redis.Redis:
    return redis.Redis(
        **_address(config), password=config.password or None, db=config.db,
        socket_connect_timeout=10,
    )


def claims_key(identity: str) -> str:
    return f"djinn-worker:{identity}:claimed"


class Claims:
    """The payloads of builds this worker claimed and has not seen end, in Redis.

    A worker whose host rebooted, or whose build processes died with it,
    leaves those builds `running` with nobody to finish them; this record
    tells the next start of the same worker which builds to look at, and
    which temporary files of theirs to remove.
    """

    def __init__(self, client: redis.Redis, identity: str):
        self.client, self.key = client, claims_key(identity)

    def add(self, payload: Payload) -> None:
        self.client.hset(self.key, str(payload.build_id), encode_payload(payload.build_id, payload.host))

    def add_path(self, build_id: int, path: str) -> None:
        """A file or directory of the build's driver, to remove if nobody else does."""
        self.client.rpush(self._paths(build_id), path)

    def paths(self, build_id: int) -> list[str]:
        return [p.decode() for p in self.client.lrange(self._paths(build_id), 0, -1)]

    def remove(self, build_id: int) -> None:
        self.client.pipeline().hdel(self.key, str(build_id)).delete(self._paths(build_id)).execute()

    def _paths(self, build_id: int) -> str:
        return f"{self.key}:{build_id}:paths"

    def payloads(self) -> list[Payload]:
        found = []
        for raw in self.client.hvals(self.key):
            try:
                found.append(parse_payload(raw))
            except PayloadError:
                log.error("ignored %r in %s: not a payload", raw[:200], self.key)
        return sorted(found, key=lambda p: p.build_id)


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


class KillWatcher:
    """Listens on kill-<build id> and calls on_kill when the build's secret arrives."""

    def __init__(self, config: RedisConfig, build_id: int, secret: str | None,
                 on_kill: Callable[[], None]):
        self.build_id, self.secret, self.on_kill = build_id, secret, on_kill
        self.client = connect(config)
        self.pubsub = self.client.pubsub(ignore_subscribe_messages=True)
        self.pubsub.subscribe(**{kill_channel(build_id): self._message})
        self._thread = threading.Thread(
            target=self._listen, name=f"kill-{build_id}", daemon=True,
        )
        self._thread.start()

    def _listen(self) -> None:
        try:
            for _ in self.pubsub.listen():
                pass
        except (redis.ConnectionError, ValueError, AttributeError):
            pass  # closed by stop(), or Redis went away: kills are best effort

    def _message(self, message: dict) -> None:
        data = message.get("data")
        text = data.decode(errors="replace") if isinstance(data, bytes) else str(data)
        if self.secret and text == self.secret:
            log.info("build %s: kill requested", self.build_id)
            self.on_kill()
        else:
            log.info("build %s: ignored a kill message that is not the build's secret", self.build_id)

    def stop(self) -> None:
        try:
            self.pubsub.close()
        finally:
            self.client.close()
