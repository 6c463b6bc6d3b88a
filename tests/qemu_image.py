"""The VM images the qemu tests boot, built once and cached outside the repository.

tests/images/build-qemu-image.sh makes a small Debian with sshd, in both
image forms, with debootstrap (a few minutes, from Debian's mirror); a
complete cache is reused at once.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

IMAGES = Path(os.environ.get("DJINN_TEST_IMAGES", "/var/cache/djinn-worker-tests/qemu"))
BUILD_IMAGES = Path(__file__).parent / "images" / "build-qemu-image.sh"


def build_images() -> Path:
    """The cached images, built first if they are not complete; RuntimeError says why not."""
    result = subprocess.run([str(BUILD_IMAGES), str(IMAGES)], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{BUILD_IMAGES} failed:\n{result.stderr[-4000:]}")
    return IMAGES


def link_tree(src: Path, dest: Path) -> None:
    """Hard links where possible: the images are hundreds of megabytes, and
    the disks directory must hold them itself, not symlinks leading out."""
    if src.is_dir():
        dest.mkdir(parents=True)
        for child in src.iterdir():
            link_tree(child, dest / child.name)
        return
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dest)
    except OSError:
        shutil.copyfile(src, dest)
