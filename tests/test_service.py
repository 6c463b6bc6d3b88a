"""Running the worker as a service: daemon mode, the SysVinit script, `make install`.

The init script itself is run, with its paths pointed into the test's temp
dir through the defaults file it reads, against real PostgreSQL and Redis.
"""

from __future__ import annotations

import os
import pwd
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

from djinn import WORKER_BIN, Worker
from djinn_worker import __version__

REPO = Path(__file__).resolve().parent.parent
INIT_SCRIPT = REPO / "dist" / "sysvinit" / "djinn-worker"
# The machine is shared and small: starting a daemon can be slow.
SLOW = 120


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def wait_for(predicate: Callable[[], bool], what: str, timeout: float = SLOW) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"{what}: not after {timeout}s"
        time.sleep(0.05)


def wait_gone(pid: int, timeout: float = SLOW) -> None:
    wait_for(lambda: not alive(pid), f"process {pid} exits", timeout)


@dataclass
class Service:
    """The init script, configured through its defaults file to run a worker under tmp."""

    worker: Worker
    defaults: Path
    pidfile: Path

    def run(self, action: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["sh", str(INIT_SCRIPT), action], capture_output=True, text=True, timeout=SLOW,
            env={**os.environ, "DJINN_WORKER_DEFAULTS": str(self.defaults)},
        )

    def daemon(self, *extra: str) -> subprocess.CompletedProcess:
        """djinn-worker -daemon run by hand with this service's files."""
        self.pidfile.parent.mkdir(exist_ok=True)
        return subprocess.run(
            [WORKER_BIN, "-daemon", "-pidfile", str(self.pidfile), "-config",
             str(self.worker.config_path), "-driver", str(self.worker.driver_path), *extra],
            capture_output=True, text=True, timeout=SLOW,
        )

    @property
    def pid(self) -> int:
        return int(self.pidfile.read_text())

    @property
    def log(self) -> str:
        return self.worker.log


@pytest.fixture
def make_service(tmp_path, make_worker):
    """A Service for a worker with config (see make_worker); its daemon is stopped afterwards."""
    made: list[Service] = []

    def make(config: dict | None = None) -> Service:
        worker = make_worker(config, start=False)
        pidfile = tmp_path / f"run-{len(made)}" / "djinn-worker.pid"
        defaults = tmp_path / f"default-djinn-worker-{len(made)}"
        settings = {
            "DAEMON": WORKER_BIN, "CONFIG": worker.config_path, "DRIVER": worker.driver_path,
            "PIDFILE": pidfile, "USER": pwd.getpwuid(os.getuid()).pw_name,
            "STOP_TIMEOUT": 90, "KILL_TIMEOUT": 30,
        }
        defaults.write_text("".join(f"{k}={shlex.quote(str(v))}\n" for k, v in settings.items()))
        made.append(Service(worker, defaults, pidfile))
        return made[-1]

    yield make
    for svc in made:
        stop_hard(svc)


def stop_hard(svc: Service) -> None:
    """Leave no daemon behind a failed test: the second SIGTERM kills its builds."""
    try:
        pid = svc.pid
    except (OSError, ValueError):
        return
    try:
        os.kill(pid, signal.SIGTERM)
        time.sleep(0.5)
        os.kill(pid, signal.SIGTERM)
        wait_gone(pid, 30)
    except ProcessLookupError:
        pass
    except AssertionError:
        os.kill(pid, signal.SIGKILL)


@pytest.fixture
def service(make_service) -> Service:
    return make_service()


def test_start_status_stop_drains_the_running_build(service, server):
    started = service.run("start")
    assert started.returncode == 0, started.stdout + started.stderr
    pid = service.pid
    assert f"started (pid {pid})" in started.stdout
    status = service.run("status")
    assert status.returncode == 0 and f"is running (pid {pid})" in status.stdout

    # Detached: out of this session, stdio on /dev/null, the log file kept.
    assert os.getsid(pid) != os.getsid(0)
    for fd in (0, 1, 2):
        assert os.readlink(f"/proc/{pid}/fd/{fd}") == "/dev/null"
    assert f"djinn-worker {__version__} started (pid {pid})" in service.log

    quick = server.queue_build([("quick", False, [("quick", "echo quick")])])
    assert server.wait(quick.id, timeout=SLOW)["status"] == "passed"

    slow = server.queue_build([("slow", False, [("slow", "sleep 3\necho finished")])])
    server.wait_job(slow.jobs["slow"], timeout=SLOW)
    stopped = service.run("stop")
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    assert "waiting up to 90s for running builds" in stopped.stdout
    row = server.build(slow.id)
    assert row["status"] == "passed", row["output"]
    assert "finished" in server.job(slow.jobs["slow"])["output"]
    assert not alive(pid)
    assert not service.pidfile.exists()
    assert "djinn-worker stopped" in service.log

    status = service.run("status")
    assert status.returncode == 3 and "is not running" in status.stdout
    stopped = service.run("stop")
    assert stopped.returncode == 0 and "is not running" in stopped.stdout


