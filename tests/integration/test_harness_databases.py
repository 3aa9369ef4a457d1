"""The test harness's databases: a session on the template never makes a clone fail.

TimescaleDB's background-worker launcher connects briefly to every database that allows
connections and is not a template; any such session makes `CREATE DATABASE ... TEMPLATE` fail
with ObjectInUse. These tests hold real sessions on real databases to show the harness copes.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import psycopg
import pytest
from psycopg import errors, sql

from tests.support import databases


@pytest.fixture
def scratch(pg_admin_dsn: str) -> Iterator[str]:
    """The name of a database this test may create, seal and drop."""
    name = f"iothub_scratch_{os.getpid()}_{os.urandom(3).hex()}"
    try:
        yield name
    finally:
        databases.drop_database(pg_admin_dsn, name)


def test_a_session_on_an_unsealed_database_breaks_a_clone(pg_admin_dsn: str, scratch: str) -> None:
    """The failure the harness avoids: one open session on the source makes the clone fail."""
    source = databases.create_database(pg_admin_dsn, scratch)
    with (
        psycopg.connect(source, autocommit=True),
        psycopg.connect(pg_admin_dsn, autocommit=True) as admin,
        pytest.raises(errors.ObjectInUse, match="is being accessed by other users"),
    ):
        admin.execute(
            sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
                sql.Identifier(f"{scratch}_c"), sql.Identifier(scratch)
            )
        )


def test_the_suite_template_refuses_connections(pg_admin_dsn: str, template_db: str) -> None:
    """The migrated template is a template nobody may connect to, as TimescaleDB's launcher
    requires to leave it alone; so holding a connection to it is impossible."""
    with psycopg.connect(pg_admin_dsn, autocommit=True) as admin:
        row = admin.execute(
            "SELECT datistemplate, datallowconn FROM pg_database WHERE datname = %s",
            (template_db,),
        ).fetchone()
    assert row == (True, False)
    with pytest.raises(psycopg.OperationalError, match="not currently accepting connections"):
        psycopg.connect(databases.dsn_for(pg_admin_dsn, template_db), connect_timeout=5)


def test_a_session_held_on_the_template_when_it_is_sealed_does_not_break_clones(
    pg_admin_dsn: str, scratch: str
) -> None:
    """A session that connected before the template was sealed (the launcher, a leftover) is
    ended by the seal, and clones then succeed while nothing can connect again."""
    source = databases.create_database(pg_admin_dsn, scratch)
    held = psycopg.connect(source, autocommit=True)
    try:
        held.execute("CREATE TABLE marker (x int)")
        databases.seal_template(pg_admin_dsn, scratch)
        clones = [f"{scratch}_c{i}" for i in range(3)]
        try:
            for clone in clones:
                dsn = databases.create_database(pg_admin_dsn, clone, template=scratch)
                with psycopg.connect(dsn, autocommit=True) as conn:
                    assert conn.execute("SELECT count(*) FROM marker").fetchone() == (0,)
        finally:
            for clone in clones:
                databases.drop_database(pg_admin_dsn, clone)
        with pytest.raises(psycopg.OperationalError):
            held.execute("SELECT 1")
    finally:
        held.close()


def test_a_source_that_stays_busy_fails_with_the_sessions_named(
    pg_admin_dsn: str, scratch: str
) -> None:
    """A source the harness must not end sessions on (not sealed) fails after the retries with
    a message that says who holds it, not with a bare ObjectInUse."""
    source = databases.create_database(pg_admin_dsn, scratch)
    with (
        psycopg.connect(source, autocommit=True, application_name="holder-of-the-source"),
        pytest.raises(databases.TemplateInUse, match="holder-of-the-source") as info,
    ):
        databases.create_database(pg_admin_dsn, f"{scratch}_c", template=scratch, attempts=2)
    assert "after 2 attempts" in str(info.value)
