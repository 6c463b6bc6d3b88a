"""Running one build: driver creation, inputs, stages and jobs, outputs, teardown.

The runner decides what happens and in which order, and what every job's and
the build's status is. It knows nothing of SQL or Redis: everything it learns
goes to a Reporter, and everything it needs arrives as plain objects, so the
same code runs under the supervisor and in tests.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import io
import logging
from contextlib import AbstractContextManager
from typing import Callable, Protocol

from djinn_worker.drivers.base import Driver, DriverError

from .cancel import Cancel
from .output import MIN_MASKED, Masker
from .model import (
    CREATE_JOB, FAILED, KILLED, PASSED, PASSED_WITH_FAILURES, Artifact, Build, Job, Object, Stage, StopBuild,
    done_line, worst,
)

log = logging.getLogger(__name__)

SCRIPT_HEADER = "#!/bin/sh\nexec 2>&1\nset -ex\n\n"
SSH_CONFIG_HEADER = "StrictHostKeyChecking no\nUserKnownHostsFile /dev/null\n"
# Lines of key material this long or longer are masked wherever they appear.
KEY_LINE_MASKED = 8


class DriverNotEnabled(DriverError):
    """The build asks for a driver this worker does not run."""


class Reporter(Protocol):
    """Where the runner's findings go (the database, under the supervisor)."""

    def output(self, job: Job | None, text: str) -> None: ...
    def job_started(self, job: Job) -> None: ...
    def job_finished(self, job: Job, status: str) -> None: ...
    def stage_started(self, stage: Stage) -> None: ...
    def stage_finished(self, stage: Stage, status: str) -> None: ...
    def object_placed(self, obj: Object) -> None: ...
    def artifact_collected(self, artifact: Artifact, size: int, md5: bytes, sha256: bytes) -> None: ...
    def build_finished(self, status: str) -> None: ...


class JobOutput:
    """A job's output stream: bytes from the driver become safe, masked text.

    Output may contain anything a program prints. Invalid UTF-8 becomes
    U+FFFD and NUL (which PostgreSQL TEXT refuses) becomes U+2400, so a
    build's log is always storable and still shows where the odd bytes were.
    Secrets are masked across reads: the masker holds back only what could
    still be the start of one, until the next read or close().
    """

    def __init__(self, reporter: Reporter, job: Job | None, secrets: list[str] = ()):
        self.reporter, self.job = reporter, job
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._masker = Masker(secrets)

    def write(self, data: bytes) -> None:
        self._emit(self._masker.feed(self._decode(data)))

    def line(self, text: str) -> None:
        self._emit(self._masker.feed(self._decode(b"", final=True) + text + "\n"))

    def close(self) -> None:
        self._emit(self._masker.feed(self._decode(b"", final=True)) + self._masker.flush())

    def _decode(self, data: bytes, final: bool = False) -> str:
        return self._decoder.decode(data, final).replace("\0", "\u2400")

    def _emit(self, text: str) -> None:
        if text:
            self.reporter.output(self.job, text)


def script(commands: str) -> str:
    body = commands if commands.endswith("\n") or not commands else commands + "\n"
    return SCRIPT_HEADER + body


