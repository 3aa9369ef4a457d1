"""Test databases: a migrated template sealed against connections, and clones of it.

`CREATE DATABASE ... TEMPLATE t` fails with ObjectInUse while any session is connected to `t`.
On a TimescaleDB server the extension's background-worker launcher briefly connects to every
database that allows connections and is not a template (it skips `datallowconn = false` and
`datistemplate`), so cloning an ordinary database fails at random. The template is therefore
sealed once it is migrated: marked `IS_TEMPLATE true` and `ALLOW_CONNECTIONS false`, and any
session that connected before that (the launcher, a leftover of the migration) is terminated.
Nothing can connect to it afterwards, so clones never race. A clone that still meets a busy
source retries briefly and then fails with the sessions that hold it, by name.
"""

from __future__ import annotations

import random
import time

import psycopg
from psycopg import errors, sql

CLONE_ATTEMPTS = 6  # tries of CREATE DATABASE ... TEMPLATE before giving up
CLONE_FIRST_DELAY = 0.05  # seconds; doubled after each failed try, with jitter
APPLICATION_NAME = "iothub-tests"


class TemplateInUse(Exception):
    """The template database stays in use by other sessions, so it cannot be cloned."""


def dsn_for(admin_dsn: str, dbname: str) -> str:
    return psycopg.conninfo.make_conninfo(admin_dsn, dbname=dbname)


def _admin(admin_dsn: str) -> psycopg.Connection:
    return psycopg.connect(admin_dsn, autocommit=True, application_name=APPLICATION_NAME)


def create_database(
    admin_dsn: str, name: str, template: str | None = None, attempts: int = CLONE_ATTEMPTS
) -> str:
    """Create `name` (a clone of `template` when given) and return its DSN."""
    with _admin(admin_dsn) as conn:
        if template is None:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        else:
            _clone(conn, name, template, attempts)
    return dsn_for(admin_dsn, name)


def _clone(conn: psycopg.Connection, name: str, template: str, attempts: int) -> None:
    query = sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
        sql.Identifier(name), sql.Identifier(template)
    )
    delay = CLONE_FIRST_DELAY
    for attempt in range(1, attempts + 1):
        try:
            conn.execute(query)
            return
        except errors.ObjectInUse:
            if attempt == attempts:
                break
            if _is_sealed(conn, template):
                # Nothing may connect to a sealed template: whoever is there is a leftover.
                _terminate_sessions(conn, template)
            time.sleep(delay * random.uniform(0.5, 1.5))
            delay *= 2
    holders = _sessions(conn, template)
    raise TemplateInUse(
        f"cannot clone database {template!r} into {name!r}: after {attempts} attempts it is "
        f"still in use by {holders or 'sessions that left meanwhile'}; a template must allow no "
        "connections (seal_template)"
    )


def seal_template(admin_dsn: str, name: str) -> None:
    """Mark `name` as a template nobody may connect to, and end the sessions already there."""
    with _admin(admin_dsn) as conn:
        conn.execute(
            sql.SQL("ALTER DATABASE {} WITH IS_TEMPLATE true ALLOW_CONNECTIONS false").format(
                sql.Identifier(name)
            )
        )
        # Sessions that connected before the ALTER keep running; they would block every clone.
        _terminate_sessions(conn, name)


def drop_database(admin_dsn: str, name: str) -> None:
    """Drop `name` if it exists, sealed template or not, whoever is connected."""
    with _admin(admin_dsn) as conn:
        row = conn.execute(
            "SELECT datistemplate FROM pg_database WHERE datname = %s", (name,)
        ).fetchone()
        if row and row[0]:
            # PostgreSQL refuses to drop a database marked as a template.
            conn.execute(
                sql.SQL("ALTER DATABASE {} WITH IS_TEMPLATE false").format(sql.Identifier(name))
            )
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )


def _is_sealed(conn: psycopg.Connection, name: str) -> bool:
    row = conn.execute(
        "SELECT datistemplate AND NOT datallowconn FROM pg_database WHERE datname = %s", (name,)
    ).fetchone()
    return bool(row and row[0])


def _terminate_sessions(conn: psycopg.Connection, name: str) -> None:
    conn.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
        " WHERE datname = %s AND pid <> pg_backend_pid()",
        (name,),
    )


def _sessions(conn: psycopg.Connection, name: str) -> str:
    rows = conn.execute(
        "SELECT pid, usename, application_name, backend_type FROM pg_stat_activity"
        " WHERE datname = %s AND pid <> pg_backend_pid() ORDER BY pid",
        (name,),
    ).fetchall()
    return ", ".join(
        f"pid {pid} ({user}, application {app or '-'}, {kind})" for pid, user, app, kind in rows
    )
