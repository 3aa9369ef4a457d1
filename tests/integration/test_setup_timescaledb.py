"""`iothub setup-timescaledb`: the seed's 15 test cases, run against the real command.

Tests marked `timescaledb` need the extension on the test server and are skipped with a reason
when it is absent; the others run on plain PostgreSQL (the dry run, the whitespace of its output,
the missing-extension error, a stopped server). Nothing here fakes the extension.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from importlib import resources
from typing import Any

import psycopg
import pytest
from psycopg import sql
from psycopg.types.json import Jsonb

from ingestor import writer
from iothub import exitcodes
from iothub.cli import main as cli
from tests.support import services, skips

# The six steps as the seed describes them, as `--dry-run` must print them.
SEED_STEPS = [
    "1. CREATE EXTENSION IF NOT EXISTS timescaledb;",
    "2. ALTER TABLE telemetries DROP CONSTRAINT IF EXISTS telemetries_pkey;",
    "3. SELECT create_hypertable('telemetries', 'ts', chunk_time_interval => INTERVAL '7 days', "
    "migrate_data => true, if_not_exists => true);",
    "4. ALTER TABLE telemetries SET (timescaledb.compress, "
    "timescaledb.compress_segmentby = 'device_metric_id', "
    "timescaledb.compress_orderby = 'ts DESC');",
    "5. SELECT add_compression_policy('telemetries', INTERVAL '30 days', if_not_exists => true);",
    "6. SELECT add_retention_policy('telemetries', INTERVAL '1 year', if_not_exists => true);",
]


def _aggregate(number: int, name: str, width: str) -> str:
    return (
        f"{number}. CREATE MATERIALIZED VIEW {name} WITH (timescaledb.continuous, "
        "timescaledb.materialized_only = false) AS SELECT device_metric_id, "
        f"time_bucket(INTERVAL '{width}', ts) AS bucket, count(*) AS readings, "
        "min(value_numeric) AS value_min, max(value_numeric) AS value_max, "
        "avg(value_numeric) AS value_avg, last(value_jsonb, ts) AS value_last, "
        "max(ts) AS ts_last FROM telemetries "
        f"GROUP BY device_metric_id, time_bucket(INTERVAL '{width}', ts) WITH NO DATA;"
    )


# Steps 7 .. 14: the plain views of migration 0010 become continuous aggregates.
AGGREGATE_STEPS = [
    "7. DROP VIEW IF EXISTS telemetry_hourly;",
    _aggregate(8, "telemetry_hourly", "1 hour"),
    "9. SELECT add_continuous_aggregate_policy('telemetry_hourly', "
    "start_offset => INTERVAL '3 days', end_offset => INTERVAL '1 hour', "
    "schedule_interval => INTERVAL '15 minutes', if_not_exists => true);",
    "10. SELECT add_retention_policy('telemetry_hourly', INTERVAL '1825 days', "
    "if_not_exists => true);",
    "11. DROP VIEW IF EXISTS telemetry_daily;",
    _aggregate(12, "telemetry_daily", "1 day"),
    "13. SELECT add_continuous_aggregate_policy('telemetry_daily', "
    "start_offset => INTERVAL '31 days', end_offset => INTERVAL '1 day', "
    "schedule_interval => INTERVAL '1 hour', if_not_exists => true);",
    "14. SELECT add_retention_policy('telemetry_daily', INTERVAL '1825 days', "
    "if_not_exists => true);",
]
# Steps 15 and 16, after the commit: the history of the aggregates this run created.
HISTORY_STEPS = [
    "15. CALL refresh_continuous_aggregate('telemetry_hourly', NULL, now() - INTERVAL '1 hour');",
    "16. CALL refresh_continuous_aggregate('telemetry_daily', NULL, now() - INTERVAL '1 day');",
]
EXPECTED_STEPS = SEED_STEPS + AGGREGATE_STEPS + HISTORY_STEPS
# What --force runs on a complete setup: the IF NOT EXISTS steps; the others are in place (and
# the history of aggregates that were there already is not refreshed again).
FORCED_RAN = [1, 3, 5, 6, 9, 10, 13, 14]


@pytest.fixture(autouse=True)
def _needs_timescaledb(request: pytest.FixtureRequest, timescaledb_available: bool) -> None:
    """Skip tests marked `timescaledb` when the server lacks the extension, saying why."""
    if request.node.get_closest_marker("timescaledb") and not timescaledb_available:
        skips.skip_for_timescaledb(
            "needs the TimescaleDB extension on the test server (pg_available_extensions has no "
            "'timescaledb'); set IOTHUB_TEST_DATABASE_URL to a TimescaleDB server to run it"
        )


@dataclass(frozen=True)
class Run:
    code: int
    out: str
    err: str

    @property
    def events(self) -> list[dict[str, Any]]:
        """The JSON log lines on stderr."""
        found = []
        for line in self.err.splitlines():
            if line.startswith("{"):
                found.append(json.loads(line))
        return found

    def event(self, name: str) -> dict[str, Any]:
        matches = [e for e in self.events if e["event"] == name]
        assert len(matches) == 1, f"expected one {name} event in {self.err!r}"
        return matches[0]

    def names(self) -> list[str]:
        return [e["event"] for e in self.events]


def run(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], dsn: str, *argv: str
) -> Run:
    monkeypatch.setenv("IOTHUB_DATABASE_URL", dsn)
    monkeypatch.setenv("IOTHUB_LOG_FORMAT", "json")
    capsys.readouterr()
    debug = ["--debug"] if "--debug" in argv else []
    rest = [a for a in argv if a != "--debug"]
    code = cli.main([*debug, "setup-timescaledb", *rest])
    captured = capsys.readouterr()
    return Run(code, captured.out, captured.err)


def snapshot(conn: psycopg.Connection) -> tuple[Any, ...]:
    """What any of the six steps would change: extensions, relations, constraints, options."""
    row = conn.execute(
        """
        SELECT
            (SELECT array_agg(extname::text ORDER BY extname) FROM pg_extension),
            (SELECT count(*) FROM pg_class),
            (SELECT array_agg(conname::text ORDER BY conname) FROM pg_constraint
              WHERE conrelid = 'telemetries'::regclass),
            (SELECT array_agg(indexrelid::regclass::text ORDER BY 1) FROM pg_index
              WHERE indrelid = 'telemetries'::regclass),
            (SELECT reloptions FROM pg_class WHERE oid = 'telemetries'::regclass),
            (SELECT count(*) FROM pg_trigger WHERE tgrelid = 'telemetries'::regclass)
        """
    ).fetchone()
    assert row is not None
    return tuple(row)


def installed(conn: psycopg.Connection) -> bool:
    row = conn.execute("SELECT count(*) FROM pg_extension WHERE extname = 'timescaledb'").fetchone()
    return bool(row and row[0])


def has_primary_key(conn: psycopg.Connection) -> bool:
    row = conn.execute(
        "SELECT count(*) FROM pg_constraint WHERE conrelid = 'telemetries'::regclass "
        "AND contype = 'p'"
    ).fetchone()
    return bool(row and row[0])


def is_hypertable(conn: psycopg.Connection) -> bool:
    if not installed(conn):
        return False
    row = conn.execute(
        "SELECT count(*) FROM timescaledb_information.hypertables "
        "WHERE hypertable_name = 'telemetries'"
    ).fetchone()
    return bool(row and row[0])


def policies(conn: psycopg.Connection) -> dict[str, int]:
    """How many compression and retention jobs telemetries has, with the seed's intervals."""
    rows = conn.execute(
        """
        SELECT proc_name::text, count(*)
        FROM timescaledb_information.jobs
        WHERE hypertable_name = 'telemetries'
          AND (
            (proc_name = 'policy_compression'
             AND (config ->> 'compress_after')::interval = INTERVAL '30 days')
            OR (proc_name = 'policy_retention'
                AND (config ->> 'drop_after')::interval = INTERVAL '1 year')
          )
        GROUP BY proc_name
        """
    ).fetchall()
    return {name: n for name, n in rows}