class Runner:
    def __init__(
        self,
        build: Build,
        make_driver: Callable[[], Driver],
        reporter: Reporter,
        cancel: Cancel,
        creating: Callable[[], AbstractContextManager],
        objects=None,
        artifacts=None,
        cipher=None,
    ):
        self.build = build
        self.make_driver = make_driver
        self.reporter = reporter
        self.cancel = cancel
        self.creating = creating
        self.objects = objects
        self.artifacts = artifacts
        self.cipher = cipher
        self.driver: Driver | None = None
        self.status = PASSED
        self._finished: set[int] = set()
        self.env: dict[str, str] = {}
        # Plaintexts masked in every output: masked variables and key lines.
        self.secrets: list[str] = []
        self._keys: dict[str, bytes | Exception] = {}
        self._sealed = ""  # why a masked variable cannot be used

    def _out(self, job: Job | None) -> JobOutput:
        return JobOutput(self.reporter, job, self.secrets)

    def run(self) -> str:
        """Run the build to its end and return its final status."""
        self._unseal()
        create_job = self._create_job()
        try:
            if self._create(create_job):
                self._stages(skip=create_job)
        finally:
            self._destroy()
        self._finish_unrun()
        done = self._out(None)
        done.write(done_line(self.status).encode())
        done.close()
        self.reporter.build_finished(self.status)
        return self.status

    def _unseal(self) -> None:
        """Decrypt masked variables and keys before anything is printed, so
        that their plaintexts are masked in all output, driver creation's too."""
        for var in self.build.variables:
            value = var.value
            if var.masked:
                try:
                    value = self._decrypt(var.value.encode()).decode()
                except Exception as exc:  # base64's, the cipher's or UTF-8's errors
                    self._sealed = self._sealed or f"cannot decrypt masked variable {var.key}: {_reason(exc)}"
                    continue
                self.secrets.append(value)
            self.env[var.key] = value
        for key in self.build.keys:
            try:
                material = self._keys[key.name] = self.cipher.decrypt(key.key)
            except Exception as exc:  # the cipher's errors, or no cipher at all
                self._keys[key.name] = exc
                continue
            self.secrets += [line for line in material.decode(errors="replace").splitlines()
                             if len(line) >= KEY_LINE_MASKED]
        short = Masker(self.secrets).short
        if short:
            log.info("build %s: %d masked value(s) shorter than %d characters are not masked",
                     self.build.id, short, MIN_MASKED)

    def _decrypt(self, value: bytes) -> bytes:
        if self.cipher is None:
            raise ValueError("crypto.block is not set in the worker config")
        return self.cipher.decrypt(base64.b64decode(value, validate=True))

    def _create_job(self) -> Job | None:
        if self.build.stages and self.build.stages[0].jobs:
            first = self.build.stages[0].jobs[0]
            if first.name == CREATE_JOB:
                return first
        return None

    def _create(self, job: Job | None) -> bool:
        """Create the driver and place inputs; the output is the create job's."""
        out = self._out(job)
        stage = self.build.stages[0] if job else None
        if job:
            self.reporter.stage_started(stage)
            self.reporter.job_started(job)
        status = PASSED
        try:
            if self._sealed:
                raise DriverError(self._sealed)
            self.driver = self.make_driver()
            self.cancel.on_cancel(self.driver.kill)
            with self.creating():
                self.driver.create(out)
            if self.cancel.reason:
                raise DriverError("driver creation was interrupted")
            self._place_keys(out)
            self._place_objects(out)
        except StopBuild:
            raise
        except DriverNotEnabled as exc:
            out.line(str(exc))
            status = KILLED
        except (DriverError, OSError) as exc:
            out.line(f"Failed to create driver: {exc}")
            status = FAILED
        except Exception as exc:
            log.exception("build %s: creating the driver crashed", self.build.id)
            out.line(f"Failed to create driver: internal error: {exc!r}")
            status = FAILED
        status = self.cancel.reason or status
        out.close()
        self.status = worst(self.status, status)
        if job:
            self._finish(job, status)
            if status != PASSED or len(stage.jobs) == 1:
                self.reporter.stage_finished(stage, status)
        return status == PASSED

    def _place_keys(self, out: JobOutput) -> None:
        if not self.build.keys:
            return
        if self.cipher is None:
            out.line("Cannot place keys: crypto.block is not set in the worker config")
            return
        self.driver.mkdir("/root/.ssh", 0o700)
        configs = [SSH_CONFIG_HEADER]
        for key in self.build.keys:
            out.line(f"Placing key {key.name} => {key.location}")
            try:
                material = self._keys[key.name]
                if isinstance(material, Exception):
                    raise material
                self.driver.put(key.location, io.BytesIO(material), 0o600)
            except Exception as exc:  # the cipher's and driver's errors alike
                out.line(f"Failed to place key {key.name}: {exc}")
                continue
            if key.config:
                configs.append(key.config if key.config.endswith("\n") else key.config + "\n")
        self.driver.put("/root/.ssh/config", io.BytesIO("".join(configs).encode()), 0o600)

    def _place_objects(self, out: JobOutput) -> None:
        for obj in self.build.objects:
            out.line(f"Placing object {obj.source} => {obj.name}")
            if obj.hash is None or self.objects is None:
                out.line(f"Failed to place object {obj.source}: the object no longer exists")
                continue
            try:
                with self.objects.open(self.build.user_id, obj.hash) as src:
                    self.driver.put(obj.name, src, 0o644)
            except FileNotFoundError:
                out.line(f"Failed to place object {obj.source}: not found in the object store")
                continue
            except Exception as exc:
                out.line(f"Failed to place object {obj.source}: {exc}")
                continue
            self.reporter.object_placed(obj)

    def _stages(self, skip: Job | None) -> None:
        for stage in self.build.stages:
            jobs = [j for j in stage.jobs if j is not skip]
            if not jobs:
                continue
            if skip is None or stage is not self.build.stages[0]:
                self.reporter.stage_started(stage)
            stage_status = PASSED
            for job in jobs:
                status = self._job(stage, job, self.env)
                stage_status = worst(stage_status, status)
                if self.status not in (PASSED, PASSED_WITH_FAILURES):
                    break
            self.reporter.stage_finished(stage, stage_status)
            if self.status not in (PASSED, PASSED_WITH_FAILURES):
                return

    def _job(self, stage: Stage, job: Job, env: dict[str, str]) -> str:
        out = self._out(job)
        self.reporter.job_started(job)
        try:
            code = self.driver.run(script(job.commands), env, out)
        except DriverError as exc:
            out.line(f"Failed to run job: {exc}")
            code = -1
        if self.cancel.reason:
            status = self.cancel.reason
        elif code == 0:
            status = PASSED
        else:
            status = PASSED_WITH_FAILURES if stage.can_fail else FAILED
        if not self.cancel.reason:
            self._collect(job, out)
        out.close()
        self.status = worst(self.status, status)
        self._finish(job, status)
        return status

    def _collect(self, job: Job, out: JobOutput) -> None:
        for artifact in job.artifacts:
            out.line(f"Collecting artifact {artifact.source} => {artifact.name}")
            if self.artifacts is None:
                out.line(f"Failed to collect artifact {artifact.source}: no artifact store")
                continue
            try:
                with self.driver.get(artifact.source) as src:
                    stored = self.artifacts.write(self.build.user_id, artifact.hash, src)
            except FileNotFoundError:
                out.line(f"Failed to collect artifact {artifact.source}: no such file")
                continue
            except Exception as exc:
                out.line(f"Failed to collect artifact {artifact.source}: {exc}")
                continue
            self.reporter.artifact_collected(artifact, stored.size, stored.md5, stored.sha256)

    def _finish(self, job: Job, status: str) -> None:
        self._finished.add(job.id)
        self.reporter.job_finished(job, status)

    def _finish_unrun(self) -> None:
        """Jobs that never ran end with the build's status, so none stays queued."""
        for stage in self.build.stages:
            unrun = [j for j in stage.jobs if j.id not in self._finished]
            for job in unrun:
                self._finish(job, self.status)
            if unrun and len(unrun) == len(stage.jobs):
                self.reporter.stage_finished(stage, self.status)

    def _destroy(self) -> None:
        if self.driver is None:
            return
        try:
            self.driver.destroy()
        except Exception as exc:
            log.exception("build %s: destroying the %s driver failed", self.build.id, self.driver.name)
            out = self._out(None)
            out.line(f"Failed to destroy driver: {exc}")
            out.close()


def _reason(exc: Exception) -> str:
    """Why a value did not decrypt, never showing the value itself."""
    if isinstance(exc, binascii.Error):
        return "the value is not base64"
    if isinstance(exc, UnicodeDecodeError):
        return "the plaintext is not UTF-8 text"
    return str(exc)
