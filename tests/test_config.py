"""Configuration errors through the real djinn-worker binary.

Every case points the database and Redis at ports where nothing listens: a
config that got past validation would exit 1 (services unreachable), so exit
status 2 proves the error was caught before anything connected.
"""

from __future__ import annotations

import platform
import subprocess
from pathlib import Path

import pytest

from djinn import WORKER_BIN
from services import REPO, free_port

UNREACHABLE = {
    "database": f'[database]\naddr = "127.0.0.1:{free_port()}"\n',
    "redis": f'[redis]\naddr = "127.0.0.1:{free_port()}"\n',
}


def run(tmp_path: Path, worker: str | None, driver: str | None = "", *extra: str):
    args = [WORKER_BIN]
    if worker is not None:
        path = tmp_path / "worker.toml"
        stores = "".join(f'[{s}]\ntype = "file"\npath = "{tmp_path / s}"\n'
                         for s in ("images", "objects") if f"[{s}]" not in worker)
        if "[artifacts]" not in worker:
            stores += f'[artifacts]\ntype = "file"\npath = "{tmp_path / "artifacts"}"\n'
        services = "".join(v for k, v in UNREACHABLE.items() if f"[{k}]" not in worker)
        path.write_text(worker + "\n" + stores + services)
        args += ["-config", str(path)]
    if driver is not None:
        path = tmp_path / "driver.toml"
        path.write_text(driver)
        args += ["-driver", str(path)]
    return subprocess.run(args + list(extra), capture_output=True, text=True, cwd=tmp_path, timeout=30)


def assert_config_error(result, file: str, *words: str) -> None:
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"djinn-worker: {file}"), lines[0]
    for word in words:
        assert word in lines[0], lines[0]


@pytest.mark.parametrize("worker, words", [
    ("colour = 1", ["colour", "unknown key"]),
    ('[database]\nhost = "db"', ["database.host", "unknown key"]),
    ('parallelism = "two"', ["parallelism", "integer", "'two'"]),
    ("parallelism = -1", ["parallelism", "negative"]),
    ('timeout = "5 minutes"', ["timeout", "bad duration", "'5 minutes'"]),
    ('timeout = "1h30"', ["timeout", "bad duration"]),
    ("timeout = 30", ["timeout"]),
    ('[crypto]\nblock = "too-short"', ["crypto.block", "16, 24 or 32", "crypto.salt is not set",
                                        "got 9"]),
    ('[crypto]\nsalt = "NaCl"', ["crypto.salt", "needs crypto.block"]),
    ('[crypto]\nblock = ""\nsalt = "NaCl"', ["crypto.block", "must not be empty", "crypto.salt"]),
    ('[crypto]\nblock = "0123456789abcdef"\nsalt = ""', ["crypto.salt", "must not be empty"]),
    ("[crypto]\nsalt = 42", ["crypto.salt", "must be a string", "42"]),
    ('[database]\nssl = "on"', ["database.ssl", "must be a table"]),
    ('[database]\naddr = "/run/postgresql"\n[database.ssl]\nca = "/etc/passwd"',
     ["database.ssl", "unix socket"]),
    ('[artifacts]\ntype = "s3"\npath = "/tmp"', ["artifacts.type", "'s3'"]),
    ('[log]\nlevel = "verbose"', ["log.level", "'verbose'"]),
    ('driver = "podman"', ["driver", "unknown driver 'podman'"]),
    ('driver = ["docker", 3]', ["driver", "list of driver names"]),
    ("[redis]\ndb = 1.5", ["redis.db", "integer"]),
    ('queue = ""', ["queue", "empty"]),
    ("x = [", ["not valid TOML"]),
    ('[database]\naddr = "db:abc"', ["database.addr", "'db:abc'", "port must be a number"]),
    ('[database]\naddr = "[::1"', ["database.addr", "[IPv6 address]:port"]),
    ('[redis]\naddr = ":6379"', ["redis.addr", "host is missing"]),
    ('[redis]\naddr = "redis:99999"', ["redis.addr", "1 to 65535"]),
    ('[smtp]\naddr = "mail:smtp"', ["smtp.addr", "'mail:smtp'"]),
    ('[smtp]\naddr = "/run/smtp.sock"', ["smtp.addr", "unix socket is not supported"]),
    ('output_limit = "8 MB!"', ["output_limit", "bad size '8 MB!'", "like \"8MiB\""]),
    ("output_limit = -1", ["output_limit", "bad size -1"]),
    ('output_limit = "lots"', ["output_limit", "bad size 'lots'"]),
    ("output_limit = true", ["output_limit", "bad size True"]),
    ('[[providers]]\nname = "bitbucket"', ["providers[0].name", "github, gitlab", "'bitbucket'"]),
    ('[[providers]]\nsecret = "x"', ["providers[0].name", "is required"]),
    ('[[providers]]\nname = "github"\ntoken = "x"', ["providers[0].token", "unknown key"]),
    ('[[providers]]\nname = "gitlab"\nendpoint = "gitlab.example.com"',
     ["providers[0].endpoint", "http or https URL", "'gitlab.example.com'"]),
    ('[[providers]]\nname = "github"\n[[providers]]\nname = "github"',
     ["providers[1].name", "github is listed twice"]),
    ('[[providers]]\nname = "github"\nclient_id = 12', ["providers[0].client_id", "string"]),
    ('providers = "github"', ["providers", "array of tables"]),
    ('[log]\nformat = "xml"', ["log.format", "text, json", "'xml'"]),
    ('[metrics]\naddr = "0.0.0.0:http"', ["metrics.addr", "port must be a number"]),
    ('[metrics]\nport = 9252', ["metrics.port", "unknown key"]),
])
def test_worker_config_errors(tmp_path, worker, words):
    assert_config_error(run(tmp_path, worker), str(tmp_path / "worker.toml"), *words)


