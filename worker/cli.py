"""The djinn-worker command: flags, logging, start-up checks, exit codes.

Exit status 2 means the configuration is wrong (nothing was touched), 1 that
a service could not be reached at start-up, 3 that another worker holds the
pidfile or the lease of this worker's identity, 0 a clean stop.
"""

from __future__ import annotations

import argparse
import functools
import logging
import sys

import psycopg2
import redis

from . import __version__, logs, metrics
from .config import ConfigError, DriverConfig, WorkerConfig, load_drivers, load_worker
from .daemon import AlreadyRunning, Daemon, PidFile
from .db import one_line
from .queue import LeaseHeld

EXIT_CONFIG = 2
EXIT_UNAVAILABLE = 1
EXIT_RUNNING = 3


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    # Single-dash long flags, as the original Go worker spells them; the
    # double-dash spelling works too.
    parser = argparse.ArgumentParser(
        prog="djinn-worker", description="Run Djinn CI builds popped from Redis.",
    )
    parser.add_argument("-config", "--config", default="djinn-worker.toml",
                        help="worker configuration file (default: %(default)s)")
    parser.add_argument("-driver", "--driver", default="djinn-driver.toml",
                        help="driver configuration file (default: %(default)s)")
    parser.add_argument("-daemon", "--daemon", action="store_true",
                        help="detach and run in the background (log.file must be a file)")
    parser.add_argument("-pidfile", "--pidfile", metavar="PATH",
                        help="write the pid to PATH and hold it locked while running")
    parser.add_argument("-version", "--version", action="store_true",
                        help="print the version and exit")
    return parser.parse_args(argv)


def load(args: argparse.Namespace) -> tuple[WorkerConfig, DriverConfig]:
    """Everything that can be checked without connecting to anything."""
    from djinn_worker.stores.file import FileStore, StoreError

    config = load_worker(args.config)
    if args.daemon and config.log.file == "/dev/stdout":
        raise ConfigError(config.path, "log.file",
                          "-daemon closes standard output: set log.file to a file")
    drivers = load_drivers(args.driver, config.identity, config.images.path)
    for name in ("images", "artifacts", "objects"):
        store = getattr(config, name)
        try:
            FileStore(name, store.path).prepare()
        except StoreError as exc:
            raise ConfigError(config.path, f"{name}.path", str(exc)) from None
    return config, drivers


def serve(config: WorkerConfig, drivers: DriverConfig, handler: logging.Handler,
          daemon: Daemon | None) -> int:
    """Run the supervisor; a start-up failure is logged and, for a daemon, told to its starter."""
    from .supervisor import Supervisor

    hangup = functools.partial(logs.reopen, handler) if isinstance(handler, logging.FileHandler) else None
    try:
        return Supervisor(config, drivers, on_hangup=hangup,
                          on_ready=daemon.ready if daemon else None).run()
    except psycopg2.OperationalError as exc:
        problem = f"cannot connect to the database at {config.database.addr}: {one_line(exc)}"
    except redis.RedisError as exc:
        problem = f"cannot connect to redis at {config.redis.addr}: {exc}"
    except metrics.Unavailable as exc:
        problem = str(exc)
    except LeaseHeld as exc:
        logging.error("%s", exc)
        if daemon:
            daemon.failed(str(exc))
        else:
            print(f"djinn-worker: {exc}", file=sys.stderr)
        return EXIT_RUNNING
    except Exception as exc:
        # A daemon's stderr is /dev/null: the log is the only place left.
        logging.exception("djinn-worker stopped on an unexpected error")
        if daemon:
            daemon.failed(f"stopped on an unexpected error: {exc!r}; the traceback is in the log")
        raise
    logging.error("%s", problem)
    if daemon:
        daemon.failed(problem)
    return EXIT_UNAVAILABLE


def lock_pidfile(path: str) -> PidFile:
    """Take the pidfile before detaching, so that a refusal reaches the terminal."""
    pidfile = PidFile(path)
    stale = pidfile.acquire()
    if stale:
        logging.info("replacing the stale pidfile %s of process %d, which is no longer running",
                     pidfile.path, stale)
    return pidfile


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.version:
        print(f"djinn-worker {__version__}")
        return 0
    try:
        config, drivers = load(args)
        handler = logs.setup(config.log)
    except ConfigError as exc:
        print(f"djinn-worker: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except OSError as exc:
        print(f"djinn-worker: {config.path}: log.file: cannot open {exc.filename}: {exc.strerror}",
              file=sys.stderr)
        return EXIT_CONFIG

    pidfile = None
    if args.pidfile:
        try:
            pidfile = lock_pidfile(args.pidfile)
        except AlreadyRunning as exc:
            print(f"djinn-worker: {exc}", file=sys.stderr)
            return EXIT_RUNNING
        except OSError as exc:
            print(f"djinn-worker: -pidfile {args.pidfile}: {exc.strerror}", file=sys.stderr)
            return EXIT_CONFIG
    try:
        daemon = None
        if args.daemon:
            daemon = Daemon(pidfile, preserve=[handler.stream])
            status = daemon.detach()
            if status is not None:
                return status
        elif pidfile:
            pidfile.write()
        return serve(config, drivers, handler, daemon)
    finally:
        if pidfile:
            pidfile.release()


if __name__ == "__main__":
    sys.exit(main())
