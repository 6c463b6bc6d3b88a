"""The drivers, made one way: a table from driver type to the class that runs it.

Every driver is constructed as Class(build_id, manifest, config, tracker,
**extra): the build's id, its build_drivers.config, the driver's own section
of driver.toml (None for the os driver) and the Tracker told what to clean up
if the build process dies. A constructor validates the manifest and raises
DriverError with one line. Only the module of the driver a build uses is
imported, so a build process pays for no other driver's libraries.
"""

from __future__ import annotations

import importlib

from .base import Driver, Tracker

DRIVERS = {
    "os": ("local", "OSDriver"),
    "docker": ("docker", "DockerDriver"),
    "ssh": ("ssh", "SSHDriver"),
    "qemu": ("qemu", "QemuDriver"),
}


def load(kind: str) -> type[Driver]:
    """The class of a driver type, importing its module (and its libraries)."""
    module, name = DRIVERS[kind]
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)


def make(kind: str, build_id: int, manifest: dict, config, tracker: Tracker, **extra) -> Driver:
    """A driver of the given type; KeyError for a type no driver implements."""
    return load(kind)(build_id, manifest, config, tracker, **extra)
