"""Migrations: applied in order, recorded, idempotent, safe when run concurrently."""

from __future__ import annotations

import threading
from datetime import UTC, datetime

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


def test_rule_cursors_take_over_the_newest_reading_from_rule_states(empty_db_url: str) -> None:
    """Upgrading a database that ran the rule engine before migration 4: each device_metric's
    newest evaluated reading moves from its rules' states to rule_cursors."""
    with psycopg.connect(empty_db_url, autocommit=True) as conn:
        conn.execute(migrate.queries["create_migrations_table"])
        for m in migrate.available()[:3]:  # the schema as the previous release left it
            with conn.transaction():
                conn.execute(m.sql.encode())
                conn.execute(
                    migrate.queries["record_migration"],
                    {"version": m.version, "name": m.name, "checksum": m.checksum},
                )
        conn.execute(
            "INSERT INTO devices (serial_id, name) VALUES ('SN-1', 'one');"
            "INSERT INTO metrics (metric_type, data_type) VALUES ('temperature', 'numeric');"
            "INSERT INTO device_metrics (device_id, metric_id) SELECT d.id, m.id "
            "FROM devices d, metrics m;"
            "INSERT INTO rules (name, condition, action, device_metric_id) "
            "SELECT 'r' || g, '{}', '{}', dm.id FROM device_metrics dm, generate_series(1, 2) g;"
        )
        for rule, last, value in (
            (1, "2026-03-01T12:00:00Z", 20.5),
            (2, "2026-03-01T12:05:00Z", 21),
        ):
            conn.execute(
                "INSERT INTO rule_states (rule_id, device_metric_id, fingerprint, status, state,"
                " last_ts) SELECT %s, id, 'fp', 'ok', jsonb_build_object('status', 'ok',"
                " 'last_ts', %s::text, 'last_value', %s::jsonb), %s FROM device_metrics",
                (rule, last, str(value), last),
            )
        applied = [m.version for m in migrate.migrate(conn)]
        assert applied == [m.version for m in migrate.available()[3:]]
        assert applied[0] == 4
        cursor = conn.execute("SELECT last_ts, last_value FROM rule_cursors").fetchall()
        assert cursor == [(datetime(2026, 3, 1, 12, 5, tzinfo=UTC), 21)]
        states = conn.execute("SELECT state FROM rule_states ORDER BY rule_id").fetchall()
        assert states == [({"status": "ok"},), ({"status": "ok"},)]
