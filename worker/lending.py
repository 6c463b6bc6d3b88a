"""PostgreSQL connections the supervisor opens once and lends to build processes.

A new connection costs a TCP handshake, SCRAM authentication (milliseconds
of CPU at both ends) and a fresh backend whose catalog caches are cold:
more than everything else a trivial build does. So the supervisor keeps a
few connections it never uses itself, and each build process it forks
inherits one. The child uses it as its own; when it is done it resets the
session (drops the build's advisory lock and resets its settings, keeping
the prepared statements) and says so on its report pipe, and from then on never touches it again: the
supervisor's copy, idle all along, is in the same protocol state and goes
to the next build.

Only the borrower and the supervisor hold a lent connection's socket: every
other child closes it at fork (see fds()), so a borrower that dies while the
supervisor is gone still ends its session, and its lock, by dying. A
connection whose borrower did not hand it back is closed, which ends the
session at the server if the borrower left it alive.

TLS connections are never lent: the TLS state lives in the process, and
after a child has used its copy the supervisor's is out of step.
"""

from __future__ import annotations

import logging

from . import db
from .config import DatabaseConfig

log = logging.getLogger(__name__)


class Lender:
    def __init__(self, config: DatabaseConfig, size: int):
        # size: one per build slot and one for the spare build process.
        self.config, self.size = config, size
        self.idle: list[db.Connection] = []
        self.lent: list[db.Connection] = []

    def fill(self) -> None:
        """Open connections until size are idle or lent; raises db.Error."""
        while len(self.idle) + len(self.lent) < self.size:
            conn = db.connect(self.config, application=db.BUILD_APPLICATION)
            if conn.info.ssl_in_use:
                conn.close()
                log.info("the database connection uses TLS, which cannot be shared with a "
                         "forked process: each build process connects by itself")
                self.size = 0
                return
            db.warm(conn)
            self.idle.append(conn)

    def lend(self) -> db.Connection | None:
        """An idle connection for the build process about to be forked, if any."""
        if not self.idle:
            return None
        conn = self.idle.pop()
        self.lent.append(conn)
        return conn

    def returned(self, conn: db.Connection | None, reusable: bool) -> None:
        """The borrower is done with conn (None: it had none): reusable if
        it handed it back clean."""
        if conn is None:
            return
        self.lent.remove(conn)
        if reusable and not conn.closed and len(self.idle) + len(self.lent) < self.size:
            self.idle.append(conn)
        else:
            conn.close()

    def drop_idle(self) -> None:
        """After the database failed: idle connections are likely dead."""
        for conn in self.idle:
            conn.close()
        self.idle.clear()

    def fds(self, keep: db.Connection | None = None) -> list[int]:
        """The sockets a new child closes: every connection but its own."""
        return [conn.fileno() for conn in self.idle + self.lent
                if conn is not keep and not conn.closed]

    def close(self) -> None:
        self.drop_idle()
        for conn in self.lent:
            conn.close()
        self.lent.clear()
