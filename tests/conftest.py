"""Fixtures shared by the whole suite: real PostgreSQL and Mosquitto, a migrated template
database cloned per test, and settings pointing at them."""

from __future__ import annotations

import contextlib
import itertools
import os
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import structlog

from config.settings import Settings, load_settings
from schema import migrate
from tests.support import databases, services, skips
from tests.support.databases import create_database, drop_database, seal_template

# The skip policy: in CI (or with IOTHUB_REQUIRE_SERVICES=1) a skip is a failure (skips.py).
pytest_plugins = ["tests.support.skips"]

_counter = itertools.count()


@pytest.fixture(autouse=True)
def _quiet_logs() -> None:
    """Each test starts with structlog's defaults, so one test's configuration cannot leak."""
    structlog.reset_defaults()


@pytest.fixture(scope="session")
def pg_admin_dsn(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A DSN to the `postgres` database of a real server this session may create databases on."""
    given = os.environ.get("IOTHUB_TEST_DATABASE_URL")
    if given:
        yield given
        return
    if services.docker_available():
        with services.container_postgres() as dsn:
            yield dsn
        return
    # Not under pytest's tmp dir: that one is private to root, and PostgreSQL runs as `postgres`.
    server = services.LocalPostgres(Path(tempfile.mkdtemp(prefix="iothub-pg-")))
    server.init()
    server.start()
    try:
        yield server.admin_dsn
    finally:
        server.destroy()


@pytest.fixture(scope="session")
def timescaledb_available(pg_admin_dsn: str, pytestconfig: pytest.Config) -> bool:
    available = services.has_timescaledb(pg_admin_dsn)
    # The skip policy lets TimescaleDB tests skip only where this says the server justifies it.
    skips.record_timescaledb(pytestconfig, available)
    return available


@pytest.fixture(scope="session")
def template_db(pg_admin_dsn: str) -> Iterator[str]:
    """A database with every migration applied; tests get clones of it."""
    name = f"iothub_tmpl_{os.getpid()}"
    drop_database(pg_admin_dsn, name)
    dsn = create_database(pg_admin_dsn, name)
    with psycopg.connect(dsn, autocommit=True) as conn:
        migrate.migrate(conn)
    # From here on nothing can connect to it, so no session can make a clone fail (databases.py).
    seal_template(pg_admin_dsn, name)
    try:
        yield name
    finally:
        drop_database(pg_admin_dsn, name)


@pytest.fixture
def empty_db_url(pg_admin_dsn: str) -> Iterator[str]:
    """A fresh database with nothing in it (for migration tests)."""
    name = f"iothub_e{next(_counter)}_{os.getpid()}"
    dsn = create_database(pg_admin_dsn, name)
    try:
        yield dsn
    finally:
        drop_database(pg_admin_dsn, name)


@pytest.fixture
def db_url(pg_admin_dsn: str, template_db: str) -> Iterator[str]:
    """A migrated database of this test's own, cloned from the template."""
    name = f"iothub_t{next(_counter)}_{os.getpid()}"
    dsn = create_database(pg_admin_dsn, name, template=template_db)
    try:
        yield dsn
    finally:
        drop_database(pg_admin_dsn, name)


@pytest.fixture
def conn(db_url: str) -> Iterator[psycopg.Connection]:
    with psycopg.connect(db_url, autocommit=True) as connection:
        yield connection


@pytest.fixture(scope="session")
def broker_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real MQTT broker for this session."""
    given = os.environ.get("IOTHUB_TEST_MQTT_URL")
    if given:
        yield given
        return
    if services.docker_available():
        with services.container_mosquitto(tmp_path_factory.mktemp("mqc")) as url:
            yield url
        return
    broker = services.LocalMosquitto(tmp_path_factory.mktemp("mq", numbered=True))
    broker.start()
    try:
        yield broker.url
    finally:
        broker.destroy()


@pytest.fixture
def unique() -> str:
    """A short id unique to this test, for topics, client ids and serials."""
    return uuid.uuid4().hex[:10]


@pytest.fixture
def make_settings(db_url: str, broker_url: str, unique: str) -> Callable[..., Settings]:
    """Settings pointing at this test's database and broker, on topics of this test's own."""

    def factory(**overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "database_url": db_url,
            "mqtt_url": broker_url,
            "mqtt_client_id": f"iothub-test-{unique}",
            "mqtt_topics": (f"t{unique}/devices/{{serial_id}}/telemetry", f"t{unique}/telemetry"),
            "mqtt_session_expiry": 300,
            "http_port": 0,
            "batch_interval": 0.05,
            "stats_interval": 60.0,
            "log_format": "json",
            # In-process tests look inside one process's pipeline; the tests of worker
            # processes ask for them (and the daemon tests run with the default).
            "workers": 1,
        }
        values.update(overrides)
        return Settings(**values)

    return factory


@pytest.fixture
def local_postgres(tmp_path: Path) -> Iterator[services.LocalPostgres]:
    """A PostgreSQL server of this test's own, migrated, that the test may stop and kill."""
    try:
        server = services.LocalPostgres(Path(tempfile.mkdtemp(prefix="iothub-pg-")))
    except services.ServiceUnavailable as exc:
        skips.unavailable(f"cannot start a throwaway PostgreSQL here: {exc}")
    server.init()
    server.start()
    create_database(server.admin_dsn, "iothub")
    with psycopg.connect(databases.dsn_for(server.admin_dsn, "iothub"), autocommit=True) as conn:
        migrate.migrate(conn)
    try:
        yield server
    finally:
        server.destroy()


@pytest.fixture
def local_mosquitto(tmp_path: Path) -> Iterator[services.LocalMosquitto]:
    """A Mosquitto broker of this test's own, that the test may restart."""
    try:
        broker = services.LocalMosquitto(tmp_path / "mosquitto")
    except services.ServiceUnavailable as exc:
        skips.unavailable(f"cannot start a throwaway Mosquitto here: {exc}")
    broker.start()
    try:
        yield broker
    finally:
        with contextlib.suppress(Exception):
            broker.destroy()


__all__ = ["create_database", "drop_database", "load_settings"]