@pytest.mark.parametrize("ssl, words", [
    ({"ca": "ca.pem", "cert": "client.pem"}, ["database.ssl.key", "must be set with cert"]),
    ({"ca": "ca.pem", "key": "client.key"}, ["database.ssl.cert", "must be set with key"]),
    ({"cert": "client.pem", "key": "client.key"}, ["database.ssl.ca", "must be set with cert and key"]),
    ({"ca": "absent.pem"}, ["database.ssl.ca", "absent.pem: no such file"]),
    ({"ca": "ca.pem", "cert": "client.pem", "key": "absent.key"},
     ["database.ssl.key", "absent.key: no such file"]),
    # Tests run as root, who reads any file: a directory is what cannot be read.
    ({"ca": "certs"}, ["database.ssl.ca", "cannot read", "certs: Is a directory"]),
    ({"ca": "ca.pem", "sslmode": "require"}, ["database.ssl.sslmode", "unknown key"]),
])
def test_database_ssl_errors(tmp_path, ssl, words):
    (tmp_path / "certs").mkdir()
    for name in ("ca.pem", "client.pem", "client.key"):
        (tmp_path / name).write_text("PEM\n")
    table = "".join(f'{key} = "{tmp_path / name}"\n' for key, name in ssl.items())
    result = run(tmp_path, f"[database.ssl]\n{table}")
    assert_config_error(result, str(tmp_path / "worker.toml"), *words)


def test_qemu_must_name_the_host_architecture(tmp_path):
    other = "aarch64" if platform.machine() in ("x86_64", "AMD64") else "x86_64"
    result = run(tmp_path, f'driver = "qemu-{other}"')
    assert_config_error(result, str(tmp_path / "worker.toml"), "driver", f"qemu-{other}",
                        "host's architecture")


def test_unwritable_store_is_a_start_up_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    result = run(tmp_path, f'[objects]\ntype = "file"\npath = "{blocker}/objects"')
    assert_config_error(result, str(tmp_path / "worker.toml"), "objects.path", str(blocker))


@pytest.mark.parametrize("driver, words", [
    ('[docker]\nmemory = "lots"', ["docker.memory", "integer"]),
    ("[docker]\ncpus = 0", ["docker.cpus", "more than zero"]),
    ('[qemu]\naccel = "hvf"', ["qemu.accel", "'hvf'"]),
    ('[ssh]\ntimeout = "soon"', ["ssh.timeout", "bad duration"]),
    ("[podman]", ["podman", "unknown key"]),
])
def test_driver_config_errors(tmp_path, driver, words):
    result = run(tmp_path, 'driver = "*"', driver)
    assert_config_error(result, str(tmp_path / "driver.toml"), *words)


def test_missing_files_name_the_flag(tmp_path):
    result = run(tmp_path, None, "", "-config", str(tmp_path / "absent.toml"))
    assert_config_error(result, str(tmp_path / "absent.toml"), "not found", "-config")
    result = run(tmp_path, 'driver = "os"', None)
    assert_config_error(result, "djinn-driver.toml", "not found", "-driver")
    result = run(tmp_path, None, None)
    assert_config_error(result, "djinn-worker.toml", "not found", "-config")


def test_double_dash_flags_and_version(tmp_path):
    result = subprocess.run([WORKER_BIN, "--version"], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.startswith("djinn-worker ")
    result = run(tmp_path, None, "", "--config", str(tmp_path / "absent.toml"))
    assert_config_error(result, str(tmp_path / "absent.toml"), "not found")


@pytest.mark.parametrize("worker", [
    'driver = "os"\ntimeout = "1h30m"\nparallelism = 2',
    # With a salt the key is derived, so the block may have any length.
    'driver = "os"\n[crypto]\nblock = "too-short"\nsalt = "NaCl"',
    # Empty values are no TLS, as the original worker reads them.
    'driver = "os"\n[database.ssl]\nca = ""\ncert = ""\nkey = ""',
    'driver = "os"\n[database.ssl]\nca = "/etc/passwd"',
], ids=["plain", "salted-block", "empty-ssl", "ssl-ca"])
def test_valid_config_gets_as_far_as_connecting(tmp_path, worker):
    """The control case: without a config error the same setup exits 1, not 2."""
    result = run(tmp_path, worker)
    assert result.returncode == 1, result.stderr
    assert "cannot connect to the database" in result.stdout + result.stderr


def test_dist_examples_load(tmp_path):
    """The shipped examples are valid (paths redirected so nothing is created in /var)."""
    worker = (REPO / "dist" / "worker.toml").read_text()
    for store in ("images", "artifacts", "objects"):
        worker = worker.replace(f'"/var/lib/djinn/{store}"', f'"{tmp_path / store}"')
    worker = worker.replace('"/var/log/djinn/worker.log"', f'"{tmp_path / "worker.log"}"')
    for key, value in UNREACHABLE.items():
        worker = worker.replace('addr = "localhost:' + ("5432" if key == "database" else "6379") + '"',
                                value.splitlines()[1])
    (tmp_path / "worker.toml").write_text(worker)
    result = subprocess.run(
        [WORKER_BIN, "-config", str(tmp_path / "worker.toml"),
         "-driver", str(REPO / "dist" / "driver.toml")],
        capture_output=True, text=True, timeout=30)
    assert result.returncode == 1, result.stderr
    assert "cannot connect to the database" in (tmp_path / "worker.log").read_text()
