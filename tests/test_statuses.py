"""Commit statuses of pull-request builds, set on a real local HTTP server
that plays GitHub's and GitLab's APIs, by the real djinn-worker."""

from __future__ import annotations

import json

import psycopg2
import pytest

from codehost import CodeHost
from djinn_worker.crypto import BlockCipher, derive_key

BLOCK = "0123456789abcdef0123456789abcdef"
TOKEN = "gho_16C7e42F292c6912E7710c838347Ae178B4a"
SHA = "6dcb09b5b57875f334f61aebed695e2e4193db5e"
HOST = "https://ci.example.com"
BOTH = pytest.mark.parametrize("schema", ["dist", "original"], indirect=True)


@pytest.fixture
def codehost():
    with CodeHost(TOKEN) as host:
        yield host


def start(make_worker, codehost, timeout: str = "60s", salt: str | None = None):
    return make_worker({
        "crypto": {"block": BLOCK, **({"salt": salt} if salt else {})},
        "timeout": timeout,
        "providers": [{"name": "github", "endpoint": codehost.github, "secret": "s",
                       "client_id": "id", "client_secret": "cs"},
                      {"name": "gitlab", "endpoint": codehost.gitlab}],
    })


def pull_request(server, provider: str, commands: str, token: str = TOKEN,
                 trigger: str = "pull", can_fail: bool = False, key: bytes = BLOCK.encode()):
    """A queued build of a pull request, with the rows the Djinn server writes for one.

    Its job first sleeps a second: a status still waiting when a newer one
    comes is never sent, and these tests want to see "running" arrive.
    """
    user = server.user()
    build = server.insert([("test", can_fail, [("test", f"sleep 1\n{commands}")])], user_id=user)
    sealed = BlockCipher(key).encrypt(token.encode())
    with server.conn:
        provider_id = server.sql(
            "INSERT INTO providers (user_id, name, access_token, connected) "
            "VALUES (%s, %s, %s, TRUE) RETURNING id", user, provider, psycopg2.Binary(sealed),
        )[0]["id"]
        repo_id = server.sql(
            "INSERT INTO provider_repos (user_id, provider_id, repo_id, provider_name, name) "
            "VALUES (%s, %s, 4242, %s, 'octo/hello') RETURNING id", user, provider_id, provider,
        )[0]["id"]
        server.sql(
            "INSERT INTO build_triggers (build_id, provider_id, repo_id, type, comment, data) "
            "VALUES (%s, %s, %s, %s, 'Add a feature', %s)", build.id, provider_id, repo_id,
            trigger, json.dumps({"sha": SHA, "ref": "refs/pull/7/head"}))
    server.push(build.id, host=HOST)
    return build


def link(server, build) -> str:
    row = server.sql("SELECT u.username, b.number FROM builds b JOIN users u ON u.id = b.user_id "
                     "WHERE b.id = %s", build.id)[0]
    return f"{HOST}/b/{row['username']}/{row['number']}"


@BOTH
@pytest.mark.parametrize("provider, commands, can_fail, status, states", [
    ("github", "true", False, "passed", ["pending", "success"]),
    ("github", "false", False, "failed", ["pending", "failure"]),
    ("github", "false", True, "passed_with_failures", ["pending", "success"]),
    ("gitlab", "true", False, "passed", ["running", "success"]),
    ("gitlab", "false", False, "failed", ["running", "failed"]),
    ("gitlab", "false", True, "passed_with_failures", ["running", "success"]),
])
def test_pull_request_gets_running_then_final_status(server, make_worker, codehost, provider,
                                                     commands, can_fail, status, states):
    worker = start(make_worker, codehost)
    build = pull_request(server, provider, commands, can_fail=can_fail)
    assert server.wait(build.id)["status"] == status
    sent = codehost.answered(2)
    assert [r.body["state"] for r in sent] == states
    descriptions = {"passed": "Build has passed.", "failed": "Build has failed.",
                    "passed_with_failures": "Build has passed with failures."}
    assert [r.body["description"] for r in sent] == ["Build is running.", descriptions[status]]
    for request in sent:
        assert request.authorization == f"Bearer {TOKEN}"
        assert request.body["target_url"] == link(server, build)
        if provider == "github":
            assert request.path == f"/github/repos/octo/hello/statuses/{SHA}"
            assert request.body["context"] == "continuous-integration/djinn-ci"
        else:
            assert request.path == f"/gitlab/api/v4/projects/4242/statuses/{SHA}"
            assert (request.body["id"], request.body["sha"]) == (4242, SHA)
    worker.wait_children_gone()
    assert len(codehost.requests) == 2
    assert TOKEN not in worker.log


