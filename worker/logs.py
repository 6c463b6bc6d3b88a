"""The worker's log: lines for people (`log.format = "text"`) or one JSON
object per line for log shippers (`"json"`), each naming the build it is
about, so that neither needs parsing rules to tell builds apart.

A build process names its build once (set_build) and every line it logs
carries it; a supervisor line about a build says "build N" in its text,
which is where the id is taken from.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from datetime import datetime, timezone

from .config import LogConfig

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "error": logging.ERROR}
TEXT = "%(asctime)s %(levelname)s [%(process)d] %(build)s%(message)s"
_NAMED = re.compile(r"\bbuild (\d+)\b")


class _Build:
    """The build this process runs, if it is a build process."""

    id: int | None = None
    driver: str | None = None


def set_build(build_id: int, driver: str | None = None) -> None:
    _Build.id, _Build.driver = build_id, driver


class _BuildFilter(logging.Filter):
    """Puts build_id and driver on every record, and the text format's
    "build N: " prefix on a build process's lines that do not say it."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        named = _NAMED.search(message)
        record.build_id = _Build.id if _Build.id is not None else (int(named[1]) if named else None)
        record.driver = _Build.driver
        record.build = f"build {_Build.id}: " if _Build.id is not None and not named else ""
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(
                timespec="milliseconds"),
            "level": record.levelname.lower(),
            "message": record.getMessage(),
            "pid": record.process,
        }
        for key in ("build_id", "driver"):
            if getattr(record, key, None) is not None:
                entry[key] = getattr(record, key)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def setup(config: LogConfig) -> logging.Handler:
    if config.file == "/dev/stdout":
        handler: logging.Handler = logging.StreamHandler(sys.stdout)
    else:
        handler = logging.FileHandler(config.file)
    handler.setFormatter(JsonFormatter() if config.format == "json" else logging.Formatter(TEXT))
    handler.addFilter(_BuildFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(LEVELS[config.level])
    # redis-py reports its own feature probing at debug level; that is not
    # the worker's news.
    logging.getLogger("redis").setLevel(max(LEVELS[config.level], logging.INFO))
    return handler


def reopen(handler: logging.FileHandler) -> None:
    """Write to a fresh file at log.file (on SIGHUP, after logrotate renamed it)."""
    try:
        stream = open(handler.baseFilename, "a", encoding=handler.encoding)
    except OSError as exc:
        logging.error("cannot reopen the log file %s: %s; still writing to the old one",
                      handler.baseFilename, exc.strerror)
        return
    handler.setStream(stream).close()
    logging.info("log file reopened")
