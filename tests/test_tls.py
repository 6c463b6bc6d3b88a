"""TLS to PostgreSQL ([database.ssl]) end to end: a real server with ssl = on
that refuses every connection without TLS, throwaway CAs, the real worker."""

from __future__ import annotations

import re
import time
from collections import Counter
from dataclasses import dataclass

import psycopg2
import pytest
from pki import CA
from services import DIST_SCHEMA, Postgres, ServerTLS, free_port

from djinn_worker.db import one_line

# The role that must show a client certificate; every other role needs TLS only.
CERT_ROLE = "worker"
# The worker's connections as the server sees them: the supervisor's
# ("djinn-worker"), the running build's and the spare build process's
# ("djinn-worker build").
EXPECTED = Counter({"djinn-worker": 1, "djinn-worker build": 2})


@dataclass(frozen=True)
class Files:
    ca: str  # signed the server's certificate and the client's
    server: tuple[str, str]  # certificate and key, for 127.0.0.1 only
    client: tuple[str, str]  # certificate and key for CERT_ROLE
    other_ca: str  # a CA the server has never heard of
    stranger: tuple[str, str]  # a client certificate for CERT_ROLE from other_ca


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Files:
    directory = tmp_path_factory.mktemp("pki")
    ca, other = CA(directory), CA(directory, "other-ca", "another CA")
    return Files(
        ca=ca.file,
        # An IP SAN only: verify-full accepts 127.0.0.1 and refuses "localhost".
        server=ca.issue("server", "127.0.0.1", ("127.0.0.1",)),
        client=ca.issue("client", CERT_ROLE, client=True),
        other_ca=other.file,
        stranger=other.issue("stranger", CERT_ROLE, client=True),
    )


@pytest.fixture(scope="module")
def postgres(pki):
    """This module's server in place of the suite's: TLS required of every
    connection, and a client certificate of CERT_ROLE (cert auth: its common
    name is the role)."""
    pg = Postgres(tls=ServerTLS(*pki.server, pki.ca, hba=(
        f"hostssl all {CERT_ROLE} 127.0.0.1/32 cert",
        "hostssl all all 127.0.0.1/32 trust",
    ))).start()
    pg.create_database("djinn_dist", DIST_SCHEMA)
    conn = pg.connect("postgres")
    with conn.cursor() as cur:
        cur.execute(f"CREATE ROLE {CERT_ROLE} LOGIN SUPERUSER")
    conn.close()
    yield pg
    pg.stop()


def ca_only(pki: Files) -> dict:
    return {"ssl": {"ca": pki.ca}}


def client_cert(pki: Files) -> dict:
    cert, key = pki.client
    return {"username": CERT_ROLE, "ssl": {"ca": pki.ca, "cert": cert, "key": key}}


def worker_connections(server, user: str) -> list[dict]:
    """pg_stat_ssl's rows for the worker's connections as user, once all of
    EXPECTED are there (the spare connects a moment after the build starts)."""
    deadline = time.monotonic() + 10
    while True:
        rows = server.sql(
            "SELECT a.application_name, s.ssl, s.client_dn FROM pg_stat_activity a "
            "JOIN pg_stat_ssl s USING (pid) WHERE a.usename = %s "
            "AND a.application_name LIKE 'djinn-worker%%'", user)
        if Counter(r["application_name"] for r in rows) >= EXPECTED or time.monotonic() > deadline:
            return rows
        time.sleep(0.05)


@pytest.mark.parametrize("database", [ca_only, client_cert])
def test_builds_run_over_tls(server, make_worker, pki, tmp_path, database):
    """Every connection of the worker, seen from the server, is TLS."""
    config = database(pki)
    worker = make_worker({"database": config})
    gate = tmp_path / "gate"
    build = server.queue_build([("test", False, [
        ("wait", f"while [ ! -e {gate} ]; do sleep 0.05; done\necho over TLS")])])
    server.wait_job(build.jobs["wait"])
    seen = worker_connections(server, config.get("username", "postgres"))
    gate.touch()
    row = server.wait(build.id)
    assert row["status"] == "passed", row["output"]
    assert "over TLS" in server.job(build.jobs["wait"])["output"]
    assert Counter(r["application_name"] for r in seen) >= EXPECTED, seen
    assert all(r["ssl"] for r in seen), seen
    dn = {r["client_dn"] for r in seen}
    assert dn == ({f"/CN={CERT_ROLE}"} if database is client_cert else {None}), seen
    # TLS state cannot be shared with a fork: build processes connect themselves.
    assert "cannot be shared with a forked process" in worker.log


def test_failure_mail_reads_the_build_over_tls(server, make_worker, pki, smtp_server):
    """The mail process's connection needs the client certificate too."""
    make_worker({"database": client_cert(pki),
                 "smtp": {"addr": smtp_server.addr, "admin": "djinn@ci.example.com"}})
    build = server.queue_build([("test", False, [("fails", "exit 3")])])
    assert server.wait(build.id)["status"] == "failed"
    (mail,) = smtp_server.wait_for(1, timeout=30)
    assert f"Build #{build.id} failed" in mail.message["Subject"]


@pytest.mark.parametrize("database, reason", [
    (lambda pki: {"ssl": {"ca": pki.other_ca}}, "certificate verify failed"),
    (lambda pki: {"addr": "localhost", "ssl": {"ca": pki.ca}},
     'does not match host name "localhost"'),
    (lambda pki: {"username": CERT_ROLE, "ssl": {"ca": pki.ca}},
     "connection requires a valid client certificate"),
    (lambda pki: {"username": CERT_ROLE,
                  "ssl": {"ca": pki.ca, "cert": pki.stranger[0], "key": pki.stranger[1]}},
     "SSL error: tlsv1 alert unknown ca"),
], ids=["wrong-ca", "wrong-host-name", "no-client-cert", "client-cert-of-another-ca"])
def test_tls_failures_stop_the_start_with_one_line(make_worker, postgres, pki, database, reason):
    config = database(pki)
    addr = f"{config.pop('addr', '127.0.0.1')}:{postgres.port}"
    worker = make_worker({"database": {**config, "addr": addr}}, start=False).start(wait=None)
    assert worker.proc.wait(30) == 1, worker.log
    lines = worker.log.splitlines()
    assert all(re.match(r"\d{4}-\d\d-\d\d ", line) for line in lines), worker.log
    (line,) = [line for line in lines if "cannot connect" in line]
    assert f"cannot connect to the database at {addr}: " in line and reason in line, line


def test_a_message_of_several_lines_becomes_one():
    """libpq's message for two addresses: a line and an indented hint each."""
    with pytest.raises(psycopg2.OperationalError) as caught:
        psycopg2.connect(host="127.0.0.1,127.0.0.1", port=free_port(), dbname="djinn",
                         connect_timeout=5)
    assert str(caught.value).count("\n") >= 3
    line = one_line(caught.value)
    assert "\n" not in line and "\t" not in line
    assert line.count("Connection refused; Is the server running on that host") == 2, line


def test_gssapi_encryption_is_asked_for_only_through_pggssencmode(make_worker, monkeypatch):
    """The worker turns libpq's GSSAPI attempt off (it logs in with a
    password), unless PGGSSENCMODE asks for it, as PGSSLMODE does for TLS."""
    monkeypatch.setenv("PGGSSENCMODE", "require")
    worker = make_worker(start=False).start(wait=None)
    assert worker.proc.wait(30) == 1, worker.log
    (line,) = [line for line in worker.log.splitlines() if "cannot connect" in line]
    assert "GSSAPI encryption required" in line, line
