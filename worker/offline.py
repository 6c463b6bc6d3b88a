"""The djinn command: run a build manifest on this machine, with no server.

People use it to debug a manifest before they push it, so it runs the build
exactly as the worker would: the same Runner, drivers and output path, the
same driver.toml. What the worker takes from PostgreSQL comes from the
manifest and the flags instead, and what it would store goes to the
terminal and to the -artifacts directory; nothing here imports the database,
Redis or mail code.

Exit status: 0 passed (with failures too), 1 failed, 2 a manifest, flag or
config error (nothing was run), 124 timed out, 128 + the signal's number
when stopped by SIGINT (130) or SIGTERM (143); the driver is destroyed
whatever happened.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import os
import shlex
import signal
import socket
import sys
from dataclasses import dataclass

from djinn_worker import drivers as driver_types
from djinn_worker.drivers.base import Driver, DriverError, NoTracker
from djinn_worker.stores.file import DirectoryStore, FileStore, StoreError

from . import __version__
from .cancel import BuildTimer, Cancel
from .config import IMAGES_PATH, ConfigError, DriverConfig, host_arch, load_drivers, parse_duration
from .manifest import Manifest, ManifestError, Source, load as load_manifest
from .model import CREATE_JOB, FAILED, KILLED, TIMED_OUT, Artifact, Build, Job, Object, Stage, Variable
from .runner import Runner
from .terminal import TerminalReporter

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_TIMED_OUT = 124  # as timeout(1) exits
SETUP_STAGE = "setup"


class UsageError(Exception):
    """A bad flag, phrased for the command line."""


@dataclass(frozen=True)
class Options:
    manifest: str
    driver: str
    driver_given: bool
    artifacts: str
    objects: str
    stage: str | None
    timeout: float
    env: list[tuple[str, str]]


def default_driver_config() -> str:
    """Where the original offline runner looks: the XDG config directory."""
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return os.path.join(base, "djinn", "driver.toml")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    # Single-dash long flags as the original spells them; double-dash works too.
    parser = argparse.ArgumentParser(prog="djinn", description="Run a Djinn CI build manifest locally.")
    parser.add_argument("-manifest", "--manifest", default=".djinn.yml",
                        help="the manifest to run (default: %(default)s)")
    parser.add_argument("-driver", "--driver", metavar="PATH",
                        help="driver configuration (default: $XDG_CONFIG_HOME/djinn/driver.toml, "
                             "else ~/.config/djinn/driver.toml)")
    parser.add_argument("-artifacts", "--artifacts", metavar="DIR", default=".",
                        help="where collected artifacts are written (default: %(default)s)")
    parser.add_argument("-objects", "--objects", metavar="DIR", default=".",
                        help="where the manifest's objects are read from (default: %(default)s)")
    parser.add_argument("-stage", "--stage", metavar="NAME",
                        help="run only this stage (after creating the driver and cloning the sources)")
    parser.add_argument("-timeout", "--timeout", default="30m",
                        help="longest the build may run, like 30m or 1h30m (default: %(default)s)")
    parser.add_argument("-env", "--env", metavar="KEY=VALUE", action="append", default=[],
                        help="set a variable for every job, over the manifest's env; repeatable")
    parser.add_argument("-version", "--version", action="store_true",
                        help="print the version and exit")
    return parser.parse_args(argv)


def options(args: argparse.Namespace) -> Options:
    """The flags checked, before anything is read or run."""
    try:
        timeout = parse_duration(args.timeout)
    except ValueError as exc:
        raise UsageError(f"-timeout: {exc}") from None
    if timeout <= 0:
        raise UsageError(f"-timeout: must be longer than zero, got {args.timeout!r}")
    env = []
    for item in args.env:
        key, equals, value = item.partition("=")
        if not equals or not key:
            raise UsageError(f"-env: {item!r} is not KEY=VALUE")
        env.append((key, value))
    return Options(
        manifest=args.manifest,
        driver=args.driver or default_driver_config(),
        driver_given=args.driver is not None,
        artifacts=args.artifacts,
        objects=args.objects,
        stage=args.stage,
        timeout=timeout,
        env=env,
    )


def clone_commands(source: Source) -> str:
    commands = [f"git clone {shlex.quote(source.url)} {shlex.quote(source.dir)}"]
    if source.ref:
        commands += [f"cd {shlex.quote(source.dir)}", f"git checkout -q {shlex.quote(source.ref)}"]
    return "\n".join(commands)


def to_build(found: Manifest, options: Options) -> Build:
    """The build the worker would load from the server's rows for this manifest.

    The setup stage holds the driver's creation and one clone job per source,
    as the server writes it; ids only need to be distinct. The build's id is
    this process's, which names its containers, VMs and directories.
    """
    ids = itertools.count(1)
    setup = Stage(next(ids), SETUP_STAGE, False, [Job(next(ids), CREATE_JOB, "")])
    setup.jobs += [Job(next(ids), f"clone.{n}", clone_commands(source))
                   for n, source in enumerate(found.sources, 1)]
    stages = [setup]
    for name in found.stages:
        if options.stage is not None and name != options.stage:
            continue
        stage = Stage(next(ids), name, name in found.allow_failures)
        for job in found.jobs:
            if job.stage == name:
                artifacts = [Artifact(next(ids), src, dest, dest) for src, dest in job.artifacts]
                stage.jobs.append(Job(next(ids), job.name, "\n".join(job.commands), artifacts))
        stages.append(stage)
    variables = dict(found.env)
    variables.update(options.env)
    return Build(
        id=os.getpid(), user_id=0, namespace_id=None, number=1, secret=None,
        driver_type=found.driver["type"], driver=found.driver, stages=stages,
        variables=[Variable(key, value) for key, value in variables.items()],
        objects=[Object(next(ids), name, dest, name) for name, dest in found.objects],
    )


def qemu_image(disks: str, name: object) -> str | None:
    """An image name's path below qemu.disks: where the worker keeps base
    images (_base/<arch>/<name>), or where the original offline runner
    looked (<arch>/<name>). The driver reports a name that is not found."""
    if not isinstance(name, str) or not name:
        return None
    store = FileStore("qemu disks", disks)
    for parts in (("_base", host_arch(), name), (host_arch(), name)):
        try:
            path = store.resolve(*parts)
        except StoreError:
            return None  # the driver refuses the name itself, with its reason
        if os.path.exists(path):
            return path
    return None


def make_driver(build: Build, config: DriverConfig) -> Driver:
    """The manifest's driver, made before anything runs so that its
    complaints about the manifest are manifest errors."""
    extra = {}
    if build.driver_type == "qemu":
        extra["image_path"] = qemu_image(config.qemu.disks, build.driver.get("image"))
    return driver_types.make(build.driver_type, build.id, build.driver,
                             getattr(config, build.driver_type, None), NoTracker(), **extra)


def stores(build: Build, options: Options) -> dict:
    """The runner's object and artifact stores, when the build uses them."""
    parts: dict = {}
    if build.objects:
        parts["objects"] = DirectoryStore("objects", options.objects)
    if any(job.artifacts for stage in build.stages for job in stage.jobs):
        artifacts = DirectoryStore("artifacts", options.artifacts)
        try:
            artifacts.prepare()
        except StoreError as exc:
            raise UsageError(f"-artifacts: {exc}") from None
        parts["artifacts"] = artifacts
    return parts