def remove_retention(conn: psycopg.Connection) -> None:
    conn.execute("SELECT remove_retention_policy('telemetries')")
    assert "policy_retention" not in policies(conn)


def assert_fully_set_up(conn: psycopg.Connection) -> None:
    """All six effects of the seed's setup are present."""
    assert installed(conn)
    assert not has_primary_key(conn)
    unique = conn.execute(
        "SELECT pg_get_constraintdef(oid) FROM pg_constraint "
        "WHERE conname = 'unique_telemetry_per_metric_time'"
    ).fetchone()
    assert unique == ("UNIQUE (device_metric_id, ts)",)
    dims = conn.execute(
        """
        SELECT d.column_name::text, d.time_interval, h.compression_enabled
        FROM timescaledb_information.dimensions d
        JOIN timescaledb_information.hypertables h USING (hypertable_schema, hypertable_name)
        WHERE h.hypertable_name = 'telemetries'
        """
    ).fetchall()
    assert dims == [("ts", timedelta(days=7), True)]
    settings = conn.execute(
        """
        SELECT attname::text, segmentby_column_index, orderby_column_index, orderby_asc
        FROM timescaledb_information.compression_settings
        WHERE hypertable_name = 'telemetries'
        ORDER BY attname
        """
    ).fetchall()
    assert settings == [("device_metric_id", 1, None, None), ("ts", None, 1, False)]
    assert policies(conn) == {"policy_compression": 1, "policy_retention": 1}


