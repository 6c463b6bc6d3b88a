"""A real local HTTP server that plays GitHub's and GitLab's commit status APIs.

GitHub's API is served under /github, GitLab's under /gitlab/api/v4. It
checks what the real APIs would refuse (path, method, token, JSON body) and
records every request, so tests assert on exactly what the worker sent. It
can answer 500 a number of times first, or never answer at all.
"""

from __future__ import annotations

import json
import re
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

GITHUB_PATH = re.compile(r"/github/repos/([^/]+/[^/]+)/statuses/([0-9a-f]{40})")
GITLAB_PATH = re.compile(r"/gitlab/api/v4/projects/(\d+)/statuses/([0-9a-f]{40})")
GITHUB_KEYS = {"state", "target_url", "description", "context"}
GITLAB_KEYS = {"id", "sha", "state", "target_url", "description"}


@dataclass
class Request:
    provider: str  # github | gitlab
    path: str
    authorization: str
    body: dict
    answer: int


class CodeHost:
    def __init__(self, token: str):
        self.token = token
        self.requests: list[Request] = []
        self.failures = 0  # answer this many requests with 500 first
        self.silent = False  # read requests and never answer them
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def github(self) -> str:
        return f"http://127.0.0.1:{self._server.server_port}/github"

    @property
    def gitlab(self) -> str:
        return f"http://127.0.0.1:{self._server.server_port}/gitlab/api/v4"

    def __enter__(self) -> CodeHost:
        self._thread.start()
        return self

    def __exit__(self, *_exc) -> None:
        self.close()

    def close(self) -> None:
        """Stop answering: requests left hanging end, new ones are refused."""
        if not self._closed.is_set():
            self._closed.set()
            self._server.shutdown()
            self._server.server_close()

    def answered(self, count: int, timeout: float = 30.0) -> list[Request]:
        """The requests answered 201, once there are count of them."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                done = [r for r in self.requests if r.answer == 201]
            if len(done) >= count:
                return done
            time.sleep(0.05)
        raise AssertionError(f"{len(done)} statuses set, not {count}: {self.requests}")

    def _answer(self, provider: str, path: str, authorization: str, body: dict) -> tuple[int, dict]:
        with self._lock:
            if self.failures:
                self.failures -= 1
                code, reply = 500, {"message": "Server Error"}
            elif authorization not in (f"Bearer {self.token}", f"token {self.token}"):
                code, reply = 401, {"message": "Bad credentials" if provider == "github"
                                    else "401 Unauthorized"}
            else:
                code, reply = self._check(provider, path, body)
            self.requests.append(Request(provider, path, authorization, body, code))
        return code, reply

    @staticmethod
    def _check(provider: str, path: str, body: dict) -> tuple[int, dict]:
        pattern, keys = (GITHUB_PATH, GITHUB_KEYS) if provider == "github" else (GITLAB_PATH, GITLAB_KEYS)
        match = pattern.fullmatch(path)
        if not match:
            return 404, {"message": "Not Found"}
        if set(body) != keys:
            return 422, {"message": f"expected keys {sorted(keys)}, got {sorted(body)}"}
        if provider == "gitlab" and (str(body["id"]) != match[1] or body["sha"] != match[2]):
            return 422, {"message": "id and sha differ from the path"}
        return 201, {"state": body["state"]}

    def _handler(self):
        host = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length)
                if host.silent:
                    host._closed.wait()
                    return
                provider = "github" if self.path.startswith("/github/") else "gitlab"
                try:
                    body = json.loads(raw)
                except ValueError:
                    body = {"unreadable": raw.decode(errors="replace")}
                if self.headers.get("Content-Type") != "application/json":
                    body = {"not json": self.headers.get("Content-Type")}
                code, reply = host._answer(provider, self.path,
                                           self.headers.get("Authorization", ""), body)
                data = json.dumps(reply).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *_args) -> None:
                pass

        return Handler
