"""/metrics, /healthz and JSON logs of the real worker, read over real HTTP."""

from __future__ import annotations

import json
import re
import socket
import time

import requests
from prometheus_client.parser import text_string_to_metric_families

from services import free_port


def scrape(url: str) -> dict[tuple, float]:
    """Every sample: (name, sorted labels) -> value, parsed by the Prometheus client."""
    response = requests.get(f"{url}/metrics", timeout=5)
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/plain; version=")
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(response.text)
            for sample in family.samples}


def changed(before: dict, after: dict) -> dict[tuple, float]:
    """The samples that changed, by how much (counts, not sums or buckets)."""
    return {key: after[key] - before.get(key, 0) for key in after
            if after[key] != before.get(key, 0)
            and not key[0].endswith(("_bucket", "_sum", "_created"))}


def metrics_worker(start, **config):
    port = free_port()
    worker = start({"metrics": {"addr": f"127.0.0.1:{port}"}, **config})
    return worker, f"http://127.0.0.1:{port}"


def test_builds_of_every_end_are_counted(server, make_worker, redis_server):
    worker, url = metrics_worker(make_worker, timeout="2s", log={"format": "json"})
    before = scrape(url)
    passed = server.queue_build([("test", False, [("test", "echo hello")])])
    assert server.wait(passed.id)["status"] == "passed"
    failed = server.queue_build([("test", False, [("test", "false")])])
    assert server.wait(failed.id)["status"] == "failed"
    killed = server.queue_build([("test", False, [("test", "sleep 30")])])
    server.wait_job(killed.jobs["test"])
    redis_server.client().publish(f"kill-{killed.id}", killed.secret)
    assert server.wait(killed.id)["status"] == "killed"
    timed_out = server.queue_build([("test", False, [("test", "sleep 30")])])
    assert server.wait(timed_out.id)["status"] == "timed_out"
    server.push("not a payload")
    worker.wait_log("dropped payload")
    worker.wait_children_gone()
    after = scrape(url)

    delta = changed(before, after)
    stored = delta.pop(("djinn_worker_output_stored_bytes_total", (("driver", "os"),)))
    assert stored > len("+ echo hello\nhello\n")
    statuses = ("passed", "failed", "killed", "timed_out")
    assert delta == {
        ("djinn_worker_builds_started_total", (("driver", "os"),)): 4,
        **{("djinn_worker_builds_total", (("driver", "os"), ("status", s))): 1 for s in statuses},
        **{("djinn_worker_build_duration_seconds_count", (("driver", "os"), ("status", s))): 1
           for s in statuses},
        ("djinn_worker_queue_wait_seconds_count", ()): 4,
        ("djinn_worker_driver_create_seconds_count", (("driver", "os"),)): 4,
        ("djinn_worker_payloads_dropped_total", (("reason", "unreadable"),)): 1,
        ("djinn_worker_kills_total", ()): 1,
        **{key: delta[key] for key in delta if key[0] == "djinn_worker_lease_age_seconds"},
    }
    assert after[("djinn_worker_builds_running", ())] == 0
    assert after[("djinn_worker_slots", ())] == 1
    assert after[("djinn_worker_lease_age_seconds", ())] < 30
    timed = after[("djinn_worker_build_duration_seconds_sum", (("driver", "os"), ("status", "timed_out")))]
    assert 2 <= timed - before.get(("djinn_worker_build_duration_seconds_sum",
                                    (("driver", "os"), ("status", "timed_out"))), 0) < 10

    lines = [json.loads(line) for line in worker.log.splitlines()]
    assert all({"time", "level", "message", "pid"} <= set(line) for line in lines)
    for line in lines:
        named = re.search(r"\bbuild (\d+)\b", line["message"])
        if named:
            assert line["build_id"] == int(named[1]), line
        elif "build_id" in line:
            # A build process's own lines name it by build_id (and driver) alone.
            assert line["pid"] != worker.proc.pid and line["driver"] == "os", line
    for build in (passed, failed, killed, timed_out):
        mine = [line for line in lines if line.get("build_id") == build.id]
        assert any(line["pid"] == worker.proc.pid for line in mine)  # the supervisor's
        assert any(line.get("driver") == "os" for line in mine)  # the build process's
    assert any("dropped payload" in line["message"] and "build_id" not in line for line in lines)


def test_output_left_out_by_the_cap_is_counted(server, make_worker):
    worker, url = metrics_worker(make_worker, output_limit="64KiB")
    before = scrape(url)
    build = server.queue_build([("test", False, [("test", "head -c 1000000 /dev/zero | tr '\\0' x")])])
    assert server.wait(build.id)["status"] == "passed"
    worker.wait_children_gone()
    delta = changed(before, scrape(url))
    dropped = delta[("djinn_worker_output_dropped_bytes_total", (("driver", "os"),))]
    stored = delta[("djinn_worker_output_stored_bytes_total", (("driver", "os"),))]
    assert stored + dropped >= 1_000_000
    assert 1_000_000 - 64 * 1024 <= dropped < 1_000_000
    # Text lines too: every line of the build process names the build.
    own = [line for line in worker.log.splitlines()
           if re.match(r"\S+ \S+ \w+ \[(\d+)\]", line)[1] != str(worker.proc.pid)]
    assert own and all(f"build {build.id}" in line for line in own), own


def test_healthz_turns_503_while_redis_is_away(private):
    server, workers = private
    worker, url = metrics_worker(workers.start, lease_ttl="3s")
    health = requests.get(f"{url}/healthz", timeout=5)
    assert (health.status_code, health.json()) == (200, {"status": "ok", "problems": []})
    server.rds.proc.terminate()
    server.rds.proc.wait(15)
    deadline = time.monotonic() + 15
    while (health := requests.get(f"{url}/healthz", timeout=5)).status_code == 200:
        assert time.monotonic() < deadline, "still healthy with Redis stopped"
        time.sleep(0.2)
    assert health.status_code == 503
    body = health.json()
    assert body["status"] == "unhealthy"
    assert any(problem.startswith("redis") for problem in body["problems"]), body
    assert not any(problem.startswith("postgresql") for problem in body["problems"]), body
    errors = scrape(url)[("djinn_worker_service_errors_total", (("service", "redis"),))]
    assert errors >= 1

    server.rds.start()
    deadline = time.monotonic() + 20
    while (health := requests.get(f"{url}/healthz", timeout=5)).status_code != 200:
        assert time.monotonic() < deadline, health.json()
        time.sleep(0.2)
    assert scrape(url)[("djinn_worker_service_reconnects_total", (("service", "redis"),))] >= 1
    build = server.queue_build()
    assert server.wait(build.id)["status"] == "passed"
    assert requests.get(f"{url}/nothing", timeout=5).status_code == 404


def test_metrics_port_taken_fails_at_start(make_worker):
    port = free_port()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen()
        worker = make_worker({"metrics": {"addr": f"127.0.0.1:{port}"}}, start=False)
        worker.start(wait=None)
        assert worker.proc.wait(timeout=30) == 1
        assert f"cannot serve metrics at 127.0.0.1:{port}: Address already in use" in worker.log
