"""Reading and validating worker.toml and driver.toml into typed objects.

Everything is checked here, before the worker connects to anything, so that a
typo in a config file is one clear line at start-up and never a surprise in
the middle of a build. Each error names the file, the key and what is wrong.
"""

from __future__ import annotations

import os
import socket
import platform
import re
import tomllib
import urllib.parse
from dataclasses import dataclass, field
from typing import Any

from .output import parse_size

DRIVER_TYPES = ("docker", "qemu", "ssh", "os")
# "*" means every driver that runs builds in isolation; "os" runs builds on
# the worker's own host, so it has to be asked for by name.
ALL_DRIVERS = ("docker", "qemu", "ssh")
LOG_LEVELS = ("debug", "info", "error")
STORE_TYPES = ("file",)
QEMU_ACCELS = ("auto", "kvm", "tcg")
POSTGRES_PORT, REDIS_PORT, SMTP_PORT = 5432, 6379, 25
METRICS_PORT = 9252  # GitLab Runner's, which operators' scrape configs know
LOG_FORMATS = ("text", "json")
# images.path's default, which is also where qemu.disks defaults to.
IMAGES_PATH = "/var/lib/djinn/images"

# Go's machine names for the host, as the original worker's qemu-<arch> uses.
_HOST_ARCH = {"amd64": "x86_64", "arm64": "aarch64"}


class ConfigError(Exception):
    """A problem in a config file, phrased for the operator who wrote it."""

    def __init__(self, path: str, key: str, problem: str):
        self.path, self.key, self.problem = path, key, problem
        where = f"{path}: {key}: " if key else f"{path}: "
        super().__init__(where + problem)


_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")
_DURATION_UNITS = {
    "ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6,
    "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0,
}


def parse_duration(text: str) -> float:
    """Parse a Go duration ("30m", "1h30m", "1.5s") into seconds.

    Go syntax is kept so that configs written for the original worker load
    unchanged. Negative durations are refused: nothing here can use them.
    """
    if text == "0":
        return 0.0
    pos, total = 0, 0.0
    if not text:
        raise ValueError("empty duration")
    while pos < len(text):
        match = _DURATION_PART.match(text, pos)
        if not match:
            raise ValueError(
                f"bad duration {text!r}: expected numbers with units "
                "ns, us, ms, s, m or h, like \"30m\" or \"1h30m\""
            )
        total += float(match.group(1)) * _DURATION_UNITS[match.group(2)]
        pos = match.end()
    return total


@dataclass(frozen=True)
class Address:
    """Where a server listens: a host and port, or a unix socket path."""

    host: str
    port: int

    @property
    def unix(self) -> bool:
        return self.host.startswith("/")


def parse_addr(addr: str, default_port: int, unix: bool = False) -> Address:
    """Parse host:port, [v6]:port, a bare host, a bare IPv6 address, or
    (with unix) an absolute unix socket path; ValueError says what is wrong.

    One parser for every address the worker is given, so that PostgreSQL,
    Redis, SMTP and ssh hosts all accept the same forms.
    """
    if not addr or any(c.isspace() for c in addr):
        raise ValueError(f"bad address {addr!r}: expected host:port")
    if addr.startswith("/"):
        if not unix:
            raise ValueError(f"bad address {addr!r}: a unix socket is not supported here")
        return Address(addr, default_port)
    if addr.startswith("["):
        host, bracket, rest = addr[1:].partition("]")
        if not bracket or ":" not in host or (rest and not rest.startswith(":")):
            raise ValueError(f"bad address {addr!r}: expected [IPv6 address]:port")
        port = rest[1:] if rest else str(default_port)
    elif addr.count(":") > 1:
        host, port = addr, str(default_port)  # a bare IPv6 address carries no port
    else:
        host, colon, port = addr.partition(":")
        port = port if colon else str(default_port)
    if not host:
        raise ValueError(f"bad address {addr!r}: the host is missing")
    if not (port.isascii() and port.isdigit()) or not 0 < int(port) < 65536:
        raise ValueError(f"bad address {addr!r}: the port must be a number from 1 to 65535")
    return Address(host, int(port))


def host_arch() -> str:
    machine = platform.machine().lower()
    return _HOST_ARCH.get(machine, machine)


@dataclass(frozen=True)
class StoreConfig:
    type: str
    path: str
    limit: int = 0


