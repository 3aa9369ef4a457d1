"""`iothub query stats`: one device's hourly and daily buckets, read from `telemetry_hourly` /
`telemetry_daily` — plain views over `telemetries` (migration 0010) on any server, continuous
aggregates of the same names and columns once `iothub setup-timescaledb` has run.

The tests without a marker run on both kinds of server; the plan test needs TimescaleDB and is
skipped through skips.skip_for_timescaledb() where it is missing."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
from psycopg import sql
from psycopg.types.json import Jsonb

from iothub import exitcodes
from iothub.cli import main as cli
from iothub.cli import query
from tests.support import skips

COLUMNS = [
    ("device_metric_id", "integer"),
    ("bucket", "timestamp with time zone"),
    ("readings", "bigint"),
    ("value_min", "numeric"),
    ("value_max", "numeric"),
    ("value_avg", "numeric"),
    ("value_last", "jsonb"),
    ("ts_last", "timestamp with time zone"),
]
HEADERS = [
    "metric",
    "bucket",
    "readings",
    "value_min",
    "value_max",
    "value_avg",
    "value_last",
    "ts_last",
]
# Ten days back, at midnight UTC: recent enough that on TimescaleDB no retention job drops it
# (a fixed date would fall out of the 1-year retention one day), old enough that no refresh
# policy's window reaches it, so only the test's own refresh materializes it.
DAY = (datetime.now(UTC) - timedelta(days=10)).replace(hour=0, minute=0, second=0, microsecond=0)
D = DAY.date().isoformat()  # e.g. 2026-01-10
NEXT = (DAY + timedelta(days=1)).date().isoformat()


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
    def rows(self) -> list[list[str]]:
        """The table's data rows, cells stripped (without title, header, rule, count line)."""
        return [[c.strip() for c in line.split("|")] for line in self.out.splitlines()[3:-1]]

    def event(self, name: str) -> dict[str, Any]:
        found = [json.loads(x) for x in self.err.splitlines() if x.startswith("{")]
        matches: list[dict[str, Any]] = [e for e in found if e["event"] == name]
        assert len(matches) == 1, self.err
        return matches[0]


def run(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], dsn: str, *argv: str
) -> Run:
    monkeypatch.setenv("IOTHUB_DATABASE_URL", dsn)
    monkeypatch.setenv("IOTHUB_LOG_FORMAT", "json")
    capsys.readouterr()
    code = cli.main(list(argv))
    captured = capsys.readouterr()
    return Run(code, captured.out, captured.err)


def binding(conn: psycopg.Connection, serial: str, metric: str, data_type: str) -> int:
    row = conn.execute(
        """
        WITH d AS (
            INSERT INTO devices (serial_id, name) VALUES (%(serial)s, 'stats device')
            ON CONFLICT (serial_id) DO UPDATE SET name = excluded.name RETURNING id
        ), m AS (
            INSERT INTO metrics (metric_type, data_type) VALUES (%(metric)s, %(data_type)s)
            RETURNING id
        )
        INSERT INTO device_metrics (device_id, metric_id) SELECT d.id, m.id FROM d, m
        RETURNING id
        """,
        {"serial": serial, "metric": metric, "data_type": data_type},
    ).fetchone()
    assert row is not None
    return int(row[0])


def insert(
    conn: psycopg.Connection, device_metric_id: int, readings: list[tuple[int, object]]
) -> None:
    """Readings at DAY 10:00 UTC plus the given minutes; values keep their JSON type."""
    tags = {float: "numeric", bool: "boolean", str: "str"}
    with conn.cursor() as cur:
        cur.executemany(
            "INSERT INTO telemetries (device_metric_id, ts, value_jsonb) VALUES (%s, %s, %s)",
            [
                (
                    device_metric_id,
                    DAY + timedelta(hours=10, minutes=minutes),
                    Jsonb({"t": tags[type(value)], "v": value}),
                )
                for minutes, value in readings
            ],
        )


@pytest.fixture
def small(conn: psycopg.Connection) -> dict[str, int]:
    """SN-STATS-1 with a numeric metric (4 readings over two hours) and a boolean one (2)."""
    temp = binding(conn, "SN-STATS-1", "stats_temp", "numeric")
    door = binding(conn, "SN-STATS-1", "stats_door", "boolean")
    insert(conn, temp, [(5, 1.5), (20, 3.5), (50, 2.25), (60, 7.0)])
    insert(conn, door, [(10, True), (40, False)])
    # Another device's readings in the same hours must not be counted.
    other = binding(conn, "SN-STATS-2", "stats_other", "numeric")
    insert(conn, other, [(5, 100.0), (15, 200.0)])
    return {"temp": temp, "door": door}


