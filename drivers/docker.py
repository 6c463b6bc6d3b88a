"""The `docker` driver: every job in a new container, state kept in one volume.

A build gets one volume, mounted at the manifest's `workspace` in every
container, so what a job leaves there is what the next job finds; anything
else a job changes dies with its container. Files placed in the workspace
are copied into the volume through a helper container that is created but
never started (the engine can copy into a stopped container's volumes).
Files placed elsewhere, such as the keys in /root/.ssh, would be lost with the
helper's own filesystem, so each is kept as a one-file tar and copied into
every job's container before it starts.

Every container and the volume carry the build id and the worker's identity
as labels. Teardown removes by label, so it also catches what a failed call
left, and a supervisor whose build process was SIGKILLed, or a worker that
restarts after a crash, finds and removes the leftovers the same way.
"""

from __future__ import annotations

import io
import logging
import posixpath
import queue
import secrets
import shutil
import tarfile
import tempfile
import threading
import time
from contextlib import contextmanager
from typing import IO, BinaryIO, Iterator

import docker
from docker.errors import DockerException, NotFound
from docker.types import Mount
from requests import RequestException

from djinn_worker.config import DockerConfig

from .base import Driver, DriverError, Output, Tracker

log = logging.getLogger(__name__)

LABEL_BUILD = "ci.djinn.build"
LABEL_WORKER = "ci.djinn.worker"
SCRIPT = "/.djinn-job.sh"
# Engine calls other than the job's own output stream; pulls and jobs are not
# bounded by it (they stream) and stop through kill().
API_TIMEOUT = 60
# kill() may run inside a signal handler: it must not hang there for long.
KILL_TIMEOUT = 10
_CHUNK = 64 * 1024
_ENGINE_ERRORS = (DockerException, RequestException)


def remove_leftovers(config: DockerConfig, build_id: int | None = None) -> None:
    """Remove the containers and volumes of one build, or all of this worker's.

    Called by the supervisor, which must not go down over it: every engine
    error is logged here and nothing is raised.
    """
    what = f"build {build_id}" if build_id is not None else f"worker {config.identity}"
    try:
        client = _connect(config)
        try:
            removed = _remove_labelled(client, _labels(config.identity, build_id))
        finally:
            client.close()
    except _ENGINE_ERRORS as exc:
        log.error("docker: could not remove the containers and volumes of %s: %s", what, exc)
        return
    if removed:
        log.info("docker: removed leftovers of %s: %s", what, ", ".join(removed))


