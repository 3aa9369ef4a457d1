"""Real servers for tests: from the environment, from Docker, or throwaway local processes.

Order of preference, per server kind:
1. `IOTHUB_TEST_DATABASE_URL` / `IOTHUB_TEST_MQTT_URL`: a server someone already runs.
2. testcontainers, when a Docker engine answers (TimescaleDB and eclipse-mosquitto images).
3. A throwaway instance started from the installed binaries (initdb/postgres, mosquitto) on a
   free port in a temporary directory; TimescaleDB is preloaded when the server has it. Those
   classes are the product's own (`iothub.devtools.localservers`, which `iothub demo` uses too).
Fault-injection tests always use (3), since they stop and kill the server.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import psycopg

from iothub.devtools.localservers import (
    START_TIMEOUT,
    LocalMosquitto,
    LocalPostgres,
    ServiceUnavailable,
    free_port,
    wait_port,
)


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


__all__ = [
    "START_TIMEOUT",
    "LocalMosquitto",
    "LocalPostgres",
    "ServiceUnavailable",
    "container_mosquitto",
    "container_postgres",
    "docker_available",
    "free_port",
    "has_timescaledb",
    "wait_port",
]