def test_second_start_is_refused(service):
    assert service.run("start").returncode == 0
    pid = service.pid

    again = service.run("start")
    assert again.returncode == 0, "LSB: starting a running service succeeds"
    assert f"already running (pid {pid})" in again.stdout

    direct = service.daemon()
    assert direct.returncode == 3
    assert direct.stderr == (f"djinn-worker: {service.pidfile}: djinn-worker is already running "
                             f"as process {pid}; not starting another\n")
    assert service.pid == pid and alive(pid)
    assert service.log.count("started (pid") == 1
    assert service.run("stop").returncode == 0


def test_stale_pidfile_of_a_killed_worker_is_replaced(service, server):
    assert service.run("start").returncode == 0
    stale = service.pid
    # Its build process outlives it and must not keep the pidfile locked.
    build = server.queue_build([("slow", False, [("slow", "sleep 3")])])
    server.wait_job(build.jobs["slow"], timeout=SLOW)
    os.kill(stale, signal.SIGKILL)
    wait_gone(stale)
    status = service.run("status")
    assert status.returncode == 1, "LSB: dead, pidfile left"
    assert f"pidfile {service.pidfile} is left" in status.stdout

    started = service.run("start")
    assert started.returncode == 0, started.stdout + started.stderr
    assert service.pid != stale and alive(service.pid)
    assert f"replacing the stale pidfile {service.pidfile} of process {stale}" in service.log
    assert server.wait(build.id, timeout=SLOW)["status"] == "passed"
    assert service.run("stop").returncode == 0


def test_config_error_is_reported_on_the_terminal_before_detaching(make_service):
    service = make_service({"timeout": "5 minutes"})
    config = service.worker.config_path
    direct = service.daemon()
    assert direct.returncode == 2
    assert direct.stderr.startswith(f"djinn-worker: {config}: timeout: ")
    assert not service.pidfile.exists()

    started = service.run("start")
    assert started.returncode == 6, "LSB: program is not configured"
    assert f"{config}: timeout: " in started.stdout + started.stderr
    assert service.run("status").returncode == 3


def test_daemon_refuses_to_log_to_the_closed_stdout(make_service):
    direct = make_service({"log": {"file": "/dev/stdout"}}).daemon()
    assert direct.returncode == 2
    assert "log.file: -daemon closes standard output" in direct.stderr


def test_start_fails_visibly_when_the_database_is_unreachable(make_service):
    service = make_service({"database": {"addr": "127.0.0.1:1"}})
    direct = service.daemon()
    assert direct.returncode == 1
    assert "cannot connect to the database at 127.0.0.1:1" in direct.stderr
    assert not service.pidfile.exists()


def test_reload_reopens_a_rotated_log(service, server):
    assert service.run("start").returncode == 0
    log = service.worker.log_path
    rotated = log.with_name(log.name + ".1")
    log.rename(rotated)
    reloaded = service.run("reload")
    assert reloaded.returncode == 0, reloaded.stdout + reloaded.stderr
    wait_for(lambda: log.exists() and "log file reopened" in log.read_text(), "new log file")
    build = server.queue_build()
    assert server.wait(build.id, timeout=SLOW)["status"] == "passed"
    assert service.run("stop").returncode == 0
    new, old = log.read_text(), rotated.read_text()
    assert f"build {build.id}: started" in new and "djinn-worker stopped" in new
    assert old.rstrip().endswith("received SIGHUP: reopening the log file")
    assert f"build {build.id}" not in old
    assert service.run("reload").returncode == 7, "LSB: program is not running"


