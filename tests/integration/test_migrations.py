"""Migrations: applied in order, recorded, idempotent, safe when run concurrently."""

from __future__ import annotations

import threading

import psycopg

from schema import migrate


def test_migrate_applies_everything_once(empty_db_url: str) -> None:
    """A fresh database gets every migration; a second run applies nothing."""
    with psycopg.connect(empty_db_url, autocommit=True) as conn:
        applied = migrate.migrate(conn)
        assert [m.version for m in applied] == [m.version for m in migrate.available()]
        assert migrate.migrate(conn) == []
        rows = conn.execute("SELECT version FROM schema_migrations ORDER BY 1").fetchall()
        assert [r[0] for r in rows] == [m.version for m in migrate.available()]
        assert migrate.pending(conn) == []


def test_concurrent_migrate_applies_each_migration_once(empty_db_url: str) -> None:
    """Two processes migrating at once serialise on the advisory lock instead of failing."""
    results: list[list[migrate.Migration]] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            with psycopg.connect(empty_db_url, autocommit=True) as conn:
                results.append(migrate.migrate(conn))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    assert sorted(len(r) for r in results) == [0, 0, len(migrate.available())]


def test_failed_migration_leaves_nothing_half_done(empty_db_url: str) -> None:
    """A migration that fails is rolled back whole and not recorded."""
    with psycopg.connect(empty_db_url, autocommit=True) as conn:
        conn.execute("CREATE TABLE users (id int)")  # collides with migration 1
        try:
            migrate.migrate(conn)
        except psycopg.errors.DuplicateTable:
            pass
        else:
            raise AssertionError("migration over a conflicting table must fail")
        assert migrate.pending(conn)[0].version == 1
        exists = conn.execute("SELECT to_regclass('devices')").fetchone()
        assert exists == (None,)
