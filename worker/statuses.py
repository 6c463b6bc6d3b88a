"""Commit statuses on GitHub and GitLab for the builds of pull requests.

The Djinn server sets the first status when the webhook arrives; the worker
sets "running" when the build starts and the final one when it ends, so that
the pull request's check does not stay pending. A code host that is down,
slow or refusing must never change or delay a build: statuses go from a
thread of the build process, each retried a few times with backoff, a newer
one replacing an older one still waiting, and a failure ends as one line in
the worker's log with the host's own message. Tokens are never logged.
"""

from __future__ import annotations

import logging
import queue
import threading
from dataclasses import dataclass
from typing import Any, Callable

from .config import ProviderConfig
from .model import FAILED, KILLED, PASSED, PASSED_WITH_FAILURES, RUNNING, TIMED_OUT, Build

log = logging.getLogger(__name__)

CONTEXT = "continuous-integration/djinn-ci"
DESCRIPTIONS = {
    RUNNING: "Build is running.",
    PASSED: "Build has passed.",
    PASSED_WITH_FAILURES: "Build has passed with failures.",
    FAILED: "Build has failed.",
    KILLED: "Build was killed.",
    TIMED_OUT: "Build has timed out.",
}
STATES = {
    "github": {RUNNING: "pending", PASSED: "success", PASSED_WITH_FAILURES: "success",
               FAILED: "failure", KILLED: "failure", TIMED_OUT: "failure"},
    "gitlab": {RUNNING: "running", PASSED: "success", PASSED_WITH_FAILURES: "success",
               FAILED: "failed", KILLED: "canceled", TIMED_OUT: "canceled"},
}
# Seconds to connect and to wait for an answer, per attempt.
TIMEOUT = (3.0, 5.0)
# Attempts after the first, for refused connections, timeouts and 429/5xx
# answers, waiting 0.5 s, 1 s, 2 s between them.
RETRIES = 3
BACKOFF = 0.5
# The longest a build process waits for its last status after the build.
FINAL_WAIT = (RETRIES + 1) * sum(TIMEOUT) + BACKOFF * (2 ** RETRIES)


@dataclass(frozen=True)
class Target:
    """Where one build's statuses go, with the token already opened."""

    provider: ProviderConfig
    token: str
    repo: str
    repo_id: int
    sha: str
    link: str  # the build's page on the server
    build_id: int

    def request(self, status: str) -> tuple[str, dict[str, Any]]:
        """The URL and JSON body that set status on the commit."""
        state, description = STATES[self.provider.name][status], DESCRIPTIONS[status]
        if self.provider.name == "github":
            return (f"{self.provider.endpoint}/repos/{self.repo}/statuses/{self.sha}",
                    {"state": state, "target_url": self.link, "description": description,
                     "context": CONTEXT})
        return (f"{self.provider.endpoint}/projects/{self.repo_id}/statuses/{self.sha}",
                {"id": self.repo_id, "sha": self.sha, "state": state,
                 "target_url": self.link, "description": description})

    def where(self) -> str:
        return f"{self.provider.name} commit {self.repo or self.repo_id}@{self.sha[:12]}"


def target(build: Build, host: str, providers: tuple[ProviderConfig, ...], cipher) -> Target | None:
    """Where the build's statuses go, or None (logged when it should have had some)."""
    pull = build.pull
    if pull is None:
        return None
    provider = next((p for p in providers if p.name == pull.provider), None)
    if provider is None:
        log.info("build %s: no [[providers]] entry named %r in the worker config; "
                 "its commit status is not set", build.id, pull.provider)
        return None
    if pull.token is None or cipher is None:
        why = "the provider has no access token" if pull.token is None else \
            "crypto.block is not set in the worker config"
        log.error("build %s: commit status not set: %s", build.id, why)
        return None
    try:
        token = cipher.decrypt(pull.token).decode()
    except Exception as exc:  # the cipher's errors and UTF-8's: neither shows the token
        log.error("build %s: commit status not set: cannot decrypt the %s access token: %s",
                  build.id, provider.name, exc)
        return None
    return Target(provider, token, pull.repo, pull.repo_id, pull.sha,
                  f"{host}/b/{build.username}/{build.number}", build.id)


class Statuses:
    """One build's statuses, sent in order by a thread of their own."""

    def __init__(self, target: Target, on_failure: Callable[[], None] = lambda: None):
        self.target, self.on_failure = target, on_failure
        self._queue: queue.SimpleQueue[str | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._send_all, name="statuses", daemon=True)
        self._thread.start()

    def send(self, status: str) -> None:
        """Set status soon; never waits for the code host."""
        self._queue.put(status)

    def finish(self, status: str | None) -> None:
        """Send the final status (None for none) and wait for the thread to end."""
        if status is not None:
            self._queue.put(status)
        self._queue.put(None)
        self._thread.join(FINAL_WAIT)

    def _send_all(self) -> None:
        import requests  # only builds of pull requests load the HTTP stack
        from requests.adapters import HTTPAdapter
        from urllib3.util.retry import Retry

        retry = Retry(total=RETRIES, backoff_factor=BACKOFF, allowed_methods=None,
                      status_forcelist=(429, 500, 502, 503, 504), raise_on_status=False)
        with requests.Session() as session:
            session.mount("http://", HTTPAdapter(max_retries=retry))
            session.mount("https://", HTTPAdapter(max_retries=retry))
            session.headers["Authorization"] = f"Bearer {self.target.token}"
            closing = False
            while not closing:
                status = self._queue.get()
                # Of several statuses waiting, only the newest matters.
                while not self._queue.empty():
                    newer = self._queue.get()
                    closing = closing or newer is None
                    status = newer or status
                if status is None:
                    return
                self._post(session, status)

    def _post(self, session, status: str) -> None:
        import requests

        url, body = self.target.request(status)
        state = body["state"]
        try:
            response = session.post(url, json=body, timeout=TIMEOUT)
        except requests.RequestException as exc:
            self._failed(state, str(exc))
            return
        if response.status_code == 201:
            log.info("build %s: %s set to %s", self.target.build_id, self.target.where(), state)
        else:
            self._failed(state, f"{response.status_code} {_message(response)}")

    def _failed(self, state: str, why: str) -> None:
        why = why.replace(self.target.token, "xxxxxx") if self.target.token else why
        log.error("build %s: %s not set to %s: %s", self.target.build_id, self.target.where(),
                  state, why)
        self.on_failure()


def _message(response) -> str:
    """What the code host said was wrong: GitHub and GitLab both answer JSON."""
    try:
        data = response.json()
    except ValueError:
        return response.text.strip()[:200] or response.reason or ""
    if isinstance(data, dict):
        for key in ("message", "error_description", "error"):
            if isinstance(data.get(key), str):
                return data[key]
    return str(data)[:200]


def start(build: Build, host: str, providers: tuple[ProviderConfig, ...], cipher,
          on_failure: Callable[[], None] = lambda: None) -> Statuses | None:
    """The build's statuses with "running" on its way, or None without a pull request."""
    where = target(build, host, providers, cipher)
    if where is None:
        return None
    statuses = Statuses(where, on_failure)
    statuses.send(RUNNING)
    return statuses
