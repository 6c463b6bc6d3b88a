"""The shape of one build as the runner sees it: plain data, no SQL.

db.py fills these from the database; the runner and the drivers only ever see
these objects, which is what lets them run without PostgreSQL or Redis.
"""

from __future__ import annotations

from dataclasses import dataclass, field

RUNNING = "running"
PASSED = "passed"
PASSED_WITH_FAILURES = "passed_with_failures"
FAILED = "failed"
KILLED = "killed"
TIMED_OUT = "timed_out"

# Statuses that make the server mail people.
MAILED = (FAILED, KILLED, TIMED_OUT)
# The first job of a build's first stage, if so named, is the driver's creation.
CREATE_JOB = "create driver"

_RANK = {PASSED: 0, PASSED_WITH_FAILURES: 1, FAILED: 2, KILLED: 3, TIMED_OUT: 3}


class StopBuild(Exception):
    """Whatever records the build can no longer do so: the build process
    stops at once and writes nothing more (its driver is still destroyed)."""


def worst(a: str, b: str) -> str:
    """The more severe of two finished statuses (a wins ties)."""
    return b if _RANK[b] > _RANK[a] else a


def done_line(status: str) -> str:
    """The last line of every build log, however the build ended."""
    return f"Done. Run {status}\n"


@dataclass
class Artifact:
    id: int
    source: str
    name: str
    hash: str


@dataclass
class Job:
    id: int
    name: str
    commands: str
    artifacts: list[Artifact] = field(default_factory=list)


@dataclass
class Stage:
    id: int
    name: str
    can_fail: bool
    jobs: list[Job] = field(default_factory=list)


@dataclass
class Object:
    id: int
    source: str
    name: str
    hash: str | None


@dataclass
class Key:
    name: str
    key: bytes
    config: str
    location: str


@dataclass
class Variable:
    key: str
    value: str
    # Later Djinn schemas: value is then base64(nonce || AES-GCM ciphertext)
    # and the plaintext must never be stored in any output.
    masked: bool = False


@dataclass(frozen=True)
class PullRequest:
    """The commit a pull-request build tests, and where its status goes."""

    provider: str  # github | gitlab
    token: bytes | None  # the OAuth access token, sealed with the crypto key
    repo: str  # owner/repo, GitHub's path of the repository
    repo_id: int  # the code host's id of it, GitLab's project id
    sha: str


@dataclass
class Build:
    id: int
    user_id: int
    namespace_id: int | None
    number: int
    secret: str | None
    driver_type: str
    driver: dict
    stages: list[Stage] = field(default_factory=list)
    variables: list[Variable] = field(default_factory=list)
    keys: list[Key] = field(default_factory=list)
    objects: list[Object] = field(default_factory=list)
    username: str = ""  # the owner's, for links to the build
    pull: PullRequest | None = None


@dataclass(frozen=True)
class Trigger:
    """A build_triggers row: what started the build."""

    type: str  # manual | push | pull | schedule
    comment: str
    data: dict


@dataclass(frozen=True)
class FailureNotice:
    """Everything the failure mail says about one build that did not pass."""

    build_id: int
    number: int
    status: str  # failed | killed | timed_out
    host: str  # the server's base URL from the queue payload
    username: str
    email: str
    recipients: list[str]
    trigger: Trigger | None
    output: str
