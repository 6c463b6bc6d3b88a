"""Failure mail: what it says, and that it reaches a real SMTP server."""

import dataclasses
import time
from email.utils import parsedate_to_datetime

import pytest
from smtpserver import (
    PASSWORD,
    USERNAME,
    SMTPServer,
    free_port,
    make_certificates,
)

from djinn_worker.config import SMTPConfig
from djinn_worker.mail import (
    FailureNotice,
    MailError,
    Trigger,
    compose,
    describe_trigger,
    send,
)

SENDER = "djinn@ci.example.com"
OUTPUT = "".join(f"line {n}\n" for n in range(1, 41)) + "Done. Run failed\n"

NOTICE = FailureNotice(
    build_id=42,
    number=7,
    status="failed",
    host="https://ci.example.com/",
    username="alice",
    email="alice@example.com",
    recipients=["alice@example.com", "bob@example.com"],
    trigger=Trigger(
        type="push",
        comment="Fix the frobnicator\n\nIt was frobbing twice.",
        data={"sha": "0123456789abcdef", "ref": "refs/heads/master"},
    ),
    output=OUTPUT,
)


def notice(**changes) -> FailureNotice:
    return dataclasses.replace(NOTICE, **changes)


@pytest.mark.parametrize(
    "status, subject",
    [
        ("failed", "Djinn - Build #42 failed"),
        ("killed", "Djinn - Build #42 killed"),
        ("timed_out", "Djinn - Build #42 timed out"),
    ],
)
def test_compose_headers(status, subject):
    message = compose(notice(status=status), SENDER)

    assert message["Subject"] == subject
    assert message["From"] == SENDER
    assert message["To"] == "alice@example.com, bob@example.com"
    assert parsedate_to_datetime(message["Date"]).tzinfo is not None
    assert message["Message-ID"].endswith("@ci.example.com>")
    assert message.get_content_type() == "text/plain"
    assert message.get_content_charset() == "utf-8"


@pytest.mark.parametrize("status", ["failed", "killed", "timed_out"])
def test_compose_body(status):
    body = compose(notice(status=status), SENDER).get_content()

    assert "https://ci.example.com/b/alice/7\n" in body
    assert "Committed 0123456 to refs/heads/master" in body
    assert "Fix the frobnicator\n\nIt was frobbing twice." in body
    if status == "failed":
        tail = [f"line {n}" for n in range(27, 41)] + ["Done. Run failed"]
        assert body.endswith("\n\n" + "\n".join(tail) + "\n")
        assert "line 26\n" not in body
    else:
        assert "line " not in body and "Done. Run" not in body


def test_compose_short_output_is_mailed_whole():
    body = compose(notice(output="only line\n"), SENDER).get_content()
    assert body.endswith("-----\n\nonly line\n")


def test_compose_without_trigger():
    body = compose(notice(trigger=None, status="killed"), SENDER).get_content()
    assert body == "Build #42 killed\n\nBuild: https://ci.example.com/b/alice/7\n"


def test_compose_deduplicates_recipients_keeping_order():
    recipients = [
        "alice@example.com", "bob@example.com", "Alice@Example.COM",
        "carol@example.com", "bob@example.com", "",
    ]
    message = compose(notice(recipients=recipients), SENDER)
    assert message["To"] == "alice@example.com, bob@example.com, carol@example.com"


def test_compose_refuses_no_recipients():
    with pytest.raises(ValueError, match="no one to mail"):
        compose(notice(recipients=[]), SENDER)


def test_compose_non_ascii_survives_the_wire_format():
    trigger = Trigger(type="manual", comment="Réparer le café ☕", data={})
    message = compose(notice(trigger=trigger), SENDER)
    assert "Réparer le café ☕" in message.get_content()
    assert message.as_bytes().isascii()


@pytest.mark.parametrize(
    "type, data, expected",
    [
        ("manual", {}, "Submitted by alice <alice@example.com>"),
        ("push", {"sha": "0123456789abcdef", "ref": "refs/heads/main"},
         "Committed 0123456 to refs/heads/main"),
        # Older servers stored the commit under "id".
        ("push", {"id": "fedcba9876543210", "ref": "refs/heads/main"},
         "Committed fedcba9 to refs/heads/main"),
        ("push", {"ref": "refs/heads/main"}, "Committed to refs/heads/main"),
        ("push", {"sha": "0123456789abcdef"}, "Committed 0123456"),
        ("pull", {"action": "opened", "ref": "main", "id": "12", "sha": "abc"},
         "Opened pull request to main"),
        ("pull", {"action": "synchronized", "ref": "main"},
         "Synchronized pull request to main"),
        ("pull", {}, "Pull request"),
        ("schedule", {"username": "alice", "email": "alice@example.com"},
         "Scheduled by alice <alice@example.com>"),
        ("webhook", {}, "Triggered by webhook"),
    ],
)
def test_describe_trigger(type, data, expected):
    trigger = Trigger(type=type, comment="ignored here", data=data)
    assert describe_trigger(trigger, "alice", "alice@example.com") == expected


