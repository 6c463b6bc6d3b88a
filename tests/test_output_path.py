"""Build output end to end through the real worker: the cap, memory, liveness, masking."""

from __future__ import annotations

import base64
import os
import re
import time

import pytest

from djinn_worker.crypto import BlockCipher

BLOCK = "0123456789abcdef0123456789abcdef"
LIMIT = 8 * 1024 * 1024
HEAD, TAIL = LIMIT - LIMIT // 2, LIMIT // 2
MARKER = re.compile(r"\n?\[\.\.\. (\d+) bytes of output left out here: "
                    r"the worker's output_limit is (.+?) \.\.\.\]\n")


def sealed(value: str) -> str:
    return base64.b64encode(BlockCipher(BLOCK.encode()).encrypt(value.encode())).decode()


def every_output(server, build_id: int) -> list[str]:
    """Every output column the build wrote: the build log and each job's."""
    return [server.build(build_id)["output"] or ""] + [
        job["output"] or "" for job in server.jobs(build_id)]


def test_large_output_keeps_head_marker_and_tail_exactly(server, make_worker):
    """~100 MB through the default 8 MiB cap: the head and the tail stored
    byte for byte around one marker line; the build process stays small."""
    make_worker({"timeout": "5m"})
    count = 13_000_000
    build = server.queue_build([("big", False, [
        ("print", f"seq 1 {count}"),
        ("rss", "grep VmHWM /proc/$PPID/status"),
    ])])
    row = server.wait(build.id, timeout=240)
    assert row["status"] == "passed", row["output"][-500:]

    stream = f"+ seq 1 {count}\n" + "".join(f"{n}\n" for n in range(1, count + 1))
    stored = server.job(build.jobs["print"])["output"]
    newline = "" if stream[:HEAD].endswith("\n") else "\n"
    assert stored == (stream[:HEAD] + newline + f"[... {len(stream) - HEAD - TAIL} bytes of output "
                      "left out here: the worker's output_limit is 8 MiB ...]\n" + stream[-TAIL:])

    peak_kib = int(server.job(build.jobs["rss"])["output"].split("VmHWM:")[1].split()[0])
    assert peak_kib <= 64 * 1024, f"build process peak RSS {peak_kib} KiB"
    log = row["output"]
    assert len(MARKER.findall(log)) == 1 and log.endswith("Done. Run passed\n")
    assert len(log.encode()) <= LIMIT + 200


def test_runaway_output_times_out_on_the_build_processs_own_timer(server, make_worker):
    worker = make_worker({"timeout": "4s", "output_limit": "1MiB"})
    build = server.queue_build([("loud", False, [("yes", "yes")])])
    row = server.wait(build.id, timeout=30)
    assert row["status"] == "timed_out"
    assert (row["finished_at"] - row["started_at"]).total_seconds() < 4 + 2
    assert "past the timeout" not in worker.log, "the supervisor's backstop had to act"
    stored = server.job(build.jobs["yes"])["output"]
    (marker,) = MARKER.finditer(stored)
    assert marker[2] == "1 MiB" and int(marker[1]) > 0
    assert stored.startswith("+ yes\ny\ny\n") and stored.endswith("y\n")
    assert len(stored.encode()) <= 1024 * 1024 + 200


def test_output_is_live_within_a_second(server, make_worker):
    make_worker()
    build = server.queue_build([("slow", False, [
        ("tick", "for i in 1 2 3 4; do echo \"tick $i $(date +%s.%N)\"; sleep 1; done")])])
    seen: dict[str, float] = {}
    deadline = time.monotonic() + 30
    while len(seen) < 8 and time.monotonic() < deadline:
        now = time.time()
        job = server.job(build.jobs["tick"])["output"] or ""
        log = server.build(build.id)["output"] or ""
        for where, text in (("job", job), ("build", log)):
            for number, printed in re.findall(r"^tick (\d) ([\d.]+)$", text, re.M):
                seen.setdefault(f"{where} {number}", now - float(printed))
        time.sleep(0.05)
    assert len(seen) == 8, seen
    assert max(seen.values()) < 1.0, seen
    assert server.wait(build.id)["status"] == "passed"