def add_readings(conn: psycopg.Connection, days: int = 20) -> int:
    """A binding with one reading per hour over `days` days (three 7-day chunks)."""
    metric = conn.execute(
        "INSERT INTO metrics (metric_type, data_type) VALUES ('temperature', 'numeric') "
        "RETURNING id"
    ).fetchone()
    device = conn.execute(
        "INSERT INTO devices (serial_id, name) VALUES ('SN-TS-0001', 'chunked') RETURNING id"
    ).fetchone()
    assert metric and device
    binding = conn.execute(
        "INSERT INTO device_metrics (device_id, metric_id) VALUES (%s, %s) RETURNING id",
        (device[0], metric[0]),
    ).fetchone()
    assert binding
    start = datetime.now(UTC) - timedelta(days=days)
    with conn.cursor() as cur:
        cur.executemany(
            "INSERT INTO telemetries (device_metric_id, ts, value_jsonb) VALUES (%s, %s, %s)",
            [
                (binding[0], start + timedelta(hours=h), Jsonb({"t": "numeric", "v": h % 30}))
                for h in range(days * 24)
            ],
        )
    return days * 24


# --- Integration tests (TestSetupTimescaleDBIntegration) -------------------------------------


@pytest.mark.timescaledb
def test_setup_timescaledb_runs_without_error(
    db_url: str,
    conn: psycopg.Connection,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """On a migrated database with telemetry, the command succeeds and keeps every reading."""
    readings = add_readings(conn)
    result = run(monkeypatch, capsys, db_url)
    assert result.code == exitcodes.OK, result.err
    assert not [e for e in result.events if e["level"] == "error"]
    assert result.event("timescaledb_setup_done")["steps"] == 16
    assert is_hypertable(conn)
    count = conn.execute("SELECT count(*) FROM telemetries").fetchone()
    assert count == (readings,)
    chunks = conn.execute(
        "SELECT num_chunks FROM timescaledb_information.hypertables "
        "WHERE hypertable_name = 'telemetries'"
    ).fetchone()
    assert chunks is not None and chunks[0] >= 3  # 20 days of data in 7-day chunks


def test_dry_run_flag_does_not_modify_database(
    db_url: str,
    conn: psycopg.Connection,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """--dry-run prints the steps and leaves extensions, constraints and tables as they were."""
    before = snapshot(conn)
    result = run(monkeypatch, capsys, db_url, "--dry-run")
    assert result.code == exitcodes.OK, result.err
    assert result.out.splitlines() == EXPECTED_STEPS
    assert snapshot(conn) == before
    assert has_primary_key(conn)
    assert not installed(conn)


@pytest.mark.timescaledb
def test_force_flag_bypasses_hypertable_check(
    db_url: str,
    conn: psycopg.Connection,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """--force runs the steps on an existing hypertable, restoring a removed policy, once."""
    assert run(monkeypatch, capsys, db_url).code == exitcodes.OK
    remove_retention(conn)
    result = run(monkeypatch, capsys, db_url, "--force")
    assert result.code == exitcodes.OK, result.err
    done = result.event("timescaledb_setup_done")
    assert done["forced"] is True
    # Steps 2 and 4 are already in place and skipped: TimescaleDB refuses both on a hypertable
    # with compression enabled; so are the aggregates (7, 8, 11, 12); the others are IF NOT
    # EXISTS and run.
    assert done["ran"] == FORCED_RAN
    assert "timescaledb_already_set_up" not in result.names()
    assert_fully_set_up(conn)  # exactly one job of each kind: the steps are idempotent


@pytest.mark.timescaledb
def test_force_with_compressed_chunks_succeeds(
    db_url: str,
    conn: psycopg.Connection,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """--force on a hypertable with compressed chunks succeeds and loses no reading."""
    readings = add_readings(conn, days=45)
    assert run(monkeypatch, capsys, db_url).code == exitcodes.OK
    compressed = conn.execute(
        "SELECT count(compress_chunk(c)) "
        "FROM show_chunks('telemetries', older_than => INTERVAL '30 days') c"
    ).fetchone()
    assert compressed is not None and compressed[0] >= 1
    result = run(monkeypatch, capsys, db_url, "--force")
    assert result.code == exitcodes.OK, result.err
    assert result.event("timescaledb_setup_done")["ran"] == FORCED_RAN
    assert_fully_set_up(conn)
    assert conn.execute("SELECT count(*) FROM telemetries").fetchone() == (readings,)


def test_dry_run_and_force_together(
    db_url: str,
    conn: psycopg.Connection,
    timescaledb_available: bool,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """--dry-run --force prints all the steps even for a hypertable, and still changes nothing."""
    if timescaledb_available:
        assert run(monkeypatch, capsys, db_url).code == exitcodes.OK
        remove_retention(conn)
    before = snapshot(conn)
    result = run(monkeypatch, capsys, db_url, "--dry-run", "--force")
    assert result.code == exitcodes.OK, result.err
    assert result.out.splitlines() == EXPECTED_STEPS
    assert snapshot(conn) == before
    if timescaledb_available:
        assert "policy_retention" not in policies(conn)


@pytest.mark.timescaledb
def test_command_with_no_flags(
    db_url: str,
    conn: psycopg.Connection,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Without flags the six steps run: hypertable, 7-day chunks, compression, both policies."""
    result = run(monkeypatch, capsys, db_url)
    assert result.code == exitcodes.OK, result.err
    assert_fully_set_up(conn)
    assert "hypertable" in result.out


# --- Extension checks (TestSetupTimescaleDBExtensionChecks) ----------------------------------


@pytest.mark.without_timescaledb
def test_extension_not_available_exits_with_error(
    db_url: str,
    conn: psycopg.Connection,
    timescaledb_available: bool,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Without the extension on the server: exit EXTENSION_UNAVAILABLE, one line, no change."""
    if timescaledb_available:
        skips.skip_for_timescaledb(
            "this server has TimescaleDB; the error path needs one without it"
        )
    before = snapshot(conn)
    result = run(monkeypatch, capsys, db_url)
    assert result.code == exitcodes.EXTENSION_UNAVAILABLE == 3
    lines = result.err.strip().splitlines()
    assert len(lines) == 1
    event = result.event("timescaledb_unavailable")
    assert event["level"] == "error"
    assert "pg_available_extensions" in event["detail"]
    assert "Traceback" not in result.err
    assert result.out == ""
    assert snapshot(conn) == before


@pytest.mark.timescaledb
def test_extension_available_but_not_installed_shows_notice(
    db_url: str,
    conn: psycopg.Connection,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Available but not installed: a notice says so, then step 1 installs it."""
    assert not installed(conn)
    result = run(monkeypatch, capsys, db_url)
    assert result.code == exitcodes.OK, result.err
    notice = result.event("timescaledb_not_installed")
    assert notice["level"] == "info"
    assert notice["available_version"]
    assert installed(conn)


@pytest.mark.timescaledb
def test_extension_already_installed_skips_notice(
    db_url: str,
    conn: psycopg.Connection,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """With the extension already installed there is no not-installed notice."""
    conn.execute("CREATE EXTENSION IF NOT EXISTS timescaledb")
    result = run(monkeypatch, capsys, db_url)
    assert result.code == exitcodes.OK, result.err
    assert "timescaledb_not_installed" not in result.names()
    assert_fully_set_up(conn)


# --- Hypertable checks (TestSetupTimescaleDBHypertableChecks) --------------------------------


@pytest.mark.timescaledb
def test_table_already_hypertable_exits_without_force(
    db_url: str,
    conn: psycopg.Connection,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """An existing hypertable makes the command exit 0 without running any step."""
    assert run(monkeypatch, capsys, db_url).code == exitcodes.OK
    remove_retention(conn)
    result = run(monkeypatch, capsys, db_url)
    assert result.code == exitcodes.OK, result.err
    result.event("timescaledb_already_set_up")
    assert "timescaledb_setup_done" not in result.names()
    assert "already a hypertable" in result.out
    assert "policy_retention" not in policies(conn)  # step 6 did not run


@pytest.mark.timescaledb
def test_table_not_yet_hypertable_proceeds_with_setup(
    db_url: str,
    conn: psycopg.Connection,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A plain telemetries table (extension installed or not) is converted."""
    conn.execute("CREATE EXTENSION IF NOT EXISTS timescaledb")
    assert not is_hypertable(conn)
    result = run(monkeypatch, capsys, db_url)
    assert result.code == exitcodes.OK, result.err
    result.event("timescaledb_setup_done")
    assert is_hypertable(conn)


# --- Dry run (TestSetupTimescaleDBDryRun) ----------------------------------------------------


def test_dry_run_shows_all_sql_steps_exactly(
    db_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """--dry-run prints the seed's six steps then the aggregates' eight, numbered, in order, and
    nothing else on stdout."""
    result = run(monkeypatch, capsys, db_url, "--dry-run")
    assert result.code == exitcodes.OK, result.err
    assert result.out.splitlines() == EXPECTED_STEPS
    assert result.event("timescaledb_dry_run")["steps"] == 16


def test_dry_run_shows_cleaned_sql_without_extra_whitespace(
    db_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Each printed step is one line: no comments, tabs, doubled spaces or padded parentheses."""
    result = run(monkeypatch, capsys, db_url, "--dry-run")
    lines = result.out.splitlines()
    assert len(lines) == 16
    for number, line in enumerate(lines, start=1):
        assert line.startswith(f"{number}. ")
        assert line == line.strip()
        assert "  " not in line and "\t" not in line and "--" not in line
        assert "( " not in line and " )" not in line
        assert line.endswith(";") and line.count(";") == 1


# --- Error handling (TestSetupTimescaleDBErrorHandling) --------------------------------------


def _break_step_3(conn: psycopg.Connection) -> None:
    # TimescaleDB refuses a unique index without the time column: create_hypertable fails.
    conn.execute("CREATE UNIQUE INDEX telemetries_id_only ON telemetries (id)")


@pytest.mark.timescaledb
def test_sql_steps_executed_in_atomic_transaction(
    db_url: str,
    conn: psycopg.Connection,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A failure at step 3 rolls steps 1 and 2 back: no extension, primary key still there."""
    _break_step_3(conn)
    before = snapshot(conn)
    result = run(monkeypatch, capsys, db_url)
    assert result.code == exitcodes.FAILURE
    failed = result.event("timescaledb_setup_failed")
    assert (failed["step"], failed["step_name"], failed["rolled_back"]) == (3, "hypertable", True)
    assert not installed(conn)
    assert has_primary_key(conn)
    assert snapshot(conn) == before


@pytest.mark.timescaledb
def test_database_error_shows_full_traceback_in_debug_mode(
    db_url: str,
    conn: psycopg.Connection,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A database error is one log line normally, and carries the traceback with --debug."""
    _break_step_3(conn)
    quiet = run(monkeypatch, capsys, db_url)
    assert quiet.code == exitcodes.FAILURE
    assert "Traceback" not in quiet.err
    errors = [e for e in quiet.events if e["level"] == "error"]
    assert [e["event"] for e in errors] == ["timescaledb_setup_failed"]
    assert "ts" in errors[0]["error"]
    assert len([line for line in quiet.err.splitlines() if "timescaledb_setup_failed" in line]) == 1

    loud = run(monkeypatch, capsys, db_url, "--debug")
    assert loud.code == exitcodes.FAILURE
    failed = loud.event("timescaledb_setup_failed")
    assert "Traceback (most recent call last)" in failed["exception"]
    assert "create_hypertable" in failed["exception"] or "psycopg" in failed["exception"]


def test_operational_error_during_execution_caught_and_reported(
    local_postgres: services.LocalPostgres,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A server that is down is reported in one line with CONNECTION_FAILED, no traceback."""
    dsn = psycopg.conninfo.make_conninfo(local_postgres.admin_dsn, dbname="iothub")
    local_postgres.stop()
    result = run(monkeypatch, capsys, dsn)
    assert result.code == exitcodes.CONNECTION_FAILED
    assert len(result.err.strip().splitlines()) == 1
    assert result.event("db_unavailable")["error"]
    assert "Traceback" not in result.err
    assert result.out == ""


@pytest.fixture
def telemetries_locked(db_url: str) -> Iterator[None]:
    """Another session holds an exclusive lock on telemetries until the test ends."""
    with psycopg.connect(db_url) as holder:
        holder.execute("LOCK TABLE telemetries IN ACCESS EXCLUSIVE MODE")
        yield
        holder.rollback()


@pytest.mark.timescaledb
def test_operational_error_mid_transaction_rolls_back(
    db_url: str,
    conn: psycopg.Connection,
    telemetries_locked: None,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A lock timeout in step 2 is an OperationalError: reported in one line, all rolled back."""
    dsn = psycopg.conninfo.make_conninfo(db_url, options="-c lock_timeout=300")
    result = run(monkeypatch, capsys, dsn)
    assert result.code == exitcodes.CONNECTION_FAILED
    failed = result.event("timescaledb_setup_failed")
    assert (failed["step"], failed["sqlstate"]) == (2, "55P03")
    assert "Traceback" not in result.err
    assert not installed(conn)


# --- Continuous aggregates (steps 7 .. 14) ----------------------------------------------------


def aggregate_jobs(conn: psycopg.Connection) -> list[tuple[str, str, bool]]:
    """The aggregates' background jobs: (view, proc, whether its intervals are the setup's)."""
    rows = conn.execute(
        """
        SELECT c.view_name::text, j.proc_name::text,
            CASE j.proc_name
            WHEN 'policy_retention'
            THEN (j.config ->> 'drop_after')::interval = INTERVAL '1825 days'
            ELSE (j.schedule_interval, (j.config ->> 'start_offset')::interval,
                  (j.config ->> 'end_offset')::interval)
                 = CASE c.view_name
                   WHEN 'telemetry_hourly'
                   THEN (INTERVAL '15 minutes', INTERVAL '3 days', INTERVAL '1 hour')
                   ELSE (INTERVAL '1 hour', INTERVAL '31 days', INTERVAL '1 day')
                   END
            END
        FROM timescaledb_information.jobs j
        -- The jobs view names an aggregate's jobs by the aggregate (2.x releases of the last
        -- years) or by its materialization hypertable (older ones): accept either.
        JOIN timescaledb_information.continuous_aggregates c
          ON (j.hypertable_schema, j.hypertable_name) IN (
              (c.view_schema, c.view_name),
              (c.materialization_hypertable_schema, c.materialization_hypertable_name))
        ORDER BY 1, 2
        """
    ).fetchall()
    return [(view, proc, bool(ok)) for view, proc, ok in rows]


@pytest.mark.timescaledb
def test_setup_replaces_the_views_by_continuous_aggregates(
    db_url: str,
    conn: psycopg.Connection,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Both plain views become real-time continuous aggregates with their refresh and
    retention policies, once each, and a --force rerun adds no second job."""
    add_readings(conn)
    assert run(monkeypatch, capsys, db_url).code == exitcodes.OK
    kinds = conn.execute(
        "SELECT view_name::text, materialized_only "
        "FROM timescaledb_information.continuous_aggregates ORDER BY 1"
    ).fetchall()
    # (2.x releases before 2.14 had a `finalized` column; every aggregate is finalized since.)
    assert kinds == [("telemetry_daily", False), ("telemetry_hourly", False)]
    expected = [
        ("telemetry_daily", "policy_refresh_continuous_aggregate", True),
        ("telemetry_daily", "policy_retention", True),
        ("telemetry_hourly", "policy_refresh_continuous_aggregate", True),
        ("telemetry_hourly", "policy_retention", True),
    ]
    assert aggregate_jobs(conn) == expected
    assert run(monkeypatch, capsys, db_url, "--force").code == exitcodes.OK
    assert aggregate_jobs(conn) == expected
    total = conn.execute("SELECT sum(readings) FROM telemetry_hourly").fetchone()
    assert total == (20 * 24,)


@pytest.mark.timescaledb
def test_history_outlives_the_first_run_of_the_refresh_policies(
    db_url: str,
    conn: psycopg.Connection,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Readings older than the refresh windows (20 days of history; windows of 3 and 31 days)
    are in the aggregates after the setup and stay there once each refresh policy has run: the
    setup materialized them (steps 15, 16) before the policies moved the watermark."""
    readings = add_readings(conn, days=45)
    result = run(monkeypatch, capsys, db_url)
    assert result.code == exitcodes.OK, result.err
    assert result.event("timescaledb_setup_done")["ran"][-2:] == [15, 16]
    jobs = conn.execute(
        "SELECT job_id FROM timescaledb_information.jobs "
        "WHERE proc_name = 'policy_refresh_continuous_aggregate' ORDER BY job_id"
    ).fetchall()
    assert len(jobs) == 2
    for (job,) in jobs:
        conn.execute("CALL run_job(%s)", (job,))
    for name in ("telemetry_hourly", "telemetry_daily"):
        total = conn.execute(
            sql.SQL("SELECT sum(readings), min(bucket) FROM {}").format(sql.Identifier(name))
        ).fetchone()
        assert total is not None
        assert total[0] == readings, name
        assert total[1] < datetime.now(UTC) - timedelta(days=44), name
    # Materialized, not answered from telemetries: the materialization holds the old buckets.
    for name, buckets in (("telemetry_hourly", 44 * 24), ("telemetry_daily", 44)):
        found = conn.execute(
            "SELECT materialization_hypertable_schema::text, materialization_hypertable_name::text "
            "FROM timescaledb_information.continuous_aggregates WHERE view_name = %s",
            (name,),
        ).fetchone()
        assert found is not None
        count = conn.execute(
            sql.SQL("SELECT count(*) FROM {} WHERE bucket < now() - INTERVAL '1 day'").format(
                sql.Identifier(*found)
            )
        ).fetchone()
        assert count is not None and count[0] >= buckets, name


@pytest.mark.timescaledb
def test_hypertable_without_aggregates_gets_them_from_a_plain_rerun(
    db_url: str,
    conn: psycopg.Connection,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A hypertable set up before the aggregates existed is not "already set up": a rerun
    without --force skips what is in place and creates the aggregates."""
    add_readings(conn)
    assert run(monkeypatch, capsys, db_url).code == exitcodes.OK
    # What an earlier release left: the hypertable and its policies, the plain views of 0010.
    conn.execute("DROP MATERIALIZED VIEW telemetry_hourly")
    conn.execute("DROP MATERIALIZED VIEW telemetry_daily")
    migration = resources.files("schema").joinpath("migrations/0010_telemetry_buckets.sql")
    conn.execute(migration.read_text(encoding="utf-8"))
    result = run(monkeypatch, capsys, db_url)
    assert result.code == exitcodes.OK, result.err
    assert "timescaledb_already_set_up" not in result.names()
    # 2 and 4 are in place; 1, 3, 5 and 6 are IF NOT EXISTS; every aggregate step runs.
    assert result.event("timescaledb_setup_done")["ran"] == [1, 3, 5, 6, *range(7, 17)]
    assert len(aggregate_jobs(conn)) == 4
    assert_fully_set_up(conn)


# --- Writes into compressed chunks ------------------------------------------------------------


def compressed_readings(
    db_url: str,
    conn: psycopg.Connection,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> list[tuple[int, datetime]]:
    """45 days of readings set up as a hypertable, the chunks older than 30 days compressed:
    three (device_metric_id, ts) stored in a compressed chunk, oldest first."""
    add_readings(conn, days=45)
    assert run(monkeypatch, capsys, db_url).code == exitcodes.OK
    conn.execute(
        "SELECT compress_chunk(c) FROM show_chunks('telemetries', older_than => INTERVAL "
        "'30 days') c"
    )
    old = conn.execute(
        "SELECT device_metric_id, ts FROM telemetries WHERE ts < now() - INTERVAL '35 days' "
        "ORDER BY ts LIMIT 3"
    ).fetchall()
    assert len(old) == 3
    return [(int(dm), ts) for dm, ts in old]


def assert_stored_compressed(conn: psycopg.Connection, binding: int, fresh: list[datetime]) -> None:
    """The `fresh` readings (value 1000) are stored with their generated column, and their
    chunk is still compressed."""
    # timescale/timescaledb#9314: some releases left generated columns NULL on rows inserted
    # into compressed chunks, which every min/max/avg over value_numeric would miss.
    computed = conn.execute(
        "SELECT value_numeric FROM telemetries WHERE device_metric_id = %s AND ts = ANY(%s)",
        (binding, fresh),
    ).fetchall()
    assert computed == [(1000,)] * 3
    chunk = conn.execute(
        "SELECT is_compressed FROM timescaledb_information.chunks "
        "WHERE hypertable_name = 'telemetries' AND %s >= range_start AND %s < range_end",
        (fresh[0], fresh[0]),
    ).fetchone()
    assert chunk == (True,)


@pytest.mark.timescaledb
def test_insert_on_conflict_into_a_compressed_chunk(
    db_url: str,
    conn: psycopg.Connection,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A backfill into a compressed chunk through the writer's own statements (staging table,
    COPY, the INSERT ... ON CONFLICT DO NOTHING in a writable CTE that returns the new rows'
    places) stores the new readings and drops the duplicates, and the chunk stays compressed."""
    old = compressed_readings(db_url, conn, monkeypatch, capsys)
    binding = old[0][0]
    fresh = [ts + timedelta(minutes=30) for _, ts in old]  # between two hourly readings
    rows = [(binding, ts, '{"t":"numeric","v":-1}') for _, ts in old]  # duplicates
    rows += [(binding, ts, '{"t":"numeric","v":1000}') for ts in fresh]
    before = conn.execute("SELECT count(*) FROM telemetries").fetchone()
    assert before is not None
    with conn.transaction(), conn.cursor() as cur:
        cur.execute(writer.queries["create_staging"])
        writer.stage(cur, [(n, *row) for n, row in enumerate(rows)])
        stored = cur.execute(writer.queries["insert_from_staging"]).fetchall()
    assert sorted(n for (n,) in stored) == [3, 4, 5]  # the places of the fresh readings
    assert conn.execute("SELECT count(*) FROM telemetries").fetchone() == (before[0] + 3,)
    kept = conn.execute(
        "SELECT count(*) FROM telemetries WHERE ts = ANY(%s) AND value_jsonb ->> 'v' = '-1'",
        ([ts for _, ts in old],),
    ).fetchone()
    assert kept == (0,)  # the stored readings were not overwritten
    assert_stored_compressed(conn, binding, fresh)


@pytest.mark.timescaledb
def test_direct_copy_into_a_compressed_chunk(
    db_url: str,
    conn: psycopg.Connection,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The writer's direct COPY (ingestor.writer.copy_telemetries, binary): into a compressed
    chunk, a reading already stored refuses the whole COPY with a unique violation (the writer
    then goes the staging way), and new readings are stored with their generated columns."""
    old = compressed_readings(db_url, conn, monkeypatch, capsys)
    binding = old[0][0]
    fresh = [ts + timedelta(minutes=30) for _, ts in old]
    new_rows = [(binding, ts, '{"t":"numeric","v":1000}') for ts in fresh]
    before = conn.execute("SELECT count(*) FROM telemetries").fetchone()
    assert before is not None
    with conn.transaction():
        with (
            pytest.raises(psycopg.errors.UniqueViolation),
            conn.transaction(),
            conn.cursor() as cur,
        ):
            writer.copy_telemetries(
                cur, [*new_rows, (binding, old[1][1], '{"t":"numeric","v":-1}')]
            )
        with conn.cursor() as cur:
            writer.copy_telemetries(cur, new_rows)
    assert conn.execute("SELECT count(*) FROM telemetries").fetchone() == (before[0] + 3,)
    assert_stored_compressed(conn, binding, fresh)


def test_dry_run_shows_the_aggregate_settings(
    db_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The aggregate_* settings are what steps 9, 10, 13 and 14 print (and run), in whole
    units; the other steps do not change."""
    monkeypatch.setenv("IOTHUB_AGGREGATE_HOURLY_REFRESH_INTERVAL", "600")
    monkeypatch.setenv("IOTHUB_AGGREGATE_HOURLY_REFRESH_WINDOW", "172800")
    monkeypatch.setenv("IOTHUB_AGGREGATE_DAILY_REFRESH_INTERVAL", "7200")
    monkeypatch.setenv("IOTHUB_AGGREGATE_DAILY_REFRESH_WINDOW", "5184000")
    monkeypatch.setenv("IOTHUB_AGGREGATE_RETENTION", "315360000")
    result = run(monkeypatch, capsys, db_url, "--dry-run")
    assert result.code == exitcodes.OK, result.err
    lines = result.out.splitlines()
    changed = {8, 9, 12, 13}  # list indexes of steps 9, 10, 13 and 14
    assert [x for i, x in enumerate(lines) if i not in changed] == [
        x for i, x in enumerate(EXPECTED_STEPS) if i not in changed
    ]
    assert "start_offset => INTERVAL '2 days'" in lines[8]
    assert "schedule_interval => INTERVAL '10 minutes'" in lines[8]
    assert lines[9] == (
        "10. SELECT add_retention_policy('telemetry_hourly', INTERVAL '3650 days', "
        "if_not_exists => true);"
    )
    assert "start_offset => INTERVAL '60 days'" in lines[12]
    assert "schedule_interval => INTERVAL '2 hours'" in lines[12]
    assert "INTERVAL '3650 days'" in lines[13]