def test_send_plain(smtp_server):
    send(SMTPConfig(addr=smtp_server.addr), compose(NOTICE, SENDER))

    [received] = smtp_server.wait_for(1)
    assert received.mail_from == SENDER
    assert received.rcpt_tos == ["alice@example.com", "bob@example.com"]
    assert received.message["Subject"] == "Djinn - Build #42 failed"
    assert "https://ci.example.com/b/alice/7" in received.message.get_content()
    assert not received.tls


def test_send_starttls_verified_against_ca(smtp_tls_server):
    config = SMTPConfig(addr=smtp_tls_server.addr, ca=smtp_tls_server.certificates.ca_file)
    send(config, compose(NOTICE, SENDER))

    [received] = smtp_tls_server.wait_for(1)
    assert received.tls


def test_send_starttls_refuses_another_ca(smtp_tls_server, tmp_path):
    other = make_certificates(tmp_path / "other")
    config = SMTPConfig(addr=smtp_tls_server.addr, ca=other.ca_file)

    with pytest.raises(MailError, match=f"{smtp_tls_server.addr}.*TLS certificate verify failed"):
        send(config, compose(NOTICE, SENDER))
    assert smtp_tls_server.received == []


def test_send_starttls_checks_the_host_name(tmp_path):
    certificates = make_certificates(tmp_path, names=("mail.example.com",))
    with SMTPServer(tls=certificates) as server:
        config = SMTPConfig(addr=server.addr, ca=certificates.ca_file)
        with pytest.raises(MailError, match="certificate verify failed.*mismatch"):
            send(config, compose(NOTICE, SENDER))


def test_send_without_ca_to_a_server_requiring_starttls(smtp_tls_server):
    with pytest.raises(MailError, match="sender djinn@ci.example.com refused: 530"):
        send(SMTPConfig(addr=smtp_tls_server.addr), compose(NOTICE, SENDER))


def test_send_with_unreadable_ca_file(smtp_server, tmp_path):
    config = SMTPConfig(addr=smtp_server.addr, ca=str(tmp_path / "missing.pem"))
    with pytest.raises(MailError, match="smtp.ca .*missing.pem"):
        send(config, compose(NOTICE, SENDER))


def test_send_auth(smtp_auth_server):
    config = SMTPConfig(addr=smtp_auth_server.addr, username=USERNAME, password=PASSWORD)
    send(config, compose(NOTICE, SENDER))

    [received] = smtp_auth_server.wait_for(1)
    assert received.login == USERNAME


def test_send_auth_wrong_password(smtp_auth_server):
    config = SMTPConfig(addr=smtp_auth_server.addr, username=USERNAME, password="wrong")
    with pytest.raises(MailError, match=f"auth failed for user '{USERNAME}': 535"):
        send(config, compose(NOTICE, SENDER))
    assert smtp_auth_server.received == []


def test_send_auth_over_starttls(tmp_path):
    certificates = make_certificates(tmp_path)
    with SMTPServer(tls=certificates, auth=True) as server:
        config = SMTPConfig(
            addr=server.addr, ca=certificates.ca_file, username=USERNAME, password=PASSWORD
        )
        send(config, compose(NOTICE, SENDER))

        [received] = server.wait_for(1)
        assert received.tls and received.login == USERNAME


def test_send_reports_a_refused_recipient_after_mailing_the_rest():
    with SMTPServer(refuse=("bob@example.com",)) as server:
        with pytest.raises(MailError, match=r"recipient refused: bob@example.com \(550 "):
            send(SMTPConfig(addr=server.addr), compose(NOTICE, SENDER))

        [received] = server.wait_for(1)
        assert received.rcpt_tos == ["alice@example.com"]


def test_send_with_every_recipient_refused():
    with SMTPServer(refuse=("alice@example.com", "bob@example.com")) as server:
        with pytest.raises(MailError, match="recipient refused: alice@.*, bob@"):
            send(SMTPConfig(addr=server.addr), compose(NOTICE, SENDER))
        assert server.received == []


def test_send_to_a_server_that_is_down():
    addr = f"127.0.0.1:{free_port()}"
    started = time.monotonic()
    with pytest.raises(MailError, match=f"SMTP server {addr}: connect refused"):
        send(SMTPConfig(addr=addr), compose(NOTICE, SENDER), timeout=5)
    assert time.monotonic() - started < 2
