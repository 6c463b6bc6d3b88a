"""Failure mail end to end: real worker, real PostgreSQL and Redis, real SMTP servers."""

from __future__ import annotations

import os
import signal
import time

import pytest
from smtpserver import PASSWORD, USERNAME, SMTPServer, free_port, make_certificates

HOST = "https://ci.example.com"
BOTH = pytest.mark.parametrize("schema", ["dist", "original"], indirect=True)


@pytest.fixture
def people(server):
    """An owner with a namespace of two collaborators (the owner is one of them too)."""
    owner = server.user()
    namespace = server.sql(
        "INSERT INTO namespaces (user_id, name, path, level) VALUES (%s, 'team', 'team', 1) RETURNING id",
        owner)[0]["id"]
    collaborators = [server.user() for _ in range(2)]
    for user in [owner] + collaborators:
        server.sql("INSERT INTO namespace_collaborators (namespace_id, user_id) VALUES (%s, %s)",
                   namespace, user)
    emails = {u: server.sql("SELECT email, username FROM users WHERE id = %s", u)[0]
              for u in [owner] + collaborators}
    return owner, namespace, emails


def mail_config(smtp: SMTPServer | str, **extra) -> dict:
    addr = smtp if isinstance(smtp, str) else smtp.addr
    return {"smtp": {"addr": addr, "admin": "djinn@ci.example.com", **extra}}


MANUAL = ("manual", "Deploy the thing", {"email": "ignored", "username": "ignored"})


@BOTH
def test_failed_build_mails_owner_and_collaborators_once(server, make_worker, smtp_server, people):
    owner, namespace, emails = people
    make_worker(mail_config(smtp_server))
    lines = "\n".join(f"echo output line {n}" for n in range(30))
    build = server.queue_build([("test", False, [("fail", f"{lines}\nexit 1")])],
                               user_id=owner, namespace_id=namespace, trigger=MANUAL)
    assert server.wait(build.id)["status"] == "failed"
    (mail,) = smtp_server.wait_for(1, timeout=30)
    owner_row = emails[owner]
    assert mail.rcpt_tos == [e["email"] for e in emails.values()]
    assert mail.mail_from == "djinn@ci.example.com"
    message = mail.message
    assert message["Subject"] == f"Djinn - Build #{build.id} failed"
    assert message["Date"] and message["Message-ID"] and message["To"]
    body = message.get_content().replace("\r\n", "\n")
    assert f"{HOST}/b/{owner_row['username']}/1" in body
    assert f"Submitted by {owner_row['username']} <{owner_row['email']}>" in body
    assert "Deploy the thing" in body
    tail = body.rstrip("\n").split("\n")[-15:]
    assert tail[-1] == "Done. Run failed" and "output line 29" in "\n".join(tail)
    assert "output line 0\n" not in body


def test_killed_and_timed_out_builds_are_mailed(server, make_worker, smtp_server, redis_server, people):
    owner, namespace, _ = people
    make_worker({**mail_config(smtp_server), "timeout": "3s", "parallelism": 2})
    slow = [("test", False, [("slow", "sleep 60")])]
    killed = server.queue_build(slow, user_id=owner, namespace_id=namespace)
    timed_out = server.queue_build(slow, user_id=owner, namespace_id=namespace)
    server.wait_job(killed.jobs["slow"])
    redis_server.client().publish(f"kill-{killed.id}", killed.secret)
    assert server.wait(killed.id)["status"] == "killed"
    assert server.wait(timed_out.id)["status"] == "timed_out"
    mails = smtp_server.wait_for(2, timeout=30)
    subjects = sorted(m.message["Subject"] for m in mails)
    assert subjects == sorted([f"Djinn - Build #{killed.id} killed",
                               f"Djinn - Build #{timed_out.id} timed out"])
    for mail in mails:
        assert len(mail.rcpt_tos) == 3
        assert "output" not in mail.message.get_content().lower().split("-----")[-1]


