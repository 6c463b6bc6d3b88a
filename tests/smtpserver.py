"""A real SMTP server for tests: aiosmtpd on 127.0.0.1, on a free port.

Tests that send mail talk to this server over a real socket instead of a
mocked smtplib, so STARTTLS, certificate checks and AUTH are exercised the way
a mail relay would. Import the fixtures into a test module:

    from smtpserver import smtp_server, smtp_tls_server, smtp_auth_server

The server runs in a thread of its own and keeps every message it accepts.
"""

from __future__ import annotations

import ssl
import threading
import warnings
from dataclasses import dataclass
from email import policy
from email.message import EmailMessage
from email.parser import BytesParser
from pathlib import Path
from typing import Iterator

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword
from pki import CA
from services import free_port

USERNAME = "djinn"
PASSWORD = "s3cret"


@dataclass(frozen=True)
class Received:
    mail_from: str
    rcpt_tos: list[str]
    message: EmailMessage
    login: str | None  # who authenticated, if anyone
    tls: bool  # whether STARTTLS was in effect


@dataclass(frozen=True)
class Certificates:
    ca_file: str  # what a client passes as smtp.ca
    cert_file: str
    key_file: str


def make_certificates(
    directory: Path, names: tuple[str, ...] = ("127.0.0.1", "localhost")
) -> Certificates:
    """A fresh CA and a server certificate it signed, valid for `names`."""
    ca = CA(directory)
    cert_file, key_file = ca.issue("server", names[0], names)
    return Certificates(ca_file=ca.file, cert_file=cert_file, key_file=key_file)


class SMTPServer:
    """One running aiosmtpd server and its handler; use as a context manager.

    tls: a Certificates to offer STARTTLS with, and then require it.
    auth: require AUTH with USERNAME/PASSWORD before accepting mail. Without
    tls, AUTH is allowed in clear text so it can be tested on its own.
    refuse: recipients answered "550 no such user", as a relay would.
    """

    def __init__(
        self,
        tls: Certificates | None = None,
        auth: bool = False,
        refuse: tuple[str, ...] = (),
    ):
        self.host = "127.0.0.1"
        self.port = free_port()
        self.certificates = tls
        self.refuse = refuse
        self.received: list[Received] = []
        self._arrived = threading.Condition()
        options: dict = {}
        if tls is not None:
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(tls.cert_file, tls.key_file)
            options.update(tls_context=context, require_starttls=True)
        if auth:
            options.update(
                authenticator=_check_password,
                auth_required=True,
                auth_require_tls=tls is not None,
            )
        self._controller = Controller(self, hostname=self.host, port=self.port, **options)

    @property
    def addr(self) -> str:
        """What goes into smtp.addr to reach this server."""
        return f"{self.host}:{self.port}"

    def __enter__(self) -> SMTPServer:
        self._controller.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._controller.stop()

    async def handle_RCPT(self, server, session, envelope, address, options) -> str:
        if address in self.refuse:
            return "550 5.1.1 no such user"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope) -> str:
        auth = session.auth_data
        login = auth.login.decode() if isinstance(auth, LoginPassword) else None
        received = Received(
            mail_from=envelope.mail_from,
            rcpt_tos=list(envelope.rcpt_tos),
            message=BytesParser(policy=policy.default).parsebytes(envelope.content),
            login=login,
            tls=session.ssl is not None,
        )
        with self._arrived:
            self.received.append(received)
            self._arrived.notify_all()
        return "250 OK"

    def wait_for(self, count: int, timeout: float = 5.0) -> list[Received]:
        """Block until `count` messages have arrived; fail the test if they don't."""
        with self._arrived:
            if not self._arrived.wait_for(lambda: len(self.received) >= count, timeout):
                got = len(self.received)
                pytest.fail(f"expected {count} message(s) within {timeout}s, got {got}")
            return list(self.received)


def _check_password(server, session, envelope, mechanism, auth_data) -> AuthResult:
    ok = isinstance(auth_data, LoginPassword) and auth_data == (
        USERNAME.encode(), PASSWORD.encode()
    )
    # handled=False lets aiosmtpd answer "535 credentials invalid" itself.
    return AuthResult(success=ok, handled=False, auth_data=auth_data)


@pytest.fixture
def smtp_server() -> Iterator[SMTPServer]:
    """Plain SMTP, no TLS, no AUTH."""
    with SMTPServer() as server:
        yield server


@pytest.fixture
def smtp_tls_server(tmp_path: Path) -> Iterator[SMTPServer]:
    """STARTTLS required; its CA is at server.certificates.ca_file."""
    with SMTPServer(tls=make_certificates(tmp_path / "smtp-tls")) as server:
        yield server


@pytest.fixture
def smtp_auth_server() -> Iterator[SMTPServer]:
    """AUTH required (USERNAME/PASSWORD), allowed without TLS."""
    # aiosmtpd rightly warns about AUTH in clear text; here it is the point.
    # pytest restores the warning filters after each test.
    warnings.filterwarnings("ignore", "Requiring AUTH while not requiring TLS")
    with SMTPServer(auth=True) as server:
        yield server