@dataclass(frozen=True)
class SMTPConfig:
    addr: str = ""
    ca: str = ""
    admin: str = ""
    username: str = ""
    password: str = ""

    @property
    def enabled(self) -> bool:
        return bool(self.addr)

    @property
    def address(self) -> Address:
        return parse_addr(self.addr, SMTP_PORT)


@dataclass(frozen=True)
class DatabaseSSL:
    """TLS to PostgreSQL, from [database.ssl]: always verify-full, so that
    the connection is encrypted to the server the CA vouches for under the
    name in database.addr; cert and key add a client certificate."""

    ca: str
    cert: str = ""
    key: str = ""

    @property
    def params(self) -> dict[str, str]:
        """libpq's connection parameters."""
        params = {"sslmode": "verify-full", "sslrootcert": self.ca}
        if self.cert:
            params.update(sslcert=self.cert, sslkey=self.key)
        return params


@dataclass(frozen=True)
class DatabaseConfig:
    addr: str = "localhost:5432"
    name: str = "djinn"
    username: str = "djinn-worker"
    password: str = ""
    # How long a build process rides out PostgreSQL being away.
    outage: float = 300.0
    # None: libpq's defaults, as without [database.ssl] before.
    ssl: DatabaseSSL | None = None

    @property
    def address(self) -> Address:
        """A unix socket path names the directory of PostgreSQL's socket."""
        return parse_addr(self.addr, POSTGRES_PORT, unix=True)


@dataclass(frozen=True)
class RedisConfig:
    addr: str = "localhost:6379"
    password: str = ""
    db: int = 0

    @property
    def address(self) -> Address:
        return parse_addr(self.addr, REDIS_PORT, unix=True)


PROVIDER_ENDPOINTS = {"github": "https://api.github.com", "gitlab": "https://gitlab.com/api/v4"}


@dataclass(frozen=True)
class ProviderConfig:
    """A code host whose pull requests get commit statuses.

    Only the name and the API endpoint matter to the worker; the server's
    OAuth settings of the same table are accepted so one file serves both.
    """

    name: str
    endpoint: str


@dataclass(frozen=True)
class LogConfig:
    level: str = "info"
    file: str = "/dev/stdout"
    format: str = "text"  # or "json": one object per line, for log shippers


@dataclass(frozen=True)
class MetricsConfig:
    """Where /metrics and /healthz are served; nothing is served without addr."""

    addr: str = ""

    @property
    def enabled(self) -> bool:
        return bool(self.addr)

    @property
    def address(self) -> Address:
        return parse_addr(self.addr, METRICS_PORT)


@dataclass(frozen=True)
class WorkerConfig:
    path: str
    parallelism: int
    drivers: tuple[str, ...]
    queue: str
    timeout: float
    crypto_block: bytes | None
    smtp: SMTPConfig
    database: DatabaseConfig
    redis: RedisConfig
    images: StoreConfig
    artifacts: StoreConfig
    objects: StoreConfig
    log: LogConfig
    # Bytes stored of each job's output and of the build log; 0 = unlimited.
    output_limit: int = 8 * 1024 * 1024
    # A worker not heard of for this long is gone: its builds are recovered.
    lease_ttl: float = 30.0
    providers: tuple[ProviderConfig, ...] = ()
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    # With a salt, the AES key is derived from the block (later Djinn servers).
    crypto_salt: bytes | None = None

    @property
    def cipher_key(self) -> bytes | None:
        """The AES key the server sealed keys and masked values with; None
        without crypto.block."""
        if self.crypto_block is None or self.crypto_salt is None:
            return self.crypto_block
        # Imported here: crypto.py loads pycryptodome, which only builds need.
        from .crypto import derive_key
        return derive_key(self.crypto_block, self.crypto_salt)

    @property
    def queues(self) -> list[str]:
        """The lists popped: the shared queue, then one per enabled driver."""
        return [self.queue] + [f"{self.queue}_{d}" for d in self.drivers]

    @property
    def slots(self) -> int:
        return self.parallelism or os.cpu_count() or 1

    @property
    def identity(self) -> str:
        """What tells this worker's builds and containers from other workers'.

        The same after a restart, so that leftovers are found, and different
        for workers that share a host or an engine as long as their host
        names or queues differ.
        """
        return f"{socket.gethostname()}:{self.queue}"