def prepare(options: Options) -> tuple[Build, Driver, dict]:
    """Everything that can go wrong before the build starts; raises
    ManifestError, ConfigError or UsageError."""
    found = load_manifest(options.manifest)
    if options.stage is not None and options.stage not in found.stages:
        raise UsageError(f"-stage: {found.path} has no stage {options.stage!r}; "
                         f"its stages are {', '.join(found.stages)}")
    for warning in found.warnings:
        print(f"djinn: warning: {warning}", file=sys.stderr)
    # The same driver.toml as the worker's, so the same qemu.disks default.
    # The identity labels containers and volumes: unlike a worker's
    # (<host>:<queue>), no worker starting here takes them for its leftovers.
    # A missing driver.toml at the default place means every default.
    config = load_drivers(options.driver, f"{socket.gethostname()}:djinn-offline",
                          IMAGES_PATH, required=options.driver_given)
    build = to_build(found, options)
    parts = stores(build, options)
    try:
        driver = make_driver(build, config)
    except DriverError as exc:
        raise ManifestError(found.path, found.driver_line, "driver", str(exc)) from None
    return build, driver, parts


def run(build: Build, driver: Driver, parts: dict, timeout: float) -> int:
    """Run the build to its end and return the exit status.

    SIGINT and SIGTERM stop it as a kill does: the running job is killed
    and the driver destroyed before the command exits. So does the reader
    of standard output going away (`djinn | head`), and the command then
    exits as a writer killed by SIGPIPE would, with 128 + SIGPIPE.
    """
    cancel = Cancel()
    stopped_by: list[int] = []

    def stop(signum: int, _frame) -> None:
        stopped_by.append(signum)
        cancel.cancel(KILLED)

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    timer = BuildTimer(timeout, cancel)
    try:
        reporter = TerminalReporter(build, sys.stdout.buffer, colour=_colour(sys.stdout),
                                    on_closed=lambda: cancel.cancel(KILLED))
        status = Runner(build, lambda: driver, reporter, cancel, timer.creating, **parts).run()
    finally:
        timer.stop()
    if reporter.closed:
        # What is still buffered would fail again when Python flushes at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE
    if stopped_by and status == KILLED:
        return 128 + stopped_by[0]
    return {TIMED_OUT: EXIT_TIMED_OUT, FAILED: EXIT_FAILED}.get(status, 0)


def _colour(stream) -> bool:
    """Colour for people at a terminal, unless they asked for none (NO_COLOR)."""
    return stream.isatty() and not os.environ.get("NO_COLOR")


def main(argv: list[str] | None = None) -> int:
    # Until the build's own handler is in place, Ctrl-C just ends the command.
    signal.signal(signal.SIGINT, lambda *_: sys.exit(128 + signal.SIGINT))
    logging.basicConfig(level=logging.WARNING, format="djinn: %(message)s")
    args = parse_args(argv)
    if args.version:
        print(f"djinn {__version__}")
        return 0
    try:
        checked = options(args)
        build, driver, parts = prepare(checked)
    except (UsageError, ManifestError, ConfigError) as exc:
        print(f"djinn: {exc}", file=sys.stderr)
        return EXIT_USAGE
    return run(build, driver, parts, checked.timeout)


if __name__ == "__main__":
    sys.exit(main())
