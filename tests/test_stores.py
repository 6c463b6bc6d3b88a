"""The file store against real files in a temporary directory."""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import pytest

from djinn_worker.stores import FileStore, Stored, StoreError


class CountingReader(io.RawIOBase):
    """A reader that records how many bytes were taken from it."""

    def __init__(self, data: bytes) -> None:
        self._data = io.BytesIO(data)
        self.taken = 0

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        chunk = self._data.read(size)
        self.taken += len(chunk)
        return chunk


class FailingReader(io.RawIOBase):
    """Yields ``good`` bytes in small pieces, then fails like a dropped stream."""

    def __init__(self, good: int) -> None:
        self._left = good

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        if self._left <= 0:
            raise ConnectionResetError("stream dropped")
        n = min(size, self._left, 10_000)
        self._left -= n
        return b"x" * n


def digests(data: bytes) -> Stored:
    return Stored(len(data), hashlib.md5(data).digest(), hashlib.sha256(data).digest())


@pytest.fixture
def store(tmp_path: Path) -> FileStore:
    store = FileStore("artifacts", str(tmp_path / "artifacts"))
    store.prepare()
    return store


def test_write_then_read_round_trip(store: FileStore) -> None:
    data = os.urandom(200_000)
    stored = store.write(5, "abc123", io.BytesIO(data))
    assert stored == digests(data)
    assert len(stored.md5) == 16 and len(stored.sha256) == 32
    assert store.path(5, "abc123") == os.path.join(store.root, "5", "abc123")
    with store.open(5, "abc123") as f:
        assert f.read() == data


def test_write_overwrites_existing(store: FileStore) -> None:
    store.write(1, "k", io.BytesIO(b"old contents"))
    store.write(1, "k", io.BytesIO(b"new"))
    with store.open(1, "k") as f:
        assert f.read() == b"new"


def test_empty_input_is_stored(store: FileStore) -> None:
    assert store.write(1, "empty", io.BytesIO(b"")) == digests(b"")
    assert os.path.getsize(store.path(1, "empty")) == 0


def test_limit_cuts_exactly_and_stops_reading(tmp_path: Path) -> None:
    store = FileStore("artifacts", str(tmp_path / "s"), limit=1_000_000)
    data = os.urandom(3_000_000)
    reader = CountingReader(data)
    stored = store.write(7, "big", reader)
    assert stored == digests(data[:1_000_000])
    assert os.path.getsize(store.path(7, "big")) == 1_000_000
    assert reader.taken == 1_000_000


def test_input_under_the_limit_is_whole(tmp_path: Path) -> None:
    store = FileStore("artifacts", str(tmp_path / "s"), limit=1_000_000)
    data = os.urandom(999_999)
    assert store.write(7, "small", io.BytesIO(data)) == digests(data)


def test_limit_zero_is_unlimited(tmp_path: Path) -> None:
    store = FileStore("artifacts", str(tmp_path / "s"), limit=0)
    data = os.urandom(3_000_000)
    reader = CountingReader(data)
    assert store.write(7, "big", reader) == digests(data)
    assert reader.taken == len(data)


def test_negative_limit_is_refused(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="negative"):
        FileStore("artifacts", str(tmp_path), limit=-1)


def test_short_reads_are_gathered(tmp_path: Path) -> None:
    """Pipes and sockets return less than asked; the limit still holds."""
    store = FileStore("artifacts", str(tmp_path / "s"), limit=25_000)
    stored = store.write(1, "k", FailingReader(good=30_000))
    assert stored == digests(b"x" * 25_000)


def test_failing_reader_leaves_nothing_behind(store: FileStore) -> None:
    store.write(3, "keep", io.BytesIO(b"previous artifact"))
    with pytest.raises(ConnectionResetError):
        store.write(3, "keep", FailingReader(good=150_000))
    assert os.listdir(os.path.join(store.root, "3")) == ["keep"]
    with store.open(3, "keep") as f:
        assert f.read() == b"previous artifact"


def test_keys_may_have_subdirectories(store: FileStore) -> None:
    store.write(2, "dir/sub/file", io.BytesIO(b"nested"))
    assert store.path(2, "dir/sub/file") == os.path.join(store.root, "2", "dir", "sub", "file")
    with store.open(2, "dir/sub/file") as f:
        assert f.read() == b"nested"


def test_missing_key_raises_file_not_found(store: FileStore) -> None:
    with pytest.raises(FileNotFoundError):
        store.open(9, "nothing-here")