@dataclass(frozen=True)
class DockerConfig:
    host: str = "unix:///var/run/docker.sock"
    version: str = "auto"
    cpus: float | None = None
    memory: int | None = None
    pids_limit: int | None = None
    # The worker's identity, which labels its containers and volumes.
    identity: str = ""


@dataclass(frozen=True)
class QemuConfig:
    disks: str
    cpus: int = 1
    memory: int = 2048
    accel: str = "auto"


@dataclass(frozen=True)
class SSHConfig:
    timeout: float = 60.0
    user: str = "root"
    password: str = ""


@dataclass(frozen=True)
class DriverConfig:
    path: str
    docker: DockerConfig
    qemu: QemuConfig
    ssh: SSHConfig = field(default_factory=SSHConfig)


class _Table:
    """One TOML table being checked: knows its file and key prefix for errors."""

    def __init__(self, path: str, prefix: str, data: Any, known: set[str]):
        self.path, self.prefix = path, prefix
        if not isinstance(data, dict):
            raise ConfigError(path, prefix, f"must be a table, not {_kind(data)}")
        self.data = data
        for key in data:
            if key not in known:
                raise ConfigError(path, self._key(key), "unknown key")

    def _key(self, key: str) -> str:
        return f"{self.prefix}.{key}" if self.prefix else key

    def error(self, key: str, problem: str) -> ConfigError:
        return ConfigError(self.path, self._key(key), problem)

    def table(self, key: str, known: set[str]) -> _Table:
        return _Table(self.path, self._key(key), self.data.get(key, {}), known)

    def get(self, key: str, kind: type, default: Any = None) -> Any:
        if key not in self.data:
            return default
        value = self.data[key]
        ok = isinstance(value, kind) and not (kind is not bool and isinstance(value, bool))
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value, ok = float(value), True
        if not ok:
            want = {str: "a string", int: "an integer", float: "a number", bool: "true or false"}[kind]
            raise self.error(key, f"must be {want}, not {_kind(value)} {value!r}")
        return value

    def string(self, key: str, default: str = "") -> str:
        return self.get(key, str, default)

    def natural(self, key: str, default: int | None = None) -> int | None:
        value = self.get(key, int, default)
        if value is not None and value < 0:
            raise self.error(key, f"must not be negative, got {value}")
        return value

    def choice(self, key: str, choices: tuple[str, ...], default: str) -> str:
        value = self.string(key, default)
        if value not in choices:
            raise self.error(key, f"must be one of {', '.join(choices)}; got {value!r}")
        return value

    def duration(self, key: str, default: float) -> float:
        value = self.get(key, str)
        if value is None:
            return default
        try:
            seconds = parse_duration(value)
        except ValueError as exc:
            raise self.error(key, str(exc)) from None
        if seconds <= 0:
            raise self.error(key, f"must be longer than zero, got {value!r}")
        return seconds


def _kind(value: Any) -> str:
    return {
        str: "string", int: "integer", float: "number", bool: "boolean",
        list: "array", dict: "table",
    }.get(type(value), type(value).__name__)


