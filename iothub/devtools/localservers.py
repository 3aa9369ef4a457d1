"""Throwaway PostgreSQL and Mosquitto servers started from the installed binaries.

`iothub demo` uses them when the configured servers do not answer, and the test suite when no
server is given and no Docker engine runs. Each lives in a directory of its own on a free port of
127.0.0.1 and is gone after `destroy()`: nothing is installed, registered or left running.

PostgreSQL refuses to run as root: as root, initdb and the server run as the `postgres` account,
so the directory given must be one that account can reach (not under a 0700 directory of root's).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

START_TIMEOUT = 30.0  # seconds for a server to listen after it was started
STOP_TIMEOUT = 10.0  # seconds for the broker to exit after SIGTERM, before SIGKILL
LOCALHOST = "127.0.0.1"


class ServiceUnavailable(Exception):
    """No way to provide this server here."""


def free_port() -> int:
    """A TCP port of 127.0.0.1 that nothing listened on a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOCALHOST, 0))
        return int(sock.getsockname()[1])


def wait_port(host: str, port: int, timeout: float = START_TIMEOUT) -> None:
    """Return once something accepts connections on host:port; TimeoutError after `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout}s")


def _pg_bindir() -> Path | None:
    pg_config = shutil.which("pg_config")
    if pg_config:
        out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, check=False)
        candidate = Path(out.stdout.strip())
        if (candidate / "initdb").exists():
            return candidate
    initdb = shutil.which("initdb")
    if initdb:
        return Path(initdb).resolve().parent
    # Debian keeps the server binaries off the PATH, one directory per major version.
    for candidate in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (candidate / "initdb").exists():
            return candidate
    return None


def _timescaledb_installed(bindir: Path) -> bool:
    pg_config = bindir / "pg_config"
    if not pg_config.exists():
        return False
    out = subprocess.run([pg_config, "--pkglibdir"], capture_output=True, text=True, check=False)
    return any(Path(out.stdout.strip()).glob("timescaledb*.so"))


def _run_as() -> str | None:
    """PostgreSQL refuses to run as root: use the `postgres` account then."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        raise ServiceUnavailable("running as root and there is no 'postgres' user") from None
    return "postgres"


@dataclass
class LocalPostgres:
    """A throwaway PostgreSQL cluster in a directory of its own."""

    base: Path
    port: int = field(default_factory=free_port)
    bindir: Path | None = field(default_factory=_pg_bindir)
    log_path: Path = field(init=False)
    timescaledb: bool = field(init=False, default=False)

    def __post_init__(self) -> None:
        if self.bindir is None:
            raise ServiceUnavailable("PostgreSQL server binaries (initdb, postgres) not found")
        self.timescaledb = _timescaledb_installed(self.bindir)
        self.log_path = self.base / "postgres.log"
        self._user = _run_as()

    @property
    def data(self) -> Path:
        return self.base / "data"

    @property
    def admin_dsn(self) -> str:
        return f"postgresql://postgres@{LOCALHOST}:{self.port}/postgres"

    def _cmd(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            list(args),
            user=self._user,
            capture_output=True,
            text=True,
            check=False,
            cwd=self.base,
        )
        if check and done.returncode != 0:
            raise ServiceUnavailable(
                f"{Path(args[0]).name} failed ({done.returncode}): {done.stderr.strip()[-800:]}"
            )
        return done

    def init(self) -> None:
        assert self.bindir is not None
        self.base.mkdir(parents=True, exist_ok=True)
        if self._user:
            shutil.chown(self.base, self._user, self._user)
        self._cmd(
            str(self.bindir / "initdb"),
            "-D",
            str(self.data),
            "-U",
            "postgres",
            "--auth=trust",
            "-E",
            "UTF8",
            "--locale=C.UTF-8",
            "--no-sync",
        )
        settings = [
            f"port = {self.port}",
            f"listen_addresses = '{LOCALHOST}'",
            f"unix_socket_directories = '{self.base}'",
            # Throwaway data: a crash of the server, never of the machine, is what can happen,
            # and the OS cache keeps what fsync would. synchronous_commit stays on: a commit
            # must have reached the OS before it is reported, or `pg_ctl stop -m immediate`
            # loses acknowledged readings.
            "fsync = off",
            "full_page_writes = off",
            "max_connections = 200",
            "shared_buffers = 128MB",
        ]
        if self.timescaledb:
            settings += [
                "shared_preload_libraries = 'timescaledb'",
                "timescaledb.telemetry_level = off",
            ]
        with (self.data / "postgresql.conf").open("a") as fh:
            fh.write("\n".join(settings) + "\n")

    def start(self) -> None:
        assert self.bindir is not None
        self._cmd(
            str(self.bindir / "pg_ctl"),
            "-D",
            str(self.data),
            "-l",
            str(self.log_path),
            "-w",
            "-t",
            str(int(START_TIMEOUT)),
            "start",
        )
        wait_port(LOCALHOST, self.port)

    def stop(self, mode: str = "fast") -> None:
        assert self.bindir is not None
        self._cmd(
            str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop", check=False
        )

    def destroy(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.base, ignore_errors=True)


@dataclass
class LocalMosquitto:
    """A throwaway Mosquitto broker with persistence in a directory of its own."""

    base: Path
    port: int = field(default_factory=free_port)
    extra_config: str = ""
    # In a session of its own, a Ctrl-C on the terminal reaches only us, and we stop the broker
    # in our own time (pg_ctl does the same for PostgreSQL).
    own_session: bool = False
    process: subprocess.Popen[bytes] | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        self.binary = shutil.which("mosquitto") or (
            "/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None
        )
        if self.binary is None:
            raise ServiceUnavailable("the mosquitto binary is not installed")
        self.base.mkdir(parents=True, exist_ok=True)
        self.conf = self.base / "mosquitto.conf"
        lines = [
            f"listener {self.port} {LOCALHOST}",
            "allow_anonymous true",
            "persistence true",
            f"persistence_location {self.base}/",
            "autosave_interval 1",
            # The defaults (1000 queued, 20 in flight) would drop messages or throttle a
            # service that acknowledges in batches: use the sizes production brokers get.
            "max_queued_messages 0",
            "max_inflight_messages 0",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_dest stderr",
        ]
        if os.geteuid() == 0:
            lines.append("user root")  # the persistence directory belongs to us
        self.conf.write_text("\n".join(lines) + "\n" + self.extra_config)
        self.log_path = self.base / "mosquitto.log"

    @property
    def url(self) -> str:
        return f"mqtt://{LOCALHOST}:{self.port}"

    def start(self) -> None:
        assert self.binary is not None
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [self.binary, "-c", str(self.conf)],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=self.own_session,
        )
        log.close()
        wait_port(LOCALHOST, self.port)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        self.process = None

    def destroy(self) -> None:
        self.stop()
        shutil.rmtree(self.base, ignore_errors=True)


__all__ = [
    "START_TIMEOUT",
    "LocalMosquitto",
    "LocalPostgres",
    "ServiceUnavailable",
    "free_port",
    "wait_port",
]