def test_foreground_pidfile_and_graceful_sigterm(tmp_path, make_worker, server):
    worker = make_worker(config={"log": {"file": "/dev/stdout"}}, start=False)
    pidfile = tmp_path / "fg.pid"
    proc = subprocess.Popen(
        [WORKER_BIN, "-pidfile", str(pidfile), "-config", str(worker.config_path),
         "-driver", str(worker.driver_path)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        for line in proc.stdout:
            if "started" in line:
                break
        assert f"djinn-worker {__version__} started (pid {proc.pid})" in line, "logs to the terminal"
        assert pidfile.read_text() == f"{proc.pid}\n"
        build = server.queue_build([("slow", False, [("slow", "sleep 2")])])
        server.wait_job(build.jobs["slow"], timeout=SLOW)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(SLOW) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert server.build(build.id)["status"] == "passed"
    assert not pidfile.exists()
    assert "djinn-worker stopped" in proc.stdout.read()


def test_make_install_and_uninstall(tmp_path):
    dest = tmp_path / "dest"
    mine = "# the operator's own\n"
    (dest / "etc" / "djinn").mkdir(parents=True)
    (dest / "etc" / "djinn" / "worker.toml").write_text(mine)

    make = subprocess.run(["make", "-C", str(REPO), "install", f"DESTDIR={dest}"],
                          capture_output=True, text=True, timeout=900)
    assert make.returncode == 0, make.stdout + make.stderr

    lib = dest / "usr/local/lib/djinn-worker"
    version = subprocess.run([str(lib / "bin" / "djinn-worker"), "-version"],
                             capture_output=True, text=True, timeout=SLOW)
    assert version.stdout == f"djinn-worker {__version__}\n", version.stderr
    # Installed from a copy, not linked to the checkout.
    check = subprocess.run([str(lib / "bin" / "python"), "-c",
                            "import djinn_worker; print(djinn_worker.__file__)"],
                           capture_output=True, text=True, timeout=SLOW)
    assert check.stdout.startswith(str(lib)), check.stdout + check.stderr
    link = dest / "usr/local/bin/djinn-worker"
    assert os.readlink(link) == "/usr/local/lib/djinn-worker/bin/djinn-worker"
    offline = dest / "usr/local/bin/djinn"
    assert os.readlink(offline) == "/usr/local/lib/djinn-worker/bin/djinn"
    offline_version = subprocess.run([str(lib / "bin" / "djinn"), "-version"],
                                     capture_output=True, text=True, timeout=SLOW)
    assert offline_version.stdout == f"djinn {__version__}\n", offline_version.stderr

    etc = dest / "etc"
    assert (etc / "djinn/worker.toml").read_text() == mine, "an existing config is kept"
    assert (etc / "djinn/driver.toml").read_text() == (REPO / "dist/driver.toml").read_text()
    init = etc / "init.d/djinn-worker"
    assert os.access(init, os.X_OK)
    assert "DAEMON=/usr/local/bin/djinn-worker\n" in init.read_text()
    assert subprocess.run(["sh", "-n", str(init)]).returncode == 0
    unit = (etc / "systemd/system/djinn-worker.service").read_text()
    assert "ExecStart=/usr/local/bin/djinn-worker -config /etc/djinn/worker.toml" in unit
    assert (etc / "logrotate.d/djinn-worker").is_file()
    data = [dest / "var/lib/djinn" / d for d in ("images", "artifacts", "objects")]
    data.append(dest / "var/log/djinn")
    assert all(d.is_dir() for d in data)

    make = subprocess.run(["make", "-C", str(REPO), "uninstall", f"DESTDIR={dest}"],
                          capture_output=True, text=True, timeout=SLOW)
    assert make.returncode == 0, make.stdout + make.stderr
    assert not lib.exists() and not os.path.lexists(link) and not os.path.lexists(offline)
    assert not init.exists()
    assert not (etc / "systemd/system/djinn-worker.service").exists()
    assert not (etc / "logrotate.d/djinn-worker").exists()
    assert (etc / "djinn/worker.toml").read_text() == mine
    assert (etc / "djinn/driver.toml").is_file()
    assert all(d.is_dir() for d in data)


def test_systemd_unit_is_valid(tmp_path):
    """systemd-analyze checks the unit; the command it names is made to exist here."""
    analyze = "/usr/bin/systemd-analyze"
    if not os.access(analyze, os.X_OK):
        pytest.skip("systemd-analyze is not installed")
    unit = (REPO / "dist/systemd/djinn-worker.service").read_text()
    (tmp_path / "djinn-worker.service").write_text(
        unit.replace("/usr/local/bin/djinn-worker", sys.executable))
    verify = subprocess.run([analyze, "verify", str(tmp_path / "djinn-worker.service")],
                            capture_output=True, text=True, timeout=SLOW)
    assert verify.returncode == 0, verify.stderr
