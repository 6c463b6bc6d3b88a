"""Failure mail for one build, sent by its build process or by the supervisor.

Its own module so that the supervisor, which mails only for builds whose
process died, imports the mail stack only in the short-lived process that
sends it.
"""

from __future__ import annotations

import logging
import socket

from . import db, mail
from .config import WorkerConfig
from .model import MAILED
from .queue import Payload

log = logging.getLogger(__name__)

# Connecting to and talking with the mail server, per attempt.
MAIL_TIMEOUT = 30.0


def notify(config: WorkerConfig, payload: Payload, status: str) -> None:
    """Mail the people of a build that did not pass; never changes its outcome.

    Runs after the final status is committed and reported, on a connection
    of its own, so a slow or absent mail server delays nothing but the
    calling process's exit.
    """
    if not config.smtp.enabled or status not in MAILED:
        return
    try:
        conn = db.connect(config.database, application="djinn-worker mail")
        try:
            notice = db.failure_notice(conn, payload.build_id, status, payload.host)
        finally:
            conn.close()
        sender = config.smtp.admin or f"djinn-worker@{socket.gethostname()}"
        mail.send(config.smtp, mail.compose(notice, sender), timeout=MAIL_TIMEOUT)
    except mail.MailError as exc:
        log.error("build %s: no failure mail sent: %s", payload.build_id, exc)
    except Exception as exc:
        log.exception("build %s: no failure mail sent: %s", payload.build_id, exc)
    else:
        log.info("build %s: failure mail sent to %s", payload.build_id, ", ".join(notice.recipients))
