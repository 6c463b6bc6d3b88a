"""The djinn-worker command: flags, logging, start-up checks, exit codes.

Exit status 2 means the configuration is wrong (nothing was touched), 1 that
a service could not be reached at start-up, 0 a clean stop.
"""

from __future__ import annotations

import argparse
import logging
import sys

import psycopg2
import redis

from . import __version__
from .config import ConfigError, DriverConfig, LogConfig, WorkerConfig, load_drivers, load_worker

EXIT_CONFIG = 2
EXIT_UNAVAILABLE = 1

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "error": logging.ERROR}
_FORMAT = "%(asctime)s %(levelname)s [%(process)d] %(message)s"


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
    parser.add_argument("-version", "--version", action="store_true",
                        help="print the version and exit")
    return parser.parse_args(argv)


def load(args: argparse.Namespace) -> tuple[WorkerConfig, DriverConfig]:
    """Everything that can be checked without connecting to anything."""
    from djinn_worker.stores.file import FileStore, StoreError

    config = load_worker(args.config)
    drivers = load_drivers(args.driver, config)
    for name in ("images", "artifacts", "objects"):
        store = getattr(config, name)
        try:
            FileStore(name, store.path).prepare()
        except StoreError as exc:
            raise ConfigError(config.path, f"{name}.path", str(exc)) from None
    return config, drivers


def setup_logging(config: LogConfig) -> logging.Handler:
    if config.file == "/dev/stdout":
        handler: logging.Handler = logging.StreamHandler(sys.stdout)
    else:
        handler = logging.FileHandler(config.file)
    handler.setFormatter(logging.Formatter(_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(_LEVELS[config.level])
    # redis-py reports its own feature probing at debug level; that is not
    # the worker's news.
    logging.getLogger("redis").setLevel(max(_LEVELS[config.level], logging.INFO))
    return handler


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.version:
        print(f"djinn-worker {__version__}")
        return 0
    try:
        config, drivers = load(args)
        setup_logging(config.log)
    except ConfigError as exc:
        print(f"djinn-worker: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except OSError as exc:
        print(f"djinn-worker: {config.path}: log.file: cannot open {exc.filename}: {exc.strerror}",
              file=sys.stderr)
        return EXIT_CONFIG

    from .supervisor import Supervisor

    try:
        return Supervisor(config, drivers).run()
    except psycopg2.OperationalError as exc:
        logging.error("cannot connect to the database at %s: %s", config.database.addr, str(exc).strip())
    except redis.RedisError as exc:
        logging.error("cannot connect to redis at %s: %s", config.redis.addr, exc)
    return EXIT_UNAVAILABLE


if __name__ == "__main__":
    sys.exit(main())
