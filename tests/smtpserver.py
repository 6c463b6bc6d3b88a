"""A real SMTP server for tests: aiosmtpd on 127.0.0.1, on a free port.

Tests that send mail talk to this server over a real socket instead of a
mocked smtplib, so STARTTLS, certificate checks and AUTH are exercised the way
a mail relay would. Import the fixtures into a test module:

    from smtpserver import smtp_server, smtp_tls_server, smtp_auth_server

The server runs in a thread of its own and keeps every message it accepts.
"""

from __future__ import annotations

import datetime
import ipaddress
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
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
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
    """A fresh CA and a server certificate it signed, valid for `names`.

    A separate CA, rather than one self-signed leaf, is what smtp.ca points
    at in production, and it passes OpenSSL's strict checks as well.
    EC keys keep generation to milliseconds, so every test can have its own.
    """
    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    start, end = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=1)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "djinn-worker test CA")])
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    key = ec.generate_private_key(ec.SECP256R1())
    alt_names = x509.SubjectAlternativeName([_general_name(n) for n in names])
    server_auth = x509.ExtendedKeyUsage([x509.ExtendedKeyUsageOID.SERVER_AUTH])
    ca_aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(alt_names, critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(cert_sign=False), critical=True)
        .add_extension(server_auth, critical=False)
        .add_extension(ca_aki, critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    files = Certificates(
        ca_file=str(directory / "ca.pem"),
        cert_file=str(directory / "server.pem"),
        key_file=str(directory / "server.key"),
    )
    Path(files.ca_file).write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    Path(files.cert_file).write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    Path(files.key_file).write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return files


def _key_usage(cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not cert_sign, content_commitment=False, key_encipherment=False,
        data_encipherment=False, key_agreement=False, key_cert_sign=cert_sign,
        crl_sign=cert_sign, encipher_only=False, decipher_only=False,
    )


def _general_name(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


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
