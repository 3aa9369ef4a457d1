"""Connections to PostgreSQL: one pool per service, opened on purpose, checked on checkout."""

from __future__ import annotations

from collections.abc import Callable

import psycopg
import structlog
from psycopg_pool import ConnectionPool

from config.settings import Settings

log = structlog.get_logger(__name__)

CONNECT_TIMEOUT = 5  # seconds: a dead server must fail fast so that the retry loop can log it
# TCP keepalives: a silent network partition is noticed in about a minute, not hours.
KEEPALIVES = {
    "keepalives": 1,
    "keepalives_idle": 30,
    "keepalives_interval": 10,
    "keepalives_count": 3,
}
APPLICATION_NAME = "iothub"


def conninfo(settings: Settings, purpose: str) -> str:
    """The configured DSN plus our application name, connect timeout and keepalives (what the
    DSN sets itself wins)."""
    given = psycopg.conninfo.conninfo_to_dict(settings.database_url)
    return psycopg.conninfo.make_conninfo(
        settings.database_url,
        application_name=f"{APPLICATION_NAME}-{purpose}",
        connect_timeout=CONNECT_TIMEOUT,
        **{k: v for k, v in KEEPALIVES.items() if k not in given},
    )


def connect(settings: Settings, purpose: str, autocommit: bool = False) -> psycopg.Connection:
    """A single connection (CLI commands, listeners)."""
    return psycopg.connect(conninfo(settings, purpose), autocommit=autocommit)


def make_pool(
    settings: Settings,
    purpose: str,
    size: int | None = None,
    configure: Callable[[psycopg.Connection], None] | None = None,
) -> ConnectionPool:
    """A closed pool: the caller opens it (`open(wait=False)`) when it is ready to use it.

    Connections are checked on checkout so that a server restart costs one failed check, not
    one failed batch per stale connection.
    """
    n = size or settings.db_pool_size
    return ConnectionPool(
        conninfo(settings, purpose),
        min_size=1,
        max_size=n,
        open=False,
        check=ConnectionPool.check_connection,
        name=f"iothub-{purpose}",
        kwargs={"autocommit": True},  # transactions are explicit: `with conn.transaction()`
        configure=configure,
        timeout=CONNECT_TIMEOUT * 2,
    )