class DockerDriver(Driver):
    name = "docker"

    def __init__(self, build_id: int, manifest: dict, config: DockerConfig,
                 tracker: Tracker | None = None):
        # Containers and volumes are found by label if the build process
        # dies, so nothing needs to be told to the tracker.
        image, workspace = manifest.get("image"), manifest.get("workspace")
        if not isinstance(image, str) or not image:
            raise DriverError('docker driver: the manifest must set "image" to an image name')
        if not isinstance(workspace, str) or not workspace.startswith("/") or not workspace.strip("/"):
            raise DriverError('docker driver: the manifest must set "workspace" to an absolute '
                              f"path other than /, got {workspace!r}")
        self.image, self.workspace = image, posixpath.normpath(workspace)
        self.config = config
        self.labels = _labels(config.identity, build_id)
        self.volume = f"djinn-build-{build_id}-{secrets.token_hex(4)}"
        self.client: docker.DockerClient | None = None
        self._killer: docker.APIClient | None = None
        self._image_id = ""
        self._helper = None
        self._job = None
        self._overlay: list[IO[bytes]] = []
        self._running: str | None = None
        self._killed = False

    def create(self, out: Output) -> None:
        out.write(b"Running with Docker driver...\n")
        try:
            client = _connect(self.config)
            # kill() runs in signal handlers and other threads: a client of its
            # own never waits on a connection pool the interrupted code holds.
            self._killer = docker.APIClient(self.config.host, client.api.api_version, KILL_TIMEOUT)
            self.client = client
        except _ENGINE_ERRORS as exc:
            raise DriverError(f"cannot reach the Docker engine at {self.config.host}: {exc}") from None
        with _engine("creating the build's volume"):
            out.write(f"Creating volume {self.volume}\n".encode())
            self.client.volumes.create(self.volume, labels=self.labels)
        self._image_id = self._ensure_image(out)
        out.write(f"Using Driver image {self.image} - {self._image_id}\n".encode())
        with _engine("creating the workspace container"):
            self._helper = self._container(["true"], {})

    def _ensure_image(self, out: Output) -> str:
        with _engine(f"looking up image {self.image}"):
            try:
                return self.client.images.get(self.image).id
            except docker.errors.ImageNotFound:
                pass
        out.write(f"Pulling image {self.image}\n".encode())
        self._pull(out)
        with _engine(f"looking up image {self.image}"):
            return self.client.images.get(self.image).id

    def _pull(self, out: Output) -> None:
        """Pull the image, writing a line per layer state change.

        The engine streams from a thread so that kill() (the create limit,
        the build timeout, a kill request) ends a pull that has stalled.
        Byte-count updates are left out: they would be most of the log.
        """
        events: queue.Queue = queue.Queue()

        def pull() -> None:
            try:
                for event in self.client.api.pull(self.image, stream=True, decode=True):
                    events.put(event)
            except Exception as exc:  # handed to the waiting thread as is
                events.put(exc)
            events.put(None)

        threading.Thread(target=pull, name="docker-pull", daemon=True).start()
        while True:
            if self._killed:
                raise DriverError(f"pulling {self.image} was stopped")
            try:
                event = events.get(timeout=0.25)
            except queue.Empty:
                continue
            if event is None:
                return
            if isinstance(event, Exception):
                raise DriverError(f"cannot pull image {self.image}: {_reason(event)}")
            if "error" in event:
                raise DriverError(f"cannot pull image {self.image}: {event['error']}")
            if event.get("status") and not event.get("progressDetail"):
                prefix = f"{event['id']}: " if event.get("id") else ""
                out.write(f"{prefix}{event['status']}\n".encode())

    def _container(self, command: list[str], env: dict[str, str]):
        limits = {
            "nano_cpus": int(self.config.cpus * 1e9) if self.config.cpus else None,
            "mem_limit": self.config.memory * 1024 * 1024 if self.config.memory else None,
            "pids_limit": self.config.pids_limit,
        }
        return self.client.containers.create(
            self._image_id, entrypoint=command, command=[], environment=env,
            working_dir=self.workspace, labels=self.labels,
            mounts=[Mount(self.workspace, self.volume)],
            **{k: v for k, v in limits.items() if v is not None},
        )

    def _path(self, path: str) -> str:
        """Relative paths are in the workspace, as they are for the jobs."""
        return "/" + posixpath.normpath(posixpath.join(self.workspace, path)).lstrip("/")

    def _place(self, path: str, mode: int, data: BinaryIO | None, size: int = 0,
               kind: bytes = tarfile.REGTYPE) -> None:
        if self._helper is None:
            raise DriverError("the build's containers do not exist")
        full = self._path(path)
        archive = _archive(_member(full, mode, size, kind), data)
        if full == self.workspace or full.startswith(self.workspace + "/"):
            with archive, _engine(f"copying {path} into the workspace"):
                self._helper.put_archive("/", archive)
        else:
            self._overlay.append(archive)

    def put(self, dest: str, src: BinaryIO, mode: int) -> None:
        with tempfile.TemporaryFile() as data:
            shutil.copyfileobj(src, data, _CHUNK)
            size = data.tell()
            data.seek(0)
            self._place(dest, mode, data, size)

    def mkdir(self, path: str, mode: int) -> None:
        self._place(path, mode, None, kind=tarfile.DIRTYPE)

    def run(self, script: str, env: dict[str, str], out: Output) -> int:
        self._remove_job()
        if self._killed:
            raise DriverError("the build was stopped")
        with _engine("starting the job's container"):
            self._job = job = self._container(["/bin/sh", SCRIPT], env)
            for archive in self._overlay:
                archive.seek(0)
                job.put_archive("/", archive)
            body = script.encode()
            with _archive(_member(SCRIPT, 0o755, len(body)), io.BytesIO(body)) as archive:
                job.put_archive("/", archive)
            # Attached before the start, so not one byte of output is missed.
            stream = job.attach(stream=True, logs=True, stdout=True, stderr=True)
        try:
            with _engine("running the job's container"):
                self._running = job.id
                job.start()
                if self._killed:  # kill() may have come before the container ran
                    job.kill()
                for chunk in stream:
                    out.write(chunk)
                return job.wait()["StatusCode"]
        finally:
            self._running = None
            stream.close()

    @contextmanager
    def get(self, source: str) -> Iterator[BinaryIO]:
        """Stream one file out of the last job's (stopped) container.

        The engine sends a tar; it is read as a stream, so an artifact of any
        size passes through without being held in memory. A symlink is
        followed to the file it names, as reading it in the job would.
        """
        path = self._path(source)
        if self._job is None:
            raise FileNotFoundError(source)
        with _engine(f"copying {source} out of the container"):
            try:
                chunks, stat = self.client.api.get_archive(self._job.id, path, _CHUNK)
                if stat and stat.get("linkTarget"):
                    chunks.close()
                    chunks, _ = self.client.api.get_archive(self._job.id, stat["linkTarget"], _CHUNK)
            except NotFound:
                raise FileNotFoundError(source) from None
        try:
            with tarfile.open(fileobj=_ChunkReader(chunks), mode="r|") as tar:
                member = tar.next()
                if member is None or not member.isfile():
                    raise DriverError(f"{source} is not a regular file")
                yield tar.extractfile(member)
        finally:
            chunks.close()

    def kill(self) -> None:
        self._killed = True
        running = self._running
        if running and self._killer:
            try:
                self._killer.kill(running)
            except _ENGINE_ERRORS:
                pass  # it stopped by itself in the meantime; run() returns either way

    def _remove_job(self) -> None:
        """The last job's container is kept until now for its artifacts."""
        if self._job is not None:
            with _engine("removing the last job's container"):
                self._job.remove(force=True)
            self._job = None

    def destroy(self) -> None:
        for archive in self._overlay:
            archive.close()
        self._overlay.clear()
        if self.client is None:
            return
        try:
            with _engine("removing the build's containers and volume"):
                _remove_labelled(self.client, self.labels)
        finally:
            self.client.close()
            self._killer.close()
            self.client = self._helper = self._job = None