@pytest.mark.parametrize("provider, state", [("github", "failure"), ("gitlab", "canceled")])
def test_killed_and_timed_out_builds(server, make_worker, codehost, redis_server, provider, state):
    worker = start(make_worker, codehost, timeout="3s")
    killed = pull_request(server, provider, "sleep 30")
    server.wait_job(killed.jobs["test"])
    redis_server.client().publish(f"kill-{killed.id}", killed.secret)
    assert server.wait(killed.id)["status"] == "killed"
    timed_out = pull_request(server, provider, "sleep 30")
    assert server.wait(timed_out.id)["status"] == "timed_out"
    worker.wait_children_gone()
    # The kill may come before "running" went: then it is not sent at all.
    final = {r.body["target_url"]: (r.body["state"], r.body["description"])
             for r in codehost.requests}
    assert final == {link(server, killed): (state, "Build was killed."),
                     link(server, timed_out): (state, "Build has timed out.")}


def test_push_and_manual_builds_get_no_status(server, make_worker, codehost):
    worker = start(make_worker, codehost)
    push = pull_request(server, "github", "true", trigger="push")
    manual = pull_request(server, "gitlab", "true", trigger="manual")
    assert server.wait(push.id)["status"] == server.wait(manual.id)["status"] == "passed"
    worker.wait_children_gone()
    assert codehost.requests == []


def test_provider_failing_twice_still_gets_the_final_status(server, make_worker, codehost):
    worker = start(make_worker, codehost)
    codehost.failures = 2
    build = pull_request(server, "github", "true")
    assert server.wait(build.id)["status"] == "passed"
    assert [r.body["state"] for r in codehost.answered(2)] == ["pending", "success"]
    worker.wait_children_gone()
    assert [r.answer for r in codehost.requests] == [500, 500, 201, 201]


def test_provider_that_never_answers_delays_nothing(server, make_worker, codehost):
    worker = start(make_worker, codehost)
    codehost.silent = True
    build = pull_request(server, "gitlab", "true")
    row = server.wait(build.id)
    assert row["status"] == "passed"
    assert (row["finished_at"] - row["started_at"]).total_seconds() < 2.5
    codehost.close()  # the hanging request ends, its retries are refused
    worker.wait_children_gone()
    assert f"build {build.id}: gitlab commit octo/hello@{SHA[:12]} not set to running: " in worker.log
    assert "not set to success: " in worker.log
    assert TOKEN not in worker.log


def test_wrong_token_is_logged_by_the_worker_not_the_build(server, make_worker, codehost):
    worker = start(make_worker, codehost)
    build = pull_request(server, "github", "true", token="gho_expired0000000000000000000000000")
    row = server.wait(build.id)
    assert row["status"] == "passed"
    worker.wait_children_gone()
    assert f"build {build.id}: github commit octo/hello@{SHA[:12]} not set to pending: " \
           "401 Bad credentials" in worker.log
    assert "not set to success: 401 Bad credentials" in worker.log
    build_log = row["output"] + "".join(j["output"] or "" for j in server.jobs(build.id))
    assert "Bad credentials" not in build_log
    assert "gho_expired" not in worker.log + build_log


@BOTH
def test_build_whose_process_died_gets_its_final_status(server, make_worker, codehost):
    """The supervisor settles the build and sends the status the process could not."""
    worker = start(make_worker, codehost)
    build = pull_request(server, "github", "kill -9 $PPID")
    assert server.wait(build.id)["status"] == "failed"
    assert [r.body["state"] for r in codehost.answered(2)] == ["pending", "failure"]
    assert TOKEN not in worker.log


def test_token_sealed_with_a_salted_key(server, make_worker, codehost):
    """Later servers seal with the key derived from crypto.block and crypto.salt."""
    worker = start(make_worker, codehost, salt="pepper")
    build = pull_request(server, "gitlab", "true", key=derive_key(BLOCK.encode(), b"pepper"))
    assert server.wait(build.id)["status"] == "passed"
    assert [r.body["state"] for r in codehost.answered(2)] == ["running", "success"]
    assert TOKEN not in worker.log