@pytest.mark.parametrize(
    "key", ["../../etc/x", "/etc/passwd", "a/../../b", "", "x\0y", "..", ".", "a/.."]
)
def test_escaping_keys_are_refused(store: FileStore, key: str) -> None:
    for attempt in (
        lambda: store.path(4, key),
        lambda: store.open(4, key),
        lambda: store.write(4, key, io.BytesIO(b"data")),
    ):
        with pytest.raises(StoreError) as caught:
            attempt()
        message = str(caught.value)
        assert "artifacts store" in message and store.root in message
        assert repr(key) in message
    assert not os.path.exists(os.path.join(store.root, "b"))


def test_other_users_are_out_of_reach(store: FileStore) -> None:
    store.write(1, "mine", io.BytesIO(b"user one"))
    with pytest.raises(StoreError):
        store.open(2, "../1/mine")


@pytest.mark.parametrize("user_id", [-1, True, "5", 1.0, None])
def test_bad_user_ids_are_refused(store: FileStore, user_id: object) -> None:
    with pytest.raises(StoreError, match="user id"):
        store.path(user_id, "k")  # type: ignore[arg-type]


def test_symlinks_pointing_outside_are_refused(store: FileStore, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_bytes(b"host file")
    user_dir = Path(store.root) / "6"
    user_dir.mkdir()
    (user_dir / "dirlink").symlink_to(outside)
    (user_dir / "filelink").symlink_to(outside / "secret")
    for key in ("dirlink/secret", "filelink", "dirlink/new"):
        with pytest.raises(StoreError, match="resolves outside"):
            store.open(6, key)
        with pytest.raises(StoreError, match="resolves outside"):
            store.write(6, key, io.BytesIO(b"overwrite"))
    assert (outside / "secret").read_bytes() == b"host file"
    assert sorted(os.listdir(outside)) == ["secret"]


def test_symlinks_staying_inside_are_followed(store: FileStore) -> None:
    store.write(6, "real/file", io.BytesIO(b"data"))
    os.symlink("real", os.path.join(store.root, "6", "alias"))
    with store.open(6, "alias/file") as f:
        assert f.read() == b"data"


def test_prepare_creates_missing_directories(tmp_path: Path) -> None:
    root = tmp_path / "a" / "b" / "objects"
    FileStore("objects", str(root)).prepare()
    assert root.is_dir()
    assert os.listdir(root) == []


def test_prepare_fails_clearly_when_root_cannot_be_created(tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("not a directory")
    root = tmp_path / "afile" / "store"
    with pytest.raises(StoreError) as caught:
        FileStore("artifacts", str(root)).prepare()
    assert str(caught.value).startswith(f"artifacts store {root}: not writable: ")


def test_write_fails_clearly_when_user_dir_is_a_file(store: FileStore) -> None:
    Path(store.root, "8").write_bytes(b"")
    with pytest.raises(StoreError, match="cannot create a temporary file"):
        store.write(8, "k", io.BytesIO(b"data"))


def test_resolve_finds_nested_base_images(tmp_path: Path) -> None:
    images = FileStore("images", str(tmp_path / "images" / "qemu"))
    images.prepare()
    base = Path(images.root, "_base", "x86_64", "debian", "stable")
    base.parent.mkdir(parents=True)
    base.write_bytes(b"qcow2")
    assert images.resolve("_base", "x86_64", "debian/stable") == str(base)
    assert images.resolve("5", "abc") == os.path.join(images.root, "5", "abc")


@pytest.mark.parametrize(
    "parts",
    [
        ("_base", "x86_64", "../../../etc/passwd"),
        ("_base", "..", "x"),
        ("..",),
        ("_base", "/etc/passwd"),
        ("_base", "x86_64", "a\0b"),
        ("_base", ""),
        (),
    ],
)
def test_resolve_refuses_escapes(tmp_path: Path, parts: tuple[str, ...]) -> None:
    images = FileStore("images", str(tmp_path / "images"))
    with pytest.raises(StoreError, match=f"images store {images.root}"):
        images.resolve(*parts)


def test_resolve_refuses_symlinks_out_of_the_root(tmp_path: Path) -> None:
    images = FileStore("images", str(tmp_path / "images"))
    images.prepare()
    os.symlink(tmp_path, os.path.join(images.root, "_base"))
    with pytest.raises(StoreError, match="resolves outside"):
        images.resolve("_base", "x86_64", "debian")
