"""The mail sent to people when one of their builds fails, is killed or times out.

Pure: the caller looks up the build, its owner, the collaborators and the
trigger, and hands them over. Keeping SQL and Redis out means composing can be
tested on its own and sending can be tested against a real SMTP server.
"""

from __future__ import annotations

import smtplib
import ssl
from contextlib import closing
from email import policy
from email.message import EmailMessage
from email.utils import formatdate, make_msgid, parseaddr
from urllib.parse import urlsplit

from .config import SMTPConfig
from .model import FailureNotice, Trigger

# Enough of the log to show what went wrong without mailing the whole build.
TAIL_LINES = 15
# Build output is rarely pure ASCII. Encoding it (quoted-printable or base64)
# keeps it intact through relays that do not speak 8BITMIME, which smtplib
# would otherwise hand raw 8-bit bytes to.
MAIL_POLICY = policy.default.clone(cte_type="7bit")


class MailError(Exception):
    """Mail could not be delivered; the message names the server and why."""


def describe_trigger(trigger: Trigger, username: str, email: str) -> str:
    """One line saying what started the build, worded as the Djinn server does.

    The keys read are those the Djinn server writes into build_triggers.data:
    push has "sha" (older servers: "id") and "ref"; pull has "action" and
    "ref" (the target branch). Data written by other versions may lack any of
    them, so a missing key shortens the sentence instead of failing the mail.
    A scheduled build belongs to the cron job's owner, so the caller's user
    is the one to name.
    """
    data = trigger.data or {}
    if trigger.type == "manual":
        return f"Submitted by {username} <{email}>"
    if trigger.type == "push":
        sha = str(data.get("sha") or data.get("id") or "")[:7]
        return _sentence("Committed", sha, _to(data))
    if trigger.type == "pull":
        return _sentence(str(data.get("action") or ""), "pull request", _to(data))
    if trigger.type == "schedule":
        return f"Scheduled by {username} <{email}>"
    return f"Triggered by {trigger.type}"


def _to(data: dict) -> str:
    return f"to {data['ref']}" if data.get("ref") else ""


def _sentence(*words: str) -> str:
    text = " ".join(w for w in words if w)
    return text[:1].upper() + text[1:]


def compose(notice: FailureNotice, sender: str) -> EmailMessage:
    """Build the failure mail; it is sent as is, so every header is set here."""
    recipients = _unique(notice.recipients)
    if not recipients:
        raise ValueError(f"build #{notice.build_id}: no one to mail")
    host = notice.host.rstrip("/")
    status = notice.status.replace("_", " ")

    message = EmailMessage(policy=MAIL_POLICY)
    message["Subject"] = f"Djinn - Build #{notice.build_id} {status}"
    message["From"] = sender
    message["To"] = ", ".join(recipients)
    message["Date"] = formatdate(localtime=True)
    message["Message-ID"] = make_msgid(domain=_domain(sender, host))
    message.set_content(_body(notice, host, status), charset="utf-8")
    return message


def _unique(addresses: list[str]) -> list[str]:
    """Owner first, then collaborators, each once: the owner may collaborate too."""
    seen: set[str] = set()
    unique = []
    for address in (a.strip() for a in addresses):
        if address and address.lower() not in seen:
            seen.add(address.lower())
            unique.append(address)
    return unique


def _domain(sender: str, host: str) -> str:
    """A domain for Message-ID that needs no DNS lookup, unlike make_msgid's default."""
    return (
        parseaddr(sender)[1].rpartition("@")[2]
        or urlsplit(host).hostname
        or "localhost"
    )


def _body(notice: FailureNotice, host: str, status: str) -> str:
    parts = [
        f"Build #{notice.build_id} {status}",
        f"Build: {host}/b/{notice.username}/{notice.number}",
    ]
    if notice.trigger is not None:
        trigger = [describe_trigger(notice.trigger, notice.username, notice.email)]
        if notice.trigger.comment.strip():
            trigger.append(notice.trigger.comment.strip())
        parts.append("-----\n" + "\n\n".join(trigger) + "\n-----")
    if notice.status == "failed" and notice.output.strip():
        lines = notice.output.rstrip("\n").split("\n")
        parts.append("\n".join(lines[-TAIL_LINES:]))
    return "\n\n".join(parts) + "\n"


def send(config: SMTPConfig, message: EmailMessage, timeout: float = 30.0) -> None:
    """Deliver one message, turning every way that can fail into MailError.

    With smtp.ca set the connection must be upgraded with STARTTLS and the
    server's certificate must chain to that CA and match the host name in
    smtp.addr, so credentials and build output never cross the network in
    clear text to a server nobody vouched for.
    """
    address = config.address
    context = _tls_context(config.ca) if config.ca else None
    try:
        with closing(smtplib.SMTP(address.host, address.port, timeout=timeout)) as smtp:
            if context is not None:
                smtp.starttls(context=context)
            if config.username and config.password:
                smtp.login(config.username, config.password)
            refused = smtp.send_message(message)
            smtp.quit()
    except (smtplib.SMTPException, OSError) as exc:
        raise MailError(f"SMTP server {config.addr}: {_reason(exc, config)}") from exc
    if refused:
        raise MailError(
            f"SMTP server {config.addr}: recipient refused: {_refusals(refused)} "
            "(the other recipients were sent the mail)"
        )


def _tls_context(cafile: str) -> ssl.SSLContext:
    try:
        return ssl.create_default_context(cafile=cafile)
    except (OSError, ssl.SSLError) as exc:
        raise MailError(f"smtp.ca {cafile}: cannot load CA certificates: {exc}") from exc


def _reason(exc: BaseException, config: SMTPConfig) -> str:
    """Say what went wrong in the operator's terms; smtplib's own text rarely does."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return (
            f"TLS certificate verify failed ({exc.verify_message}); "
            f"checked against smtp.ca {config.ca}"
        )
    if isinstance(exc, ssl.SSLError):
        return f"TLS handshake failed: {exc.reason or exc}"
    if isinstance(exc, smtplib.SMTPAuthenticationError):
        return f"auth failed for user {config.username!r}: {_reply(exc)}"
    if isinstance(exc, smtplib.SMTPRecipientsRefused):
        return f"recipient refused: {_refusals(exc.recipients)}"
    if isinstance(exc, smtplib.SMTPSenderRefused):
        return f"sender {exc.sender} refused: {_reply(exc)}"
    if isinstance(exc, smtplib.SMTPResponseException):
        return f"unexpected reply: {_reply(exc)}"
    if isinstance(exc, smtplib.SMTPServerDisconnected):
        return f"server closed the connection: {exc}"
    if isinstance(exc, smtplib.SMTPException):
        return str(exc)
    if isinstance(exc, ConnectionRefusedError):
        return "connect refused (is the server running and is smtp.addr right?)"
    if isinstance(exc, TimeoutError):
        return "timed out waiting for the server"
    return f"cannot connect: {exc.strerror or exc}"


def _reply(exc: smtplib.SMTPResponseException) -> str:
    error = exc.smtp_error
    text = error.decode(errors="replace") if isinstance(error, bytes) else str(error)
    return f"{exc.smtp_code} {text}"


def _refusals(refused: dict) -> str:
    return ", ".join(
        f"{rcpt} ({code} {reply.decode(errors='replace')})"
        for rcpt, (code, reply) in refused.items()
    )
