"""Failure mail and commit statuses for a build that is over.

The build process sends its own; the supervisor sends them only for builds
whose process died, from a short-lived process, so that it never imports the
mail or HTTP stacks itself.
"""

from __future__ import annotations

import logging
import socket

from . import db, mail, statuses
from .config import WorkerConfig
from .crypto import BlockCipher
from .model import MAILED
from .queue import Payload

log = logging.getLogger(__name__)

# Connecting to and talking with the mail server, per attempt.
MAIL_TIMEOUT = 30.0


def notify(config: WorkerConfig, payload: Payload, status: str) -> bool:
    """Mail the people of a build that did not pass; never changes its outcome.

    Runs after the final status is committed and reported, on a connection
    of its own, so a slow or absent mail server delays nothing but the
    calling process's exit. False if a mail was due and not sent.
    """
    if not config.smtp.enabled or status not in MAILED:
        return True
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
        return True
    return False


def commit_status(config: WorkerConfig, payload: Payload, status: str) -> None:
    """The final commit status of a build settled by the supervisor."""
    if not config.providers:
        return
    try:
        conn = db.connect(config.database, application="djinn-worker notices")
        try:
            build = db.load_build(conn, payload.build_id)
        finally:
            conn.close()
        cipher = BlockCipher(config.cipher_key) if config.crypto_block else None
        target = statuses.target(build, payload.host, config.providers, cipher)
    except Exception as exc:
        log.error("build %s: no commit status set: %s", payload.build_id, db.one_line(exc))
        return
    if target is not None:
        statuses.Statuses(target).finish(status)
