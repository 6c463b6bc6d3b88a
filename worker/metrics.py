"""What the supervisor counts and how healthy it is, served over HTTP.

The supervisor owns every figure: build processes tell it what only they
know over the report pipe, so nothing is lost when one dies and no
multiprocess registry is needed. `/metrics` is Prometheus's text format from
the official client; `/healthz` says whether PostgreSQL and Redis answered
lately and the event loop is turning. Both are served by a thread that only
reads: the loop never waits on a scraper.

Without `[metrics]` nothing is served and prometheus_client is never
imported: every figure is then a stand-in that does nothing.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from typing import Callable, Iterable

from .config import Address

POSTGRESQL, REDIS = "postgresql", "redis"
# Seconds: from a few milliseconds (a claim, a container) to hours (a build).
_SHORT = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_LONG = (1, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400)


class Unavailable(Exception):
    """metrics.addr cannot be listened on; the message says why."""


class _Nothing:
    """A figure nobody reads: the worker runs without [metrics]."""

    def labels(self, *_values: str) -> _Nothing:
        return self

    def inc(self, _amount: float = 1) -> None:
        pass

    def set(self, _value: float) -> None:
        pass

    def observe(self, _value: float) -> None:
        pass


class Metrics:
    def __init__(self, enabled: bool):
        self.registry = None
        if not enabled:
            nothing = _Nothing()
            for name in _FIGURES:
                setattr(self, name, nothing)
            return
        import prometheus_client as prom

        self.registry = prom.CollectorRegistry()
        for name, (kind, metric, doc, labels, *buckets) in _FIGURES.items():
            extra = {"buckets": buckets[0]} if buckets else {}
            setattr(self, name, getattr(prom, kind)(metric, doc, labels, registry=self.registry,
                                                    **extra))

    def exposition(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


# attribute: (type, name, help, labels[, buckets]); the README's table lists them.
_FIGURES = {
    "started": ("Counter", "djinn_worker_builds_started_total",
                "Builds claimed and started.", ["driver"]),
    "finished": ("Counter", "djinn_worker_builds_total",
                 "Builds that ended, by final status.", ["driver", "status"]),
    "running": ("Gauge", "djinn_worker_builds_running", "Builds running now.", []),
    "slots": ("Gauge", "djinn_worker_slots", "Builds this worker runs at once.", []),
    "queue_wait": ("Histogram", "djinn_worker_queue_wait_seconds",
                   "Seconds from a build's created_at to its claim.", [],
                   _SHORT + (600, 1800, 3600, 14400)),
    "duration": ("Histogram", "djinn_worker_build_duration_seconds",
                 "Seconds from a build's claim to its final status.", ["driver", "status"], _LONG),
    "create": ("Histogram", "djinn_worker_driver_create_seconds",
               "Seconds to create a build's driver (container, VM, ssh session).",
               ["driver"], _SHORT),
    "output_stored": ("Counter", "djinn_worker_output_stored_bytes_total",
                      "Bytes of job output stored.", ["driver"]),
    "output_dropped": ("Counter", "djinn_worker_output_dropped_bytes_total",
                       "Bytes of job output left out by output_limit.", ["driver"]),
    "payloads_dropped": ("Counter", "djinn_worker_payloads_dropped_total",
                         "Queue payloads dropped, by reason.", ["reason"]),
    "kills": ("Counter", "djinn_worker_kills_total", "Kill requests forwarded to a build.", []),
    "orphans": ("Counter", "djinn_worker_orphans_total",
                "Builds of gone workers settled, by what was done.", ["outcome"]),
    "errors": ("Counter", "djinn_worker_service_errors_total",
               "Failed calls to PostgreSQL or Redis.", ["service"]),
    "reconnects": ("Counter", "djinn_worker_service_reconnects_total",
                   "Outages of PostgreSQL or Redis that ended.", ["service"]),
    "notices_failed": ("Counter", "djinn_worker_notice_failures_total",
                       "Commit statuses and failure mails not sent.", ["notice"]),
    "lease_age": ("Gauge", "djinn_worker_lease_age_seconds",
                  "Seconds since this worker's lease was last refreshed.", []),
}


class Health:
    """When each server last answered, what failed since, and the loop's last turn.

    Healthy means PostgreSQL and Redis both answered within `window` seconds
    and are not failing now, and the loop turned within `window`.
    """

    def __init__(self, window: float, metrics: Metrics):
        self.window, self.metrics = window, metrics
        now = time.monotonic()
        self._answered = {POSTGRESQL: now, REDIS: now}
        self._failing: dict[str, str] = {}
        self._turned = now
        self._lease = now
        self._lock = threading.Lock()

    def answered(self, service: str) -> None:
        with self._lock:
            self._answered[service] = time.monotonic()
            if self._failing.pop(service, None) is not None:
                self.metrics.reconnects.labels(service).inc()

    def failed(self, service: str, reason: str) -> None:
        self.metrics.errors.labels(service).inc()
        with self._lock:
            self._failing[service] = reason

    def turned(self) -> None:
        """The event loop came round."""
        self._turned = time.monotonic()

    def leased(self) -> None:
        self._lease = time.monotonic()

    def lease_age(self) -> float:
        return time.monotonic() - self._lease

    def problems(self) -> list[str]:
        now = time.monotonic()
        with self._lock:
            problems = [f"{service}: {reason}" for service, reason in sorted(self._failing.items())]
            problems += [f"{service} has not answered for {now - at:.0f}s"
                         for service, at in sorted(self._answered.items())
                         if service not in self._failing and now - at > self.window]
        if now - self._turned > self.window:
            problems.append(f"the event loop has not turned for {now - self._turned:.0f}s")
        return problems


def serve(address: Address, metrics: Metrics, health: Health):
    """Start serving /metrics and /healthz from a thread; the server is returned
    so that build processes can close its socket.

    The HTTP stack is imported here, so a worker without [metrics] never
    carries it.
    """
    import socketserver
    from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

    class QuietHandler(WSGIRequestHandler):
        def log_message(self, *_args) -> None:
            pass  # a scrape every few seconds is not the worker's news

    class Server(socketserver.ThreadingMixIn, WSGIServer):
        daemon_threads = True
        address_family = socket.AF_INET6 if ":" in address.host else socket.AF_INET

    def app(environ: dict, start_response: Callable) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == "/metrics":
            metrics.lease_age.set(health.lease_age())
            body, kind = metrics.exposition()
            status = "200 OK"
        elif path == "/healthz":
            problems = health.problems()
            status = "503 Service Unavailable" if problems else "200 OK"
            body = json.dumps({"status": "unhealthy" if problems else "ok",
                               "problems": problems}).encode() + b"\n"
            kind = "application/json"
        else:
            status, body, kind = "404 Not Found", b"/metrics or /healthz\n", "text/plain"
        start_response(status, [("Content-Type", kind), ("Content-Length", str(len(body)))])
        return [body]

    try:
        server = make_server(address.host, address.port, app, Server, QuietHandler)
    except OSError as exc:
        raise Unavailable(f"cannot serve metrics at {address.host}:{address.port}: "
                          f"{exc.strerror or exc}") from None
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    return server