WINDOW = ["--since", f"{D}T00:00:00Z", "--until", f"{NEXT}T00:00:00Z"]


def test_views_have_the_aggregates_columns(conn: psycopg.Connection) -> None:
    """Both names carry the eight columns the continuous aggregates have, in their order."""
    for name in ("telemetry_hourly", "telemetry_daily"):
        found = conn.execute(
            "SELECT column_name::text, data_type::text FROM information_schema.columns "
            "WHERE table_schema = current_schema() AND table_name = %s ORDER BY ordinal_position",
            (name,),
        ).fetchall()
        assert found == COLUMNS, name


def test_hourly_stats_of_one_device(
    db_url: str,
    small: dict[str, int],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Hourly buckets per metric: counts, min/max/avg for numbers only, the newest value."""
    result = run(monkeypatch, capsys, db_url, "query", "stats", "--device", "SN-STATS-1", *WINDOW)
    assert result.code == exitcodes.OK, result.err
    lines = result.out.splitlines()
    assert lines[0].startswith("SN-STATS-1 (stats device, device ")
    assert "telemetry_hourly" in lines[0]
    assert [c.strip() for c in lines[1].split("|")] == HEADERS
    assert lines[-1] == "(3 rows)"
    assert result.rows == [
        ["stats_door", f"{D} 10:00:00+00:00", "2", "", "", "", "false",
         f"{D} 10:40:00+00:00"],
        ["stats_temp", f"{D} 10:00:00+00:00", "3", "1.5", "3.5", "2.416667", "2.25",
         f"{D} 10:50:00+00:00"],
        ["stats_temp", f"{D} 11:00:00+00:00", "1", "7.0", "7.0", "7", "7.0",
         f"{D} 11:00:00+00:00"],
    ]  # fmt: skip


def test_daily_stats_of_one_metric(
    db_url: str,
    small: dict[str, int],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """--bucket day --metric: one row for the day, over all four readings of that metric."""
    result = run(
        monkeypatch, capsys, db_url, "query", "stats", "--device", "SN-STATS-1",
        "--metric", "STATS_TEMP", "--bucket", "day", *WINDOW,
    )  # fmt: skip
    assert result.code == exitcodes.OK, result.err
    assert "telemetry_daily" in result.out.splitlines()[0]
    assert result.rows == [
        ["stats_temp", f"{D} 00:00:00+00:00", "4", "1.5", "7.0", "3.5625", "7.0",
         f"{D} 11:00:00+00:00"],
    ]  # fmt: skip


def test_until_is_exclusive_and_buckets_are_utc(
    db_url: str,
    small: dict[str, int],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A bucket starting at --until is left out; an offset in --since is honoured."""
    result = run(
        monkeypatch, capsys, db_url, "query", "stats", "--device", "SN-STATS-1",
        "--metric", "stats_temp", "--since", f"{D}T12:00:00+02:00",
        "--until", f"{D}T11:00:00Z",
    )  # fmt: skip
    assert result.code == exitcodes.OK, result.err
    assert [row[:3] for row in result.rows] == [["stats_temp", f"{D} 10:00:00+00:00", "3"]]


def test_stats_refuses_bad_input_in_one_line(
    db_url: str,
    small: dict[str, int],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """An unknown device or metric exits 1 with an event; a bad period is a usage error (2)."""
    unknown = run(monkeypatch, capsys, db_url, "query", "stats", "--device", "SN-NOPE", *WINDOW)
    assert unknown.code == exitcodes.FAILURE
    assert "SN-NOPE" in unknown.event("query_target_not_found")["error"]
    metric = run(
        monkeypatch, capsys, db_url, "query", "stats", "--device", "SN-STATS-1",
        "--metric", "humidity",
    )  # fmt: skip
    assert metric.code == exitcodes.FAILURE
    assert "humidity" in metric.event("query_target_not_found")["error"]
    backwards = run(
        monkeypatch, capsys, db_url, "query", "stats", "--device", "SN-STATS-1",
        "--since", f"{NEXT}T00:00:00Z", "--until", f"{D}T00:00:00Z",
    )  # fmt: skip
    assert backwards.code == exitcodes.USAGE
    assert "--since must be before --until" in backwards.err
    garbage = run(
        monkeypatch, capsys, db_url, "query", "stats", "--device", "SN-STATS-1",
        "--since", "yesterday'; DROP TABLE telemetries; --",
    )  # fmt: skip
    assert garbage.code == exitcodes.USAGE
    assert "not an ISO 8601 time" in garbage.err


def test_default_period_is_the_last_day(
    db_url: str,
    conn: psycopg.Connection,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Without --since/--until, hourly stats cover the last 24 hours: older buckets are left out."""
    temp = binding(conn, "SN-STATS-3", "stats_recent", "numeric")
    now = datetime.now(UTC)
    conn.execute(
        "INSERT INTO telemetries (device_metric_id, ts, value_jsonb) VALUES "
        "(%s, %s, %s), (%s, %s, %s)",
        (
            temp, now - timedelta(hours=2), Jsonb({"t": "numeric", "v": 1}),
            temp, now - timedelta(hours=30), Jsonb({"t": "numeric", "v": 2}),
        ),
    )  # fmt: skip
    result = run(monkeypatch, capsys, db_url, "query", "stats", "--device", "SN-STATS-3")
    assert result.code == exitcodes.OK, result.err
    assert [(row[2], row[6]) for row in result.rows] == [("1", "1")]


# --- On TimescaleDB: the same answers from continuous aggregates, read from materialization ---


def setup_timescaledb(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], dsn: str
) -> None:
    result = run(monkeypatch, capsys, dsn, "setup-timescaledb")
    assert result.code == exitcodes.OK, result.err


@pytest.mark.timescaledb
def test_stats_are_the_same_after_setup_timescaledb(
    db_url: str,
    conn: psycopg.Connection,
    small: dict[str, int],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The continuous aggregates answer exactly as the plain views did, right after the setup
    (its history refresh, steps 15 and 16, and real-time aggregation above it) and after a
    refresh of everything."""
    argv = ["query", "stats", "--device", "SN-STATS-1", *WINDOW]
    daily = [*argv, "--bucket", "day"]
    before = (run(monkeypatch, capsys, db_url, *argv), run(monkeypatch, capsys, db_url, *daily))
    setup_timescaledb(monkeypatch, capsys, db_url)
    kinds = conn.execute(
        "SELECT view_name::text, materialized_only "
        "FROM timescaledb_information.continuous_aggregates ORDER BY 1"
    ).fetchall()
    assert kinds == [("telemetry_daily", False), ("telemetry_hourly", False)]
    after_setup = (
        run(monkeypatch, capsys, db_url, *argv),
        run(monkeypatch, capsys, db_url, *daily),
    )
    for name in ("telemetry_hourly", "telemetry_daily"):
        conn.execute(
            sql.SQL("CALL refresh_continuous_aggregate({}, NULL, NULL)").format(sql.Literal(name))
        )
    refreshed = (run(monkeypatch, capsys, db_url, *argv), run(monkeypatch, capsys, db_url, *daily))
    for want, *got in zip(before, after_setup, refreshed, strict=True):
        assert want.code == exitcodes.OK and want.rows
        assert [g.rows for g in got] == [want.rows, want.rows]
    test_views_have_the_aggregates_columns(conn)


def plan_nodes(plan: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield plan
    for child in plan.get("Plans", []):
        yield from plan_nodes(child)


def chunk_names(conn: psycopg.Connection, hypertable: str) -> set[str]:
    rows = conn.execute(
        "SELECT chunk_name::text FROM timescaledb_information.chunks WHERE hypertable_name = %s",
        (hypertable,),
    ).fetchall()
    return {row[0] for row in rows} | {hypertable}


@pytest.mark.timescaledb
def test_stats_read_the_materialization_not_telemetries(
    db_url: str,
    conn: psycopg.Connection,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """On 200,000 readings, once refreshed, `query stats` reads its rows from the hourly
    aggregate's materialization hypertable and not one row from `telemetries`' chunks."""
    devices = 20
    per_device = 10_000  # one a minute: about a week each, 200,000 in all
    ids = [
        binding(conn, f"SN-PLAN-{n:02d}", f"plan_metric_{n:02d}", "numeric") for n in range(devices)
    ]
    start = datetime.now(UTC).replace(second=0, microsecond=0) - timedelta(days=8)
    conn.execute(
        """
        INSERT INTO telemetries (device_metric_id, ts, value_jsonb)
        SELECT dm, %(start)s + n * INTERVAL '1 minute',
               jsonb_build_object('t', 'numeric', 'v', n %% 97)
        FROM unnest(%(ids)s::int[]) AS dm, generate_series(0, %(per)s - 1) AS n
        """,
        {"start": start, "ids": ids, "per": per_device},
    )
    assert conn.execute("SELECT count(*) FROM telemetries").fetchone() == (devices * per_device,)
    setup_timescaledb(monkeypatch, capsys, db_url)
    conn.execute("CALL refresh_continuous_aggregate('telemetry_hourly', NULL, NULL)")
    conn.execute("ANALYZE telemetries")
    row = conn.execute(
        "SELECT materialization_hypertable_name::text "
        "FROM timescaledb_information.continuous_aggregates WHERE view_name = 'telemetry_hourly'"
    ).fetchone()
    assert row is not None
    materialized = chunk_names(conn, row[0])
    raw = chunk_names(conn, "telemetries")
    statement = sql.SQL(query.queries["bucket_stats"]).format(
        aggregate=sql.Identifier("telemetry_hourly")
    )
    since = start - timedelta(days=1)
    params = {"ids": [ids[0]], "since": since, "until": datetime.now(UTC)}
    explained = conn.execute(sql.SQL("EXPLAIN (ANALYZE, FORMAT JSON) ") + statement, params)
    found = explained.fetchone()
    assert found is not None
    nodes = list(plan_nodes(found[0][0]["Plan"]))

    def rows_from(relations: set[str]) -> int:
        """Rows the scans of these relations read: returned, or read and filtered out."""
        return sum(
            (
                int(n.get("Actual Rows", 0))
                + int(n.get("Rows Removed by Filter", 0))
                + int(n.get("Rows Removed by Index Recheck", 0))
            )
            * max(int(n.get("Actual Loops", 1)), 1)
            for n in nodes
            if n.get("Relation Name") in relations
        )

    assert rows_from(materialized) > 0, nodes
    assert rows_from(raw) == 0, nodes
    printed = run(
        monkeypatch, capsys, db_url, "query", "stats", "--device", "SN-PLAN-00",
        "--since", since.isoformat(),
    )  # fmt: skip
    assert printed.code == exitcodes.OK, printed.err
    assert sum(int(row[2]) for row in printed.rows) == per_device


def test_plain_views_read_one_binding_through_the_index(conn: psycopg.Connection) -> None:
    """Without TimescaleDB, the bucket query's device_metric_id filter is pushed into the view:
    on 100,000 readings it reaches telemetries through an index, never a sequential scan."""
    ids = [binding(conn, f"SN-IDX-{n:02d}", f"idx_metric_{n:02d}", "numeric") for n in range(20)]
    start = datetime.now(UTC) - timedelta(days=5)
    conn.execute(
        """
        INSERT INTO telemetries (device_metric_id, ts, value_jsonb)
        SELECT dm, %(start)s + n * INTERVAL '1 minute',
               jsonb_build_object('t', 'numeric', 'v', n %% 97)
        FROM unnest(%(ids)s::int[]) AS dm, generate_series(0, 4999) AS n
        """,
        {"start": start, "ids": ids},
    )
    conn.execute("ANALYZE telemetries")
    statement = sql.SQL(query.queries["bucket_stats"]).format(
        aggregate=sql.Identifier("telemetry_hourly")
    )
    params = {"ids": [ids[0]], "since": start, "until": datetime.now(UTC)}
    found = conn.execute(sql.SQL("EXPLAIN (FORMAT JSON) ") + statement, params).fetchone()
    assert found is not None
    nodes = [n for n in plan_nodes(found[0][0]["Plan"]) if n.get("Relation Name") == "telemetries"]
    assert nodes, found
    assert not [n for n in nodes if n["Node Type"] == "Seq Scan"], nodes
    assert {n["Node Type"] for n in nodes} <= {"Index Scan", "Index Only Scan", "Bitmap Heap Scan"}