def _read(path: str, flag: str, what: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(path, "", f"{what} not found (set its path with {flag})") from None
    except (PermissionError, IsADirectoryError) as exc:
        raise ConfigError(path, "", f"cannot read {what}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(path, "", f"not valid TOML: {exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(path, "", "not valid TOML: the file is not UTF-8") from None


def _drivers(top: _Table) -> tuple[str, ...]:
    raw = top.data.get("driver", "*")
    names = [raw] if isinstance(raw, str) else raw
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise top.error("driver", "must be a driver name or a list of driver names")
    enabled: list[str] = []
    arch = host_arch()
    for name in names:
        if name == "*":
            chosen = list(ALL_DRIVERS)
        elif name.startswith("qemu"):
            if name != f"qemu-{arch}":
                raise top.error(
                    "driver",
                    f"{name!r}: the qemu driver must name the host's architecture, "
                    f"on this host \"qemu-{arch}\"",
                )
            chosen = ["qemu"]
        elif name in DRIVER_TYPES:
            chosen = [name]
        else:
            raise top.error(
                "driver",
                f"unknown driver {name!r}; use \"*\", \"docker\", \"ssh\", "
                f"\"qemu-{arch}\" or \"os\"",
            )
        enabled += [d for d in chosen if d not in enabled]
    return tuple(enabled)


def _store(top: _Table, key: str, default_path: str, with_limit: bool) -> StoreConfig:
    known = {"type", "path", "limit"} if with_limit else {"type", "path"}
    table = top.table(key, known)
    path = table.string("path", default_path)
    if not path:
        raise table.error("path", "must not be empty")
    return StoreConfig(
        type=table.choice("type", STORE_TYPES, "file"),
        path=path,
        limit=table.natural("limit", 0) if with_limit else 0,
    )


def _providers(top: _Table) -> tuple[ProviderConfig, ...]:
    raw = top.data.get("providers", [])
    if not isinstance(raw, list):
        raise top.error("providers", "must be an array of tables ([[providers]])")
    providers: dict[str, ProviderConfig] = {}
    for i, data in enumerate(raw):
        table = _Table(top.path, f"providers[{i}]", data,
                       {"name", "endpoint", "secret", "client_id", "client_secret"})
        for key in ("secret", "client_id", "client_secret"):
            table.string(key)
        if "name" not in table.data:
            raise table.error("name", "is required: github or gitlab")
        name = table.choice("name", tuple(PROVIDER_ENDPOINTS), "")
        if name in providers:
            raise table.error("name", f"{name} is listed twice")
        endpoint = table.string("endpoint", PROVIDER_ENDPOINTS[name]).rstrip("/")
        url = urllib.parse.urlsplit(endpoint)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise table.error("endpoint", f"must be an http or https URL, got {endpoint!r}")
        providers[name] = ProviderConfig(name, endpoint)
    return tuple(providers.values())


def _readable(table: _Table, key: str) -> str:
    """A file setting that names a file the worker can read, checked at start
    so that a typo is a config error and not a failed connection later."""
    path = table.string(key)
    try:
        with open(path, "rb"):
            pass
    except FileNotFoundError:
        raise table.error(key, f"{path}: no such file") from None
    except OSError as exc:
        raise table.error(key, f"cannot read {path}: {exc.strerror}") from None
    return path


def _database_ssl(database: _Table) -> DatabaseSSL | None:
    """[database.ssl]: ca alone, or ca, cert and key; nothing set is no TLS,
    as the original worker reads a table of empty values."""
    ssl = database.table("ssl", {"ca", "cert", "key"})
    ca, cert, key = (ssl.string(k) for k in ("ca", "cert", "key"))
    if cert and not key:
        raise ssl.error("key", "must be set with cert: the client certificate's private key")
    if key and not cert:
        raise ssl.error("cert", "must be set with key: the client certificate")
    if not ca:
        if cert:
            raise ssl.error("ca", "must be set with cert and key: the server's certificate "
                                  "is verified against it")
        return None
    return DatabaseSSL(ca=_readable(ssl, "ca"),
                       cert=_readable(ssl, "cert") if cert else "",
                       key=_readable(ssl, "key") if key else "")


def _crypto(top: _Table) -> tuple[bytes | None, bytes | None]:
    """crypto.block and crypto.salt as bytes.

    With a salt the key is derived, always 32 bytes, so the block may be any
    length; without one the block is the key and must fit AES.
    """
    crypto = top.table("crypto", {"block", "salt"})
    block, salt = crypto.get("block", str), crypto.get("salt", str)
    if salt is None:
        if block is not None and len(block.encode()) not in (16, 24, 32):
            raise crypto.error(
                "block", "must be 16, 24 or 32 characters long when crypto.salt is not set, "
                f"got {len(block.encode())}")
        return (block.encode() if block is not None else None), None
    if not salt:
        raise crypto.error("salt", "must not be empty; leave it out to use crypto.block as the key")
    if block is None:
        raise crypto.error("salt", "needs crypto.block: the key is derived from the block and the salt")
    if not block:
        raise crypto.error("block", "must not be empty: with crypto.salt the key is derived from it")
    return block.encode(), salt.encode()


def load_worker(path: str) -> WorkerConfig:
    """Load worker.toml; raises ConfigError naming the first thing wrong."""
    top = _Table(path, "", _read(path, "-config", "worker config"), {
        "parallelism", "driver", "queue", "timeout", "crypto", "smtp",
        "database", "redis", "images", "artifacts", "objects", "log", "output_limit",
        "lease_ttl", "providers", "metrics",
    })
    queue = top.string("queue", "builds")
    if not queue:
        raise top.error("queue", "must not be empty")

    block, salt = _crypto(top)

    smtp = top.table("smtp", {"addr", "ca", "admin", "username", "password"})
    database = top.table("database", {"addr", "name", "username", "password", "outage", "ssl"})
    redis = top.table("redis", {"addr", "password", "db"})
    log = top.table("log", {"level", "file", "format"})
    metrics = top.table("metrics", {"addr"})
    output_limit = WorkerConfig.output_limit
    if "output_limit" in top.data:
        try:
            output_limit = parse_size(top.data["output_limit"])
        except ValueError as exc:
            raise top.error("output_limit", str(exc)) from None
    config = WorkerConfig(
        path=path,
        parallelism=top.natural("parallelism", 0),
        drivers=_drivers(top),
        queue=queue,
        timeout=top.duration("timeout", 30 * 60.0),
        crypto_block=block,
        crypto_salt=salt,
        smtp=SMTPConfig(**{k: smtp.string(k) for k in smtp.data}),
        database=DatabaseConfig(
            **{k: database.string(k) for k in database.data if k not in ("outage", "ssl")},
            outage=database.duration("outage", DatabaseConfig.outage),
            ssl=_database_ssl(database),
        ),
        lease_ttl=top.duration("lease_ttl", WorkerConfig.lease_ttl),
        redis=RedisConfig(
            addr=redis.string("addr", RedisConfig.addr),
            password=redis.string("password"),
            db=redis.natural("db", 0),
        ),
        images=_store(top, "images", IMAGES_PATH, with_limit=False),
        artifacts=_store(top, "artifacts", "/var/lib/djinn/artifacts", with_limit=True),
        objects=_store(top, "objects", "/var/lib/djinn/objects", with_limit=False),
        log=LogConfig(
            level=log.choice("level", LOG_LEVELS, "info"),
            file=log.string("file", "/dev/stdout") or "/dev/stdout",
            format=log.choice("format", LOG_FORMATS, "text"),
        ),
        metrics=MetricsConfig(addr=metrics.string("addr")),
        output_limit=output_limit,
        providers=_providers(top),
    )
    for table, server in ((database, config.database), (redis, config.redis), (smtp, config.smtp),
                          (metrics, config.metrics)):
        if table not in (smtp, metrics) or server.enabled:
            try:
                server.address
            except ValueError as exc:
                raise table.error("addr", str(exc)) from None
    if config.database.ssl and config.database.address.unix:
        raise database.error("ssl", "libpq never uses TLS over a unix socket: set database.addr "
                                    "to a host and port")
    return config


def load_drivers(path: str, identity: str, images: str, required: bool = True) -> DriverConfig:
    """Load driver.toml: identity labels the docker driver's containers and
    images (the images store path) gives the qemu disks' default.

    The worker and the offline runner share this file, so neither passes a
    whole worker config. Without required, a missing file means every
    default: the offline runner needs no driver.toml for the os driver.
    """
    data = _read(path, "-driver", "driver config") if required or os.path.exists(path) else {}
    top = _Table(path, "", data, {"docker", "qemu", "ssh"})
    docker = top.table("docker", {"host", "version", "cpus", "memory", "pids_limit"})
    qemu = top.table("qemu", {"disks", "cpus", "memory", "accel"})
    ssh = top.table("ssh", {"timeout", "user", "password"})

    cpus = docker.get("cpus", float)
    if cpus is not None and cpus <= 0:
        raise docker.error("cpus", f"must be more than zero, got {cpus}")
    for table, key in ((docker, "memory"), (docker, "pids_limit"), (qemu, "cpus"), (qemu, "memory")):
        value = table.get(key, int)
        if value is not None and value <= 0:
            raise table.error(key, f"must be more than zero, got {value}")

    return DriverConfig(
        path=path,
        docker=DockerConfig(
            host=docker.string("host", DockerConfig.host),
            version=docker.string("version", DockerConfig.version),
            cpus=cpus,
            memory=docker.get("memory", int),
            pids_limit=docker.get("pids_limit", int),
            identity=identity,
        ),
        qemu=QemuConfig(
            disks=qemu.string("disks", os.path.join(images, "qemu")),
            cpus=qemu.get("cpus", int, QemuConfig.cpus),
            memory=qemu.get("memory", int, QemuConfig.memory),
            accel=qemu.choice("accel", QEMU_ACCELS, "auto"),
        ),
        ssh=SSHConfig(
            timeout=ssh.duration("timeout", SSHConfig.timeout),
            user=ssh.string("user", SSHConfig.user),
            password=ssh.string("password"),
        ),
    )
