"""Objects, keys and artifacts end to end through the real worker (os driver)."""

from __future__ import annotations

import base64
import hashlib
import os
import re

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.pbkdf2 import PBKDF2HMAC

from djinn_worker.crypto import BlockCipher

BOTH = pytest.mark.parametrize("schema", ["dist", "original"], indirect=True)
BLOCK = "0123456789abcdef0123456789abcdef"
# A later server's settings: with a salt the block may be any length.
SALTED = {"block": "a block that is no AES key length", "salt": "NaCl-5f3e"}
KEY = (b"-----BEGIN OPENSSH PRIVATE KEY-----\n"
       + os.urandom(48).hex().encode() + b"\n-----END OPENSSH PRIVATE KEY-----\n")
YES = b"djinn\n"


def digests(data: bytes) -> dict:
    return {"size": len(data), "md5": hashlib.md5(data).digest(), "sha256": hashlib.sha256(data).digest()}


def stored(server, artifact_id: int) -> dict:
    row = server.sql("SELECT size, md5, sha256 FROM build_artifacts WHERE id = %s", artifact_id)[0]
    return {"size": row["size"], "md5": bytes(row["md5"] or b""), "sha256": bytes(row["sha256"] or b"")}


@BOTH
def test_object_is_placed_and_checked_by_the_job(server, make_worker, tmp_path):
    make_worker()
    user = server.user()
    data = os.urandom(2 * 1024 * 1024 + 7)
    good = server.add_object(user, "blob.bin", data, tmp_path / "stores" / "objects")
    gone = server.add_object(user, "gone.bin", b"never written", None)
    build = server.queue_build(
        [("test", False, [("check", f"echo '{hashlib.sha256(data).hexdigest()}  data/blob.bin' | sha256sum -c")])],
        user_id=user, objects=[("blob.bin", "data/blob.bin", good), ("gone.bin", "gone.bin", gone)],
    )
    row = server.wait(build.id)
    assert row["status"] == "passed", row["output"]
    create = server.job(build.jobs["create driver"])["output"]
    assert "Placing object blob.bin => data/blob.bin" in create
    assert "Placing object gone.bin => gone.bin" in create
    assert "Failed to place object gone.bin: not found in the object store" in create
    assert "data/blob.bin: OK" in server.job(build.jobs["check"])["output"]
    placed = {r["source"]: r["placed"] for r in server.sql(
        "SELECT source, placed FROM build_objects WHERE build_id = %s", build.id)}
    assert placed == {"blob.bin": True, "gone.bin": False}


def server_key(crypto: dict) -> bytes:
    """The key the server seals with, derived here by another implementation
    (the cryptography package) than the worker's."""
    if "salt" not in crypto:
        return crypto["block"].encode()
    kdf = PBKDF2HMAC(algorithm=hashes.SHA256(), length=32, salt=crypto["salt"].encode(),
                     iterations=4096)
    return kdf.derive(crypto["block"].encode())


@pytest.mark.parametrize("crypto", [{"block": BLOCK}, SALTED], ids=["block", "salted"])
def test_key_is_decrypted_placed_and_never_logged(server, make_worker, crypto):
    worker = make_worker({"crypto": crypto})
    cipher = BlockCipher(server_key(crypto))
    secret = cipher.encrypt(KEY)
    token = "tok-" + os.urandom(8).hex()
    build = server.queue_build(
        [("test", False, [("check", 'stat -c "%a %n" $HOME/.ssh $HOME/.ssh/id_deploy $HOME/.ssh/config\n'
                                    "cat $HOME/.ssh/config\n"
                                    "sha256sum $HOME/.ssh/id_deploy\n"
                                    f'test "$TOKEN" = {token}')])],
        keys=[("id_deploy", secret, "Host git.example.com\n  IdentityFile /root/.ssh/id_deploy", "/root/.ssh/id_deploy")],
        variables=[("TOKEN", base64.b64encode(cipher.encrypt(token.encode())).decode(), True)],
    )
    row = server.wait(build.id)
    assert row["status"] == "passed", row["output"]
    out = server.job(build.jobs["check"])["output"]
    modes = {line.split()[1].rsplit("/", 1)[-1]: line.split()[0]
             for line in out.splitlines() if re.fullmatch(r"\d{3} /\S+", line)}
    assert modes == {".ssh": "700", "id_deploy": "600", "config": "600"}
    config = out.split("+ cat")[1]
    assert config.index("StrictHostKeyChecking no") < config.index("UserKnownHostsFile /dev/null") \
        < config.index("Host git.example.com")
    assert hashlib.sha256(KEY).hexdigest() in out
    assert "Placing key id_deploy => /root/.ssh/id_deploy" in server.job(build.jobs["create driver"])["output"]
    material = KEY.decode().splitlines()[1]
    everything = row["output"] + "".join(j["output"] or "" for j in server.jobs(build.id)) + worker.log
    assert material not in everything and secret.hex() not in everything
    assert token not in everything


