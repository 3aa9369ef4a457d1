"""Real servers for tests: from the environment, from Docker, or throwaway local processes.

Order of preference, per server kind:
1. `IOTHUB_TEST_DATABASE_URL` / `IOTHUB_TEST_MQTT_URL`: a server someone already runs.
2. testcontainers, when a Docker engine answers (TimescaleDB and eclipse-mosquitto images).
3. A throwaway instance started from the installed binaries (initdb/postgres, mosquitto) on a
   free port in a temporary directory; TimescaleDB is preloaded when the server has it.
Fault-injection tests always use (3), since they stop and kill the server.
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
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psycopg

START_TIMEOUT = 30.0  # seconds


class ServiceUnavailable(Exception):
    """No way to provide this server here."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_port(host: str, port: int, timeout: float = START_TIMEOUT) -> None:
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
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

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
            "listen_addresses = '127.0.0.1'",
            f"unix_socket_directories = '{self.base}'",
            # Tests crash the server, never the machine: the OS cache keeps what fsync would.
            # synchronous_commit stays on: a commit must have reached the OS before it is
            # reported, or `pg_ctl stop -m immediate` loses acknowledged readings.
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
        wait_port("127.0.0.1", self.port)

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
            f"listener {self.port} 127.0.0.1",
            "allow_anonymous true",
            "persistence true",
            f"persistence_location {self.base}/",
            "autosave_interval 1",
            # The defaults (1000 queued, 20 in flight) would drop messages or throttle a
            # service that acknowledges in batches: the tests use the production sizes.
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
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self) -> None:
        assert self.binary is not None
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [self.binary, "-c", str(self.conf)], stdout=log, stderr=subprocess.STDOUT
        )
        log.close()
        wait_port("127.0.0.1", self.port)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        self.process = None

    def destroy(self) -> None:
        self.stop()
        shutil.rmtree(self.base, ignore_errors=True)


def docker_available() -> bool:
    if os.environ.get("IOTHUB_TEST_NO_DOCKER"):
        return False
    if not os.environ.get("DOCKER_HOST"):
        # Probe the default socket ourselves: the docker library leaks its socket on failure.
        path = "/var/run/docker.sock"
        if not Path(path).exists():
            return False
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            probe.settimeout(2)
            try:
                probe.connect(path)
            except OSError:
                return False
    try:
        import docker  # type: ignore[import-untyped]

        client = docker.from_env(timeout=3)
    except Exception:
        return False
    try:
        return bool(client.ping())
    except Exception:
        return False
    finally:
        client.close()


def has_timescaledb(dsn: str) -> bool:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_available_extensions WHERE name = 'timescaledb'"
        ).fetchone()
        return bool(row and row[0])


@contextlib.contextmanager
def container_postgres() -> Iterator[str]:
    from testcontainers.postgres import PostgresContainer

    with PostgresContainer(
        "timescale/timescaledb:latest-pg16",
        username="postgres",
        password="postgres",
        dbname="postgres",
        driver=None,
    ) as pg:
        yield pg.get_connection_url()


@contextlib.contextmanager
def container_mosquitto(tmp: Path) -> Iterator[str]:
    from testcontainers.core.container import DockerContainer
    from testcontainers.core.waiting_utils import wait_for_logs

    tmp.mkdir(parents=True, exist_ok=True)
    conf = tmp / "mosquitto.conf"
    conf.write_text(
        "listener 1883\nallow_anonymous true\nmax_queued_messages 0\n"
        "max_inflight_messages 0\npersistence true\npersistence_location /mosquitto/data/\n"
    )
    container = (
        DockerContainer("eclipse-mosquitto:2")
        .with_exposed_ports(1883)
        .with_volume_mapping(str(conf), "/mosquitto/config/mosquitto.conf", "ro")
    )
    with container:
        wait_for_logs(container, "running", timeout=30)
        host = container.get_container_host_ip()
        port = container.get_exposed_port(1883)
        yield f"mqtt://{host}:{port}"
