"""The ``file`` store: artifacts, objects and images kept in a directory tree.

Keys come from the database and, for artifacts, from names users chose in
their manifests, so every key is checked to stay inside its user's directory
after symlinks are resolved: a key must never let one user read or overwrite
another user's files, or anything else on the worker's host.

Layout (shared with the Djinn server, which serves the same files):
``<root>/<user_id>/<key>`` for artifacts, objects and uploaded images, and
``<root>/_base/...`` for base images, reached through :meth:`FileStore.resolve`.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
from dataclasses import dataclass
from typing import BinaryIO, Iterator

CHUNK_SIZE = 64 * 1024


class StoreError(Exception):
    """A refused key or a failed store operation, naming the store and key."""


@dataclass(frozen=True)
class Stored:
    """What :meth:`FileStore.write` kept, for ``build_artifacts``.

    The digests are raw bytes of exactly the stored (possibly cut) content,
    so they match what a download of the artifact yields.
    """

    size: int
    md5: bytes
    sha256: bytes


class FileStore:
    """One store directory, e.g. the artifacts store at ``artifacts.path``."""

    def __init__(self, name: str, root: str, limit: int = 0) -> None:
        self.name = name
        self.root = os.path.abspath(root)
        if limit < 0:
            raise StoreError(f"{self._where()}: limit {limit} is negative; 0 means no limit")
        self.limit = limit

    def prepare(self) -> None:
        """Create the root and prove it is writable, so that a misconfigured
        path stops the worker at start-up instead of failing every build."""
        try:
            os.makedirs(self.root, exist_ok=True)
            probe = os.path.join(self.root, f".probe-{secrets.token_hex(8)}")
            os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
            os.unlink(probe)
        except OSError as exc:
            raise StoreError(f"{self._where()}: not writable: {exc}") from exc

    def path(self, user_id: int, key: str) -> str:
        """The absolute path of a user's key, refusing keys that leave the
        user's directory (``..``, absolute keys, symlinks pointing out)."""
        if isinstance(user_id, bool) or not isinstance(user_id, int) or user_id < 0:
            raise StoreError(
                f"{self._where()}: key {key!r}: user id {user_id!r} is not a non-negative integer"
            )
        self._check_text(key, key)
        base = os.path.join(os.path.realpath(self.root), str(user_id))
        return self._inside(base, os.path.join(self.root, str(user_id), key), key)

    def resolve(self, *parts: str) -> str:
        """A path under the root built from lookup parts such as
        ``("_base", "x86_64", "debian/stable")``.

        Parts come from the image lookup, not straight from users, but a
        manifest's image name still flows into them, so ``..`` is refused
        outright rather than merely normalised away.
        """
        shown = "/".join(str(part) for part in parts)
        if not parts:
            raise StoreError(f"{self._where()}: key '': no path parts given")
        for part in parts:
            self._check_text(part, shown)
            if ".." in part.split("/"):
                raise StoreError(f"{self._where()}: key {shown!r}: '..' is not allowed")
        return self._inside(os.path.realpath(self.root), os.path.join(self.root, *parts), shown)

    def open(self, user_id: int, key: str) -> BinaryIO:
        """Open a stored file for reading; a missing key raises
        FileNotFoundError so callers can report it as "not found"."""
        return open(self.path(user_id, key), "rb")

    def write(self, user_id: int, key: str, reader: BinaryIO) -> Stored:
        """Store what ``reader`` yields under the key, cut at ``limit`` bytes.

        Content is streamed, since artifacts can be far larger than memory,
        into a temporary file next to the target and renamed over it, so the
        server never serves a half-written artifact. Reading stops at the
        limit so a huge artifact is not pulled out of the build environment
        only to be thrown away. Errors from ``reader`` propagate unchanged;
        either way no temporary file is left behind.
        """
        target = self.path(user_id, key)
        directory = os.path.dirname(target)
        temp = os.path.join(directory, f".tmp-{secrets.token_hex(8)}")
        with self._failing(key, f"cannot create a temporary file in {directory}"):
            os.makedirs(directory, exist_ok=True)
            # 0o666 lets the umask set the mode, as for any file the worker
            # creates, so the server (maybe another user) can serve it.
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            with open(fd, "wb") as out:
                stored = self._copy(reader, out, key)
            with self._failing(key, f"cannot move the new file to {target}"):
                os.replace(temp, target)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temp)
            raise
        return stored

    def _copy(self, reader: BinaryIO, out: BinaryIO, key: str) -> Stored:
        md5 = hashlib.md5(usedforsecurity=False)
        sha256 = hashlib.sha256()
        size = 0
        while not self.limit or size < self.limit:
            want = min(CHUNK_SIZE, self.limit - size) if self.limit else CHUNK_SIZE
            chunk = reader.read(want)
            if not chunk:
                break
            with self._failing(key, "write failed"):
                out.write(chunk)
            md5.update(chunk)
            sha256.update(chunk)
            size += len(chunk)
        with self._failing(key, "write failed"):
            out.flush()
        return Stored(size=size, md5=md5.digest(), sha256=sha256.digest())

    @contextlib.contextmanager
    def _failing(self, key: str, action: str) -> Iterator[None]:
        """Turn the store's own disk errors (full, read-only, permissions)
        into StoreError, leaving errors from the reader as they are."""
        try:
            yield
        except OSError as exc:
            raise StoreError(f"{self._where()}: key {key!r}: {action}: {exc}") from exc

    def _check_text(self, text: str, shown: str) -> None:
        if not isinstance(text, str) or not text:
            raise StoreError(f"{self._where()}: key {shown!r}: must be a non-empty string")
        if "\0" in text:
            raise StoreError(f"{self._where()}: key {shown!r}: contains a NUL byte")
        if os.path.isabs(text):
            raise StoreError(f"{self._where()}: key {shown!r}: must be relative, not absolute")

    def _inside(self, base: str, candidate: str, shown: str) -> str:
        """Return ``candidate`` normalised, if it really lies below ``base``.

        The check is made on the normalised path that is returned, with every
        symlink resolved, so the file later opened is the one checked.
        """
        path = os.path.normpath(candidate)
        real = os.path.realpath(path)
        if real == base or os.path.commonpath([real, base]) != base:
            raise StoreError(f"{self._where()}: key {shown!r}: resolves outside {base}")
        return path

    def _where(self) -> str:
        return f"{self.name} store {self.root}"


class DirectoryStore(FileStore):
    """One plain directory of files under the names a manifest gives.

    The offline runner reads objects from, and writes artifacts to,
    directories the user names (-objects, -artifacts), where there are no
    users and no hashes: the key is the file's name, with the same checks
    that keep it inside the directory. The user id the runner passes is
    ignored.
    """

    def path(self, user_id: int, key: str) -> str:
        self._check_text(key, key)
        return self._inside(os.path.realpath(self.root), os.path.join(self.root, key), key)