def test_key_with_the_wrong_block_is_a_clear_line(server, make_worker):
    make_worker({"crypto": {"block": BLOCK}})
    secret = BlockCipher(b"fedcba9876543210").encrypt(KEY)
    build = server.queue_build(keys=[("id_rsa", secret, "", "/root/.ssh/id_rsa")])
    row = server.wait(build.id)
    create = server.job(build.jobs["create driver"])["output"]
    assert "Failed to place key id_rsa:" in create, create
    assert "wrong crypto.block key or tampered data" in create
    assert row["status"] == "passed"
    assert KEY.decode().splitlines()[1] not in row["output"]


@pytest.mark.parametrize("limit", [0, 1_000_000])
def test_artifact_is_collected_with_checksums(server, make_worker, tmp_path, limit):
    make_worker({"artifacts": {"limit": limit}})
    size = 3 * 1024 * 1024
    build = server.queue_build(
        [("test", False, [("make", f"mkdir out\nyes djinn | head -c {size} > out/big.bin")])],
        artifacts={"make": [("out/big.bin", "big.bin")]},
    )
    row = server.wait(build.id)
    assert row["status"] == "passed", row["output"]
    assert "Collecting artifact out/big.bin => big.bin" in server.job(build.jobs["make"])["output"]
    expected = (YES * (size // len(YES) + 1))[:size][:limit or size]
    assert stored(server, build.artifacts["big.bin"]) == digests(expected)
    (artifact,) = server.sql("SELECT user_id, hash FROM build_artifacts WHERE id = %s",
                             build.artifacts["big.bin"])
    path = tmp_path / "stores" / "artifacts" / str(artifact["user_id"]) / artifact["hash"]
    assert path.read_bytes() == expected


def test_artifacts_of_failed_jobs_are_collected_and_missing_ones_logged(server, make_worker):
    make_worker()
    build = server.queue_build(
        [("test", False, [("fails", "echo partial > log.txt\nexit 1")])],
        artifacts={"fails": [("log.txt", "log.txt"), ("nothing-here", "nothing")]},
    )
    row = server.wait(build.id)
    assert row["status"] == "failed"
    out = server.job(build.jobs["fails"])["output"]
    assert "Failed to collect artifact nothing-here: no such file" in out
    assert stored(server, build.artifacts["log.txt"]) == digests(b"partial\n")


def test_artifact_paths_cannot_escape(server, make_worker, tmp_path):
    make_worker()
    escape = f"escape-{os.getpid()}-{tmp_path.name}"
    build = server.queue_build(
        [("test", False, [("make", "echo data > x")])],
        artifacts={"make": [("x", "../../etc/x"), ("x", "hashed", f"../../../{escape}"),
                            ("../../../../../../etc/hostname", "host")]},
    )
    row = server.wait(build.id)
    assert row["status"] == "passed", row["output"]
    out = server.job(build.jobs["make"])["output"]
    assert stored(server, build.artifacts["../../etc/x"]) == digests(b"data\n")
    assert "Failed to collect artifact x:" in out
    assert "Failed to collect artifact ../../../../../../etc/hostname:" in out
    assert stored(server, build.artifacts["hashed"])["size"] is None
    assert stored(server, build.artifacts["host"])["size"] is None
    store = tmp_path / "stores" / "artifacts"
    leaked = [p for p in tmp_path.rglob("*") if escape in p.name] + \
        [p for p in tmp_path.parent.rglob(escape)]
    assert not leaked
    assert not (store.parent / "etc").exists() and not (tmp_path / "etc").exists()
