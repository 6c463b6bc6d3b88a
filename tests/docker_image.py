"""A tiny local image for the docker driver's tests, made without any registry.

CI machines (and this one) may have no route to Docker Hub, so the tests
cannot pull an image. Debian's static busybox is a whole userland in one
file: a tar holding it, a symlink per applet, and the directories a build
expects is fed to `docker import`. The tag carries a digest of the busybox
binary, so a second run reuses the image and a busybox upgrade makes a new
one.
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
REPOSITORY = "djinn-worker-test/busybox"
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


def _rootfs(out: io.BufferedIOBase) -> None:
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


def busybox_image(client: docker.DockerClient) -> str:
    """The test image's name, imported into the engine if it is not there yet."""
    if not BUSYBOX.exists():
        raise RuntimeError(f"{BUSYBOX} is missing: install busybox-static (.ci/setup test does)")
    tag = hashlib.sha256(BUSYBOX.read_bytes()).hexdigest()[:12]
    name = f"{REPOSITORY}:{tag}"
    try:
        client.images.get(name)
        return name
    except docker.errors.ImageNotFound:
        pass
    with tempfile.TemporaryFile() as tar:
        _rootfs(tar)
        tar.seek(0)
        client.api.import_image_from_data(
            tar, repository=REPOSITORY, tag=tag,
            changes=["ENV PATH=/usr/sbin:/usr/bin:/sbin:/bin", 'CMD ["/bin/sh"]'],
        )
    client.images.get(name)
    return name