SECRETS = {"TOKEN": "tok-3f9a7c21e8", "PASSWORD": "hunter2hunter2", "OVERLAP": "hunter2-and-more"}


@pytest.mark.parametrize("schema", ["dist", "original_masked"], indirect=True)
def test_masked_variables_never_reach_any_stored_output(server, make_worker, schema):
    make_worker({"crypto": {"block": BLOCK}})
    commands = "\n".join([
        'echo "token is $TOKEN"',
        'printf "%s" "$PASSWORD" | cut -c1-7; printf "%s\\n" "$PASSWORD" | cut -c8-',
        # One value written in two reads, with time between them.
        "printf 'tok-3f9a'; sleep 0.4; printf '7c21e8 and hunter2-and-more\\n'",
        'echo "$OVERLAP$PASSWORD$TOKEN"',
        'test "$TOKEN" = tok-3f9a7c21e8',
        "printf 'ends with %s' \"$TOKEN\"",
    ])
    build = server.queue_build(
        [("test", False, [("leak", commands)])],
        variables=[(k, sealed(v), True) for k, v in SECRETS.items()] + [("PLAIN", "visible-value")],
    )
    row = server.wait(build.id)
    assert row["status"] == "passed", row["output"]
    for text in every_output(server, build.id):
        for value in SECRETS.values():
            assert value not in text
    job = server.job(build.jobs["leak"])["output"]
    assert "token is xxxxxx\n" in job and job.endswith("ends with xxxxxx")
    assert "+ echo 'token is xxxxxx'" in job or "+ echo token is xxxxxx" in job


@pytest.mark.parametrize("schema", ["dist", "original_masked"], indirect=True)
def test_a_masked_value_that_does_not_decrypt_fails_the_build_by_name(server, make_worker, schema):
    make_worker({"crypto": {"block": BLOCK}})
    wrong = base64.b64encode(BlockCipher(b"fedcba9876543210").encrypt(b"secret-value")).decode()
    build = server.queue_build(variables=[("API_KEY", wrong, True)])
    row = server.wait(build.id)
    assert row["status"] == "failed"
    create = server.job(build.jobs["create driver"])["output"]
    lines = [line for line in create.splitlines() if line.startswith("Failed")]
    assert lines == ["Failed to create driver: cannot decrypt masked variable API_KEY: "
                     "cannot decrypt: authentication failed; wrong crypto.block key or tampered data"]
    assert server.job(build.jobs["test"])["status"] == "failed"


def test_short_masked_values_are_used_but_not_masked(server, make_worker):
    worker = make_worker({"crypto": {"block": BLOCK}})
    build = server.queue_build([("test", False, [("short", 'echo "[$PIN]"')])],
                               variables=[("PIN", sealed("1234"), True)])
    row = server.wait(build.id)
    assert row["status"] == "passed"
    assert "[1234]" in server.job(build.jobs["short"])["output"]
    assert worker.log.count(f"build {build.id}: 1 masked value(s) shorter than 6") == 1


@pytest.mark.parametrize("schema", ["dist", "original"], indirect=True)
def test_key_material_is_masked_line_by_line(server, make_worker, schema):
    make_worker({"crypto": {"block": BLOCK}})
    lines = ["-----BEGIN OPENSSH PRIVATE KEY-----"] + [os.urandom(32).hex() for _ in range(3)] \
        + ["short", "-----END OPENSSH PRIVATE KEY-----"]
    key = ("\n".join(lines) + "\n").encode()
    ciphertext = BlockCipher(BLOCK.encode()).encrypt(key)
    build = server.queue_build(
        [("test", False, [("leak", "cat $HOME/.ssh/id_test\ntr -d '\\n' < $HOME/.ssh/id_test")])],
        keys=[("id_test", ciphertext, "", "/root/.ssh/id_test")],
        # Without the masked column these are used as they are, and not masked.
        variables=[("PLAIN", "plain-and-visible")],
    )
    row = server.wait(build.id)
    assert row["status"] == "passed", row["output"]
    for text in every_output(server, build.id):
        for line in lines:
            if len(line) >= 8:
                assert line not in text
    assert "\nshort\n" in server.job(build.jobs["leak"])["output"]