class _ChunkReader(io.RawIOBase):
    """The chunks an engine stream yields, as the file object tarfile reads."""

    def __init__(self, chunks: Iterator[bytes]):
        self._chunks, self._buffer = chunks, memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while not self._buffer:
            chunk = next(self._chunks, b"")
            if not chunk:
                return 0
            self._buffer = memoryview(chunk)
        size = min(len(buffer), len(self._buffer))
        buffer[:size] = self._buffer[:size]
        self._buffer = self._buffer[size:]
        return size


def _connect(config: DockerConfig) -> docker.DockerClient:
    return docker.DockerClient(base_url=config.host, version=config.version, timeout=API_TIMEOUT)


def _labels(identity: str, build_id: int | None) -> dict[str, str]:
    labels = {LABEL_WORKER: identity}
    if build_id is not None:
        labels[LABEL_BUILD] = str(build_id)
    return labels


def _remove_labelled(client: docker.DockerClient, labels: dict[str, str]) -> list[str]:
    """Remove (killing first) every container, then every volume, with all labels."""
    filters = {"label": [f"{key}={value}" for key, value in labels.items()]}
    removed = []
    for container in client.containers.list(all=True, filters=filters):
        container.remove(force=True)
        removed.append(f"container {container.short_id}")
    for volume in client.volumes.list(filters=filters):
        volume.remove(force=True)
        removed.append(f"volume {volume.name}")
    return removed


def _member(path: str, mode: int, size: int, kind: bytes = tarfile.REGTYPE) -> tarfile.TarInfo:
    """A root-owned tar member for an absolute path; archives are unpacked at /."""
    info = tarfile.TarInfo(path.lstrip("/"))
    info.mode, info.size, info.type, info.mtime = mode, size, kind, int(time.time())
    return info


def _archive(info: tarfile.TarInfo, data: BinaryIO | None) -> IO[bytes]:
    """A one-member tar in a temporary file, ready to send with put_archive."""
    archive = tempfile.TemporaryFile()
    with tarfile.open(fileobj=archive, mode="w") as tar:
        tar.addfile(info, data)
    archive.seek(0)
    return archive


def _reason(exc: Exception) -> str:
    return getattr(exc, "explanation", None) or str(exc)


@contextmanager
def _engine(action: str) -> Iterator[None]:
    """Engine and connection errors become DriverErrors naming what was being done."""
    try:
        yield
    except _ENGINE_ERRORS as exc:
        raise DriverError(f"{action}: {_reason(exc)}") from None
