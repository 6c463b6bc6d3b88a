"""A tiny local image for the docker driver's tests, made without any registry.

CI machines (and this one) may have no route to Docker Hub, so the tests
cannot pull an image. Debian's static busybox is a whole userland in one
file: a tar holding it, a symlink per applet, and the directories a build
expects is fed to `docker import`. The tag carries a digest of the binaries
in the image, so a second run reuses the image and an upgrade makes a new
one.

Builds that clone sources need git, which busybox lacks: git_image() adds
the host's git and the shared libraries it links against.
"""

from __future__ import annotations

import hashlib
import io
import subprocess
import tarfile
import tempfile
import time
from pathlib import Path

import docker

BUSYBOX = Path("/bin/busybox")
GIT = Path("/usr/bin/git")
# Where git looks for its helpers; git-upload-pack serves a local clone.
GIT_EXEC = "usr/lib/git-core"
REPOSITORY = "djinn-worker-test/busybox"
GIT_REPOSITORY = "djinn-worker-test/busybox-git"
DIRECTORIES = {
    "bin": 0o755, "sbin": 0o755, "usr": 0o755, "usr/bin": 0o755, "usr/sbin": 0o755,
    "etc": 0o755, "root": 0o700, "tmp": 0o1777, "proc": 0o755, "sys": 0o755, "dev": 0o755,
}
FILES = {
    "etc/passwd": b"root:x:0:0:root:/root:/bin/sh\n",
    "etc/group": b"root:x:0:\n",
}


def _member(name: str, kind: bytes, mode: int, **extra) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.mtime = kind, mode, int(time.time())
    for key, value in extra.items():
        setattr(info, key, value)
    return info


def _rootfs(out: io.BufferedIOBase, files: dict[str, Path]) -> None:
    """Busybox and its applets, plus files: name in the image -> host file."""
    applets = subprocess.run([str(BUSYBOX), "--list-full"], check=True,
                             capture_output=True, text=True).stdout.split()
    with tarfile.open(fileobj=out, mode="w") as tar:
        for name, mode in DIRECTORIES.items():
            tar.addfile(_member(name, tarfile.DIRTYPE, mode))
        with BUSYBOX.open("rb") as fh:
            tar.addfile(_member("bin/busybox", tarfile.REGTYPE, 0o755, size=BUSYBOX.stat().st_size), fh)
        for applet in applets:
            if applet != "bin/busybox":
                tar.addfile(_member(applet, tarfile.SYMTYPE, 0o777, linkname="/bin/busybox"))
        for name, data in FILES.items():
            tar.addfile(_member(name, tarfile.REGTYPE, 0o644, size=len(data)), io.BytesIO(data))
        made = set(DIRECTORIES)
        for name, path in sorted(files.items()):
            parents = Path(name).parents
            for parent in reversed([str(p) for p in parents if str(p) != "."]):
                if parent not in made:
                    tar.addfile(_member(parent, tarfile.DIRTYPE, 0o755))
                    made.add(parent)
            with path.open("rb") as fh:
                tar.addfile(_member(name, tarfile.REGTYPE, 0o755, size=path.stat().st_size), fh)


def _image(client: docker.DockerClient, repository: str, files: dict[str, Path]) -> str:
    """An image of busybox and files, imported into the engine if it is not there yet."""
    if not BUSYBOX.exists():
        raise RuntimeError(f"{BUSYBOX} is missing: install busybox-static (.ci/setup test does)")
    digest = hashlib.sha256(BUSYBOX.read_bytes())
    for name, path in sorted(files.items()):
        digest.update(name.encode() + b"\0" + path.read_bytes())
    tag = digest.hexdigest()[:12]
    name = f"{repository}:{tag}"
    try:
        client.images.get(name)
        return name
    except docker.errors.ImageNotFound:
        pass
    with tempfile.TemporaryFile() as tar:
        _rootfs(tar, files)
        tar.seek(0)
        client.api.import_image_from_data(
            tar, repository=repository, tag=tag,
            changes=["ENV PATH=/usr/sbin:/usr/bin:/sbin:/bin", 'CMD ["/bin/sh"]'],
        )
    client.images.get(name)
    return name


def busybox_image(client: docker.DockerClient) -> str:
    """The test image's name."""
    return _image(client, REPOSITORY, {})


def git_image(client: docker.DockerClient) -> str:
    """The test image with the host's git in it, for builds that clone sources."""
    if not GIT.exists():
        raise RuntimeError(f"{GIT} is missing: install git (.ci/setup test does)")
    files = {str(GIT).lstrip("/"): GIT, f"{GIT_EXEC}/git-upload-pack": GIT}
    linked = subprocess.run(["ldd", str(GIT)], check=True, capture_output=True, text=True).stdout
    for line in linked.splitlines():
        # "libz.so.1 => /lib/x86_64-linux-gnu/libz.so.1 (0x...)" or "/lib64/ld-linux-x86-64.so.2 (0x...)"
        path = line.split("=>")[-1].split("(")[0].strip()
        if path.startswith("/"):
            files[path.lstrip("/")] = Path(path).resolve()
    return _image(client, GIT_REPOSITORY, files)