def test_passing_builds_send_nothing(server, make_worker, smtp_server, people):
    owner, namespace, _ = people
    worker = make_worker(mail_config(smtp_server))
    passed = server.queue_build(user_id=owner, namespace_id=namespace)
    flaky = server.queue_build([("flaky", True, [("may-fail", "exit 1")])],
                               user_id=owner, namespace_id=namespace)
    assert server.wait(passed.id)["status"] == "passed"
    assert server.wait(flaky.id)["status"] == "passed_with_failures"
    # A failing build queued after them is mailed; builds run one at a
    # time here, so had the others been mailed they would have arrived first.
    failing = server.queue_build([("test", False, [("fail", "false")])],
                                 user_id=owner, namespace_id=namespace)
    assert server.wait(failing.id)["status"] == "failed"
    worker.wait_log(f"build {failing.id}: failure mail sent")
    (mail,) = smtp_server.wait_for(1)
    assert mail.message["Subject"] == f"Djinn - Build #{failing.id} failed"
    time.sleep(0.5)
    assert len(smtp_server.received) == 1


def test_starttls_verified_against_the_ca(server, make_worker, smtp_tls_server, people):
    owner, _, emails = people
    make_worker(mail_config(smtp_tls_server, ca=str(smtp_tls_server.certificates.ca_file)))
    build = server.queue_build([("test", False, [("fail", "false")])], user_id=owner)
    assert server.wait(build.id)["status"] == "failed"
    (mail,) = smtp_tls_server.wait_for(1, timeout=30)
    assert mail.tls and mail.rcpt_tos == [emails[owner]["email"]]


def test_auth_with_username_and_password(server, make_worker, smtp_auth_server, people):
    owner, _, _ = people
    make_worker(mail_config(smtp_auth_server, username=USERNAME, password=PASSWORD))
    build = server.queue_build([("test", False, [("fail", "false")])], user_id=owner)
    assert server.wait(build.id)["status"] == "failed"
    (mail,) = smtp_auth_server.wait_for(1, timeout=30)
    assert mail.login == USERNAME


def test_mail_server_down_is_logged_and_changes_nothing(server, make_worker, people):
    owner, _, _ = people
    addr = f"127.0.0.1:{free_port()}"
    worker = make_worker(mail_config(addr))
    build = server.queue_build([("test", False, [("fail", "false")])], user_id=owner)
    row = server.wait(build.id)
    assert row["status"] == "failed" and row["output"].endswith("Done. Run failed\n")
    worker.wait_log(f"build {build.id}: no failure mail sent: SMTP server {addr}: connect refused")
    after = server.queue_build(user_id=owner)
    assert server.wait(after.id)["status"] == "passed"


def test_refused_recipient_and_bad_certificate_are_logged(server, make_worker, people, tmp_path):
    owner, namespace, emails = people
    refused = list(emails.values())[1]["email"]
    with SMTPServer(refuse=(refused,)) as smtp:
        worker = make_worker(mail_config(smtp))
        build = server.queue_build([("test", False, [("fail", "false")])],
                                   user_id=owner, namespace_id=namespace)
        assert server.wait(build.id)["status"] == "failed"
        (mail,) = smtp.wait_for(1, timeout=30)
        assert refused not in mail.rcpt_tos and len(mail.rcpt_tos) == 2
        worker.wait_log(f"recipient refused: {refused}")
    assert worker.stop() == 0

    other_ca = make_certificates(tmp_path / "other").ca_file
    with SMTPServer(tls=make_certificates(tmp_path / "real")) as smtp:
        worker = make_worker(mail_config(smtp, ca=str(other_ca)))
        build = server.queue_build([("test", False, [("fail", "false")])], user_id=owner)
        assert server.wait(build.id)["status"] == "failed"
        worker.wait_log(f"build {build.id}: no failure mail sent: SMTP server {smtp.addr}: TLS certificate verify failed")
        assert smtp.received == []


def test_build_whose_process_died_is_mailed_by_the_supervisor(server, make_worker, smtp_server, people):
    owner, _, _ = people
    worker = make_worker(mail_config(smtp_server))
    build = server.queue_build([("slow", False, [("slow", "sleep 60")])], user_id=owner)
    server.wait_job(build.jobs["slow"])
    (child,) = worker.children()
    os.kill(child, signal.SIGKILL)
    assert server.wait(build.id)["status"] == "failed"
    (mail,) = smtp_server.wait_for(1, timeout=30)
    assert mail.message["Subject"] == f"Djinn - Build #{build.id} failed"
    assert "The build process died: killed by signal 9" in mail.message.get_content()
