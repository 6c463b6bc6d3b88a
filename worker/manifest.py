"""Reading a build manifest (.djinn.yml) as the Djinn server reads it.

The offline runner is how people debug a manifest before they push it, so a
mistake must be found where it is: every error names the file, the line and
the key, like `.djinn.yml:7: jobs[1].commands[0]: must be a string, not a
mapping`. The YAML is composed into nodes first (they carry line numbers)
and each value is then built by PyYAML's safe constructor, which is what
safe_load does in one step.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass, field
from typing import Any

import yaml

from .config import DRIVER_TYPES

ARROW = "=>"
TOP_KEYS = {"namespace", "driver", "env", "objects", "sources", "stages", "allow_failures", "jobs"}
JOB_KEYS = {"stage", "name", "commands", "artifacts"}
_NULL = "tag:yaml.org,2002:null"


class ManifestError(Exception):
    """A mistake in the manifest, phrased for the person who wrote it."""

    def __init__(self, path: str, line: int, key: str, problem: str):
        self.path, self.line, self.key, self.problem = path, line, key, problem
        # Line 0: the file as a whole (missing, unreadable).
        where = f"{path}:{line}" if line else path
        super().__init__(f"{where}: {key}: {problem}" if key else f"{where}: {problem}")


@dataclass(frozen=True)
class Source:
    """A repository cloned into the build environment before the first stage."""

    url: str
    ref: str | None
    dir: str


@dataclass(frozen=True)
class ManifestJob:
    stage: str
    name: str
    commands: list[str]
    # (path in the build environment, name it is stored under)
    artifacts: list[tuple[str, str]] = field(default_factory=list)


@dataclass(frozen=True)
class Manifest:
    path: str
    driver: dict[str, Any]
    # Where `driver` is, for errors the driver finds in its own settings.
    driver_line: int
    stages: list[str]
    jobs: list[ManifestJob]
    allow_failures: list[str] = field(default_factory=list)
    env: list[tuple[str, str]] = field(default_factory=list)
    # (object name, destination in the build environment)
    objects: list[tuple[str, str]] = field(default_factory=list)
    sources: list[Source] = field(default_factory=list)
    # What the server would silently ignore: said, but not fatal.
    warnings: list[str] = field(default_factory=list)


def load(path: str) -> Manifest:
    """Read and check the manifest at path; ManifestError names what is wrong."""
    try:
        with open(path, "rb") as fh:
            text = fh.read()
    except FileNotFoundError:
        raise ManifestError(path, 0, "", "manifest not found (set its path with -manifest)") from None
    except OSError as exc:
        raise ManifestError(path, 0, "", f"cannot read the manifest: {exc.strerror}") from None
    return parse(text, path)


def parse(text: bytes | str, path: str) -> Manifest:
    loader = yaml.SafeLoader(text)
    try:
        try:
            root = loader.get_single_node()
        except yaml.MarkedYAMLError as exc:
            mark = exc.problem_mark or exc.context_mark
            raise ManifestError(path, mark.line + 1 if mark else 0, "",
                                f"not valid YAML: {exc.problem or exc.context}") from None
        except yaml.YAMLError as exc:
            raise ManifestError(path, 0, "", f"not valid YAML: {exc}") from None
        if root is None:
            raise ManifestError(path, 1, "", "the manifest is empty")
        return _Reader(path, loader).manifest(root)
    finally:
        loader.dispose()


class _Reader:
    """Walks the composed nodes, building values and naming where each came from."""

    def __init__(self, path: str, loader: yaml.SafeLoader):
        self.path, self.loader = path, loader

    def error(self, node: yaml.Node, key: str, problem: str) -> ManifestError:
        return ManifestError(self.path, node.start_mark.line + 1, key, problem)

    def value(self, node: yaml.Node) -> Any:
        try:
            return self.loader.construct_object(node, deep=True)
        except yaml.constructor.ConstructorError as exc:
            raise self.error(node, "", f"not valid YAML: {exc.problem}") from None

    def mapping(self, node: yaml.Node, key: str, known: set[str]) -> dict[str, yaml.Node]:
        if not isinstance(node, yaml.MappingNode):
            raise self.error(node, key, f"must be a mapping, not {self.kind(node)}")
        found: dict[str, yaml.Node] = {}
        for key_node, value_node in node.value:
            name = self.value(key_node)
            if not isinstance(name, str):
                raise self.error(key_node, key, f"keys must be strings, not {name!r}")
            where = f"{key}.{name}" if key else name
            if name not in known:
                raise self.error(key_node, where, "unknown key")
            if name in found:
                raise self.error(key_node, where, "given more than once")
            found[name] = value_node
        return found

    def required(self, parent: yaml.Node, found: dict[str, yaml.Node], key: str, where: str) -> yaml.Node:
        if key not in found:
            raise self.error(parent, where, "is required")
        return found[key]

    def string(self, node: yaml.Node, key: str) -> str:
        """A scalar as it is written: `- true` is the shell's true, as the
        server (Go, decoding into strings) reads it, not YAML's boolean."""
        if not isinstance(node, yaml.ScalarNode) or node.tag == _NULL:
            raise self.error(node, key, f"must be a string, not {self.kind(node)}")
        return node.value

    def strings(self, node: yaml.Node, key: str) -> list[tuple[str, str, yaml.Node]]:
        """A list of strings: each item's text, its key and its node."""
        if not isinstance(node, yaml.SequenceNode):
            raise self.error(node, key, f"must be a list of strings, not {self.kind(node)}")
        items = []
        for i, item in enumerate(node.value):
            where = f"{key}[{i}]"
            items.append((self.string(item, where), where, item))
        return items

    def kind(self, node: yaml.Node) -> str:
        if isinstance(node, yaml.MappingNode):
            return "a mapping"
        if isinstance(node, yaml.SequenceNode):
            return "a list"
        return "empty" if node.tag == _NULL else repr(node.value)

    def manifest(self, root: yaml.Node) -> Manifest:
        top = self.mapping(root, "", TOP_KEYS)
        warnings: list[str] = []
        driver_node = self.required(root, top, "driver", "driver")
        driver = self.driver(driver_node)
        stages = self.stages(self.required(root, top, "stages", "stages"))
        allow_failures = []
        for name, where, node in self.optional(top, "allow_failures"):
            if name not in stages:
                warnings.append(str(self.error(node, where, f"no stage {name!r} in stages; ignored")))
            allow_failures.append(name)
        return Manifest(
            path=self.path,
            driver=driver,
            driver_line=driver_node.start_mark.line + 1,
            stages=stages,
            jobs=self.jobs(self.required(root, top, "jobs", "jobs"), stages, warnings),
            allow_failures=allow_failures,
            env=[self.variable(text, where, node) for text, where, node in self.optional(top, "env")],
            objects=[self.arrow(text, where, node, "object")
                     for text, where, node in self.optional(top, "objects")],
            sources=[self.source(text, where, node) for text, where, node in self.optional(top, "sources")],
            warnings=warnings,
        )

    def optional(self, found: dict[str, yaml.Node], key: str,
                 parent: str = "") -> list[tuple[str, str, yaml.Node]]:
        """The strings listed under key, if it is there at all."""
        where = f"{parent}.{key}" if parent else key
        return self.strings(found[key], where) if key in found else []

    def driver(self, node: yaml.Node) -> dict[str, Any]:
        if not isinstance(node, yaml.MappingNode):
            raise self.error(node, "driver", f"must be a mapping, not {self.kind(node)}")
        settings = self.value(node)
        type_node = next((v for k, v in node.value if self.value(k) == "type"), None)
        if type_node is None:
            raise self.error(node, "driver.type", f"is required: one of {', '.join(DRIVER_TYPES)}")
        kind = self.string(type_node, "driver.type")
        if kind not in DRIVER_TYPES:
            raise self.error(type_node, "driver.type",
                             f"unknown driver {kind!r}: use one of {', '.join(DRIVER_TYPES)}")
        return settings

    def stages(self, node: yaml.Node) -> list[str]:
        stages: list[str] = []
        for name, where, item in self.strings(node, "stages"):
            if not name:
                raise self.error(item, where, "a stage needs a name")
            if name in stages:
                raise self.error(item, where, f"stage {name!r} is listed twice")
            stages.append(name)
        if not stages:
            raise self.error(node, "stages", "must list at least one stage")
        return stages

    def jobs(self, node: yaml.Node, stages: list[str], warnings: list[str]) -> list[ManifestJob]:
        if not isinstance(node, yaml.SequenceNode):
            raise self.error(node, "jobs", f"must be a list of jobs, not {self.kind(node)}")
        jobs: list[ManifestJob] = []
        counts = dict.fromkeys(stages, 0)
        for i, item in enumerate(node.value):
            key = f"jobs[{i}]"
            found = self.mapping(item, key, JOB_KEYS)
            stage_node = self.required(item, found, "stage", f"{key}.stage")
            stage = self.string(stage_node, f"{key}.stage")
            if stage not in counts:
                # The server drops such jobs; saying so saves a puzzled user.
                warnings.append(str(self.error(stage_node, f"{key}.stage",
                                               f"no stage {stage!r} in stages; the job is ignored")))
                continue
            counts[stage] += 1
            name = self.string(found["name"], f"{key}.name") if "name" in found else ""
            jobs.append(ManifestJob(
                stage=stage,
                name=name or f"{stage}.{counts[stage]}",
                commands=[text for text, _, _ in self.optional(found, "commands", key)],
                artifacts=[self.arrow(text, where, n, "artifact")
                           for text, where, n in self.optional(found, "artifacts", key)],
            ))
        return jobs

    def variable(self, text: str, where: str, node: yaml.Node) -> tuple[str, str]:
        key, equals, value = text.partition("=")
        if not equals or not key or key != key.strip():
            raise self.error(node, where, f"{text!r} is not KEY=VALUE")
        return key, value

    def arrow(self, text: str, where: str, node: yaml.Node, what: str) -> tuple[str, str]:
        """`source` or `source => name`, the name defaulting to the source's file name."""
        source, arrow, name = (part.strip() for part in text.partition(ARROW))
        if not source:
            raise self.error(node, where, f"{text!r} names no {what}")
        if arrow and not name:
            raise self.error(node, where, f"{text!r} has nothing after {ARROW}")
        return source, name or posixpath.basename(source.rstrip("/"))

    def source(self, text: str, where: str, node: yaml.Node) -> Source:
        """`URL [ref] [=> directory]`, the directory defaulting to git's own choice."""
        left, arrow, directory = (part.strip() for part in text.partition(ARROW))
        parts = left.split()
        if not 1 <= len(parts) <= 2:
            raise self.error(node, where, f"{text!r} is not URL [ref] [=> directory]")
        if arrow and not directory:
            raise self.error(node, where, f"{text!r} has nothing after {ARROW}")
        url = parts[0]
        return Source(url, parts[1] if len(parts) == 2 else None, directory or _humanish(url))


def _humanish(url: str) -> str:
    """The directory `git clone URL` makes: the last part of the path, without .git."""
    tail = url.rstrip("/")
    if tail.endswith("/.git"):
        tail = tail[: -len("/.git")]
    tail = tail.rsplit("/", 1)[-1].rsplit(":", 1)[-1]
    return tail[: -len(".git")] if tail.endswith(".git") and tail != ".git" else tail
