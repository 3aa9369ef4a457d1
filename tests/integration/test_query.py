"""`iothub query last|recent`: the seed's two example queries as aligned tables, and their plans
on a table large enough for the planner to care (200,000 readings)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import psycopg
import pytest

from iothub import exitcodes
from iothub.cli import main as cli
from iothub.cli import query

ROWS = 200_000
BINDINGS = 50  # 25 devices x 2 metrics


@dataclass(frozen=True)
class Run:
    code: int
    out: str
    err: str

    @property
    def table(self) -> list[str]:
        """The table lines: header, rule, rows (without the title and the count line)."""
        return self.out.splitlines()[1:-1]


def run(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], dsn: str, *argv: str
) -> Run:
    monkeypatch.setenv("IOTHUB_DATABASE_URL", dsn)
    monkeypatch.setenv("IOTHUB_LOG_FORMAT", "json")
    capsys.readouterr()
    code = cli.main(["query", *argv])
    captured = capsys.readouterr()
    return Run(code, captured.out, captured.err)


@pytest.fixture
def seeded_db(db_url: str, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("IOTHUB_DATABASE_URL", db_url)
    monkeypatch.setenv("IOTHUB_LOG_FORMAT", "json")
    assert cli.main(["seed"]) == exitcodes.OK
    return db_url


def assert_aligned(lines: list[str]) -> None:
    """Every line of the table puts its column separators at the same places."""
    header, rule, *rows = lines
    bars = [i for i, c in enumerate(header) if c == "|"]
    assert bars, header
    assert [i for i, c in enumerate(rule) if c == "+"] == bars
    for row in rows:
        assert [i for i, c in enumerate(row) if c == "|"] == bars, row


def test_last_prints_the_newest_readings(
    seeded_db: str,
    conn: psycopg.Connection,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`query last` prints the binding's newest readings, newest first, with a count line."""
    result = run(
        monkeypatch,
        capsys,
        seeded_db,
        "last",
        "--device",
        "SN-A1-TEMP-0001",
        "--metric",
        "temperature",
        "--limit",
        "5",
    )
    assert result.code == exitcodes.OK, result.err
    lines = result.out.splitlines()
    assert lines[0].startswith("SN-A1-TEMP-0001 / temperature (device metric ")
    assert lines[-1] == "(5 rows)"
    assert [c.strip() for c in result.table[0].split("|")] == [
        "ts",
        "value_numeric",
        "value_bool",
        "value_str",
    ]
    assert_aligned(result.table)
    expected = conn.execute(
        """
        SELECT t.ts, t.value_numeric FROM telemetries t
        JOIN device_metrics dm ON dm.id = t.device_metric_id
        JOIN devices d ON d.id = dm.device_id JOIN metrics m ON m.id = dm.metric_id
        WHERE d.serial_id = 'SN-A1-TEMP-0001' AND m.metric_type = 'temperature'
        ORDER BY t.ts DESC LIMIT 5
        """
    ).fetchall()
    printed = [[c.strip() for c in row.split("|")] for row in result.table[2:]]
    assert printed == [[ts.isoformat(sep=" "), str(v), "", ""] for ts, v in expected]


def test_last_by_device_metric_id_matches_last_by_names(
    seeded_db: str,
    conn: psycopg.Connection,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """--device-metric ID and --device/--metric name the same binding and print the same rows."""
    row = conn.execute(
        "SELECT dm.id FROM device_metrics dm JOIN devices d ON d.id = dm.device_id "
        "JOIN metrics m ON m.id = dm.metric_id "
        "WHERE d.serial_id = 'SN-B1-STAT-0102' AND m.metric_type = 'status'"
    ).fetchone()
    assert row is not None
    by_id = run(monkeypatch, capsys, seeded_db, "last", "--device-metric", str(row[0]))
    by_names = run(
        monkeypatch, capsys, seeded_db, "last", "--device", "SN-B1-STAT-0102", "--metric", "STATUS"
    )
    assert by_id.code == by_names.code == exitcodes.OK
    assert by_id.out == by_names.out
    assert by_id.out.splitlines()[-1] == "(100 rows)"  # the seed's default limit
    assert all(line.rstrip().endswith("OK") or "ERROR" in line for line in by_id.table[2:])


def test_recent_prints_one_devices_last_hours(
    seeded_db: str,
    conn: psycopg.Connection,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`query recent` prints every reading of the device in the window, by serial or by id."""

    def in_window() -> tuple[int, int]:
        row = conn.execute(
            "SELECT count(*), min(d.id) FROM telemetries t "
            "JOIN device_metrics dm ON dm.id = t.device_metric_id "
            "JOIN devices d ON d.id = dm.device_id "
            "WHERE d.serial_id = 'SN-B1-MOT-0101' AND t.ts >= now() - interval '2 hours'"
        ).fetchone()
        assert row is not None
        return int(row[0]), int(row[1])

    def printed(result: Run) -> int:
        last = result.out.splitlines()[-1]
        assert last.startswith("(") and last.endswith(" rows)"), last
        return int(last[1:].split()[0])

    # The window slides while the test runs: a reading can leave it, none can enter.
    before, device_id = in_window()
    by_serial = run(
        monkeypatch, capsys, seeded_db, "recent", "--device", "SN-B1-MOT-0101", "--hours", "2"
    )
    by_id = run(
        monkeypatch, capsys, seeded_db, "recent", "--device", str(device_id), "--hours", "2"
    )
    after, _ = in_window()
    assert by_serial.code == by_id.code == exitcodes.OK, by_serial.err
    assert after > 0
    assert before >= printed(by_serial) >= printed(by_id) >= after
    assert [c.strip() for c in by_serial.table[0].split("|")] == [
        "serial_id",
        "device_name",
        "metric_type",
        "ts",
        "value_numeric",
        "value_bool",
        "value_str",
    ]
    assert_aligned(by_serial.table)
    assert {row.split("|")[2].strip() for row in by_serial.table[2:]} == {
        "motion_detected",
        "online",
    }
    assert {row.split("|")[0].strip() for row in by_id.table[2:]} == {"SN-B1-MOT-0101"}


def test_unknown_target_and_missing_arguments(
    seeded_db: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """An unknown device fails with one log line; `last` without a target is a usage error."""
    unknown = run(monkeypatch, capsys, seeded_db, "recent", "--device", "SN-NOPE")
    assert unknown.code == exitcodes.FAILURE
    assert json.loads(unknown.err.strip())["event"] == "query_target_not_found"
    assert run(monkeypatch, capsys, seeded_db, "last").code == exitcodes.USAGE
    half = run(monkeypatch, capsys, seeded_db, "last", "--device", "SN-A1-TEMP-0001")
    assert half.code == exitcodes.USAGE


def test_render_table_handles_empty_results() -> None:
    """No rows still prints the header, the rule and "(0 rows)"."""
    assert query.render_table(["ts", "value"], []) == ["ts | value", "---+------", "(0 rows)"]


# --- plans at scale --------------------------------------------------------------------------


@pytest.fixture
def big_table(conn: psycopg.Connection) -> Iterator[dict[str, int]]:
    """200,000 readings: 50 bindings over 60 days, then ANALYZE."""
    conn.execute(
        "INSERT INTO metrics (metric_type, data_type) VALUES ('a', 'numeric'), ('b', 'numeric')"
    )
    conn.execute(
        "INSERT INTO devices (serial_id, name) "
        "SELECT 'SN-BIG-' || lpad(g::text, 4, '0'), 'big ' || g FROM generate_series(1, 25) g"
    )
    conn.execute(
        "INSERT INTO device_metrics (device_id, metric_id) SELECT d.id, m.id "
        "FROM devices d CROSS JOIN metrics m"
    )
    per_binding = ROWS // BINDINGS
    conn.execute(
        """
        INSERT INTO telemetries (device_metric_id, ts, value_jsonb)
        SELECT dm.id,
               now() - (g * INTERVAL '1 day' * 60 / %(n)s),
               jsonb_build_object('t', 'numeric', 'v', (g %% 1000) / 10.0)
        FROM device_metrics dm CROSS JOIN generate_series(1, %(n)s) g
        """,
        {"n": per_binding},
    )
    conn.execute("ANALYZE")
    ids = conn.execute(
        "SELECT min(dm.id), min(dm.device_id) FROM device_metrics dm "
        "JOIN devices d ON d.id = dm.device_id WHERE d.serial_id = 'SN-BIG-0007'"
    ).fetchone()
    assert ids is not None
    count = conn.execute("SELECT count(*) FROM telemetries").fetchone()
    assert count == (ROWS,)
    yield {"device_metric_id": ids[0], "device_id": ids[1]}


def plan_nodes(plan: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield plan
    for child in plan.get("Plans", []):
        yield from plan_nodes(child)


def explain(conn: psycopg.Connection, name: str, params: dict[str, Any]) -> list[dict[str, Any]]:
    row = conn.execute("EXPLAIN (FORMAT JSON) " + query.queries[name], params).fetchone()
    assert row is not None
    return list(plan_nodes(row[0][0]["Plan"]))


@pytest.mark.parametrize(
    ("name", "params"),
    [
        ("last_readings", {"limit": 100}),
        ("recent_readings", {"hours": 24.0}),
    ],
)
def test_queries_use_an_index_at_scale(
    conn: psycopg.Connection, big_table: dict[str, int], name: str, params: dict[str, Any]
) -> None:
    """On 200,000 readings both queries reach telemetries through an index, never a Seq Scan."""
    key = "device_metric_id" if name == "last_readings" else "device_id"
    nodes = explain(conn, name, {**params, key: big_table[key]})
    on_telemetries = [n for n in nodes if n.get("Relation Name") == "telemetries"]
    assert on_telemetries, nodes
    assert not [n for n in on_telemetries if n["Node Type"] == "Seq Scan"]
    assert any(
        n["Node Type"] in ("Index Scan", "Index Only Scan", "Bitmap Heap Scan")
        for n in on_telemetries
    )
    used = {n.get("Index Name") for n in nodes if "Index Name" in n}
    assert used & {"unique_telemetry_per_metric_time", "idx_telemetries_timestamp"}, used
    if name == "last_readings":
        # Newest first straight off an index (which one depends on how the bindings' rows are
        # spread over the heap), never by sorting the binding's whole history.
        assert "Sort" not in {n["Node Type"] for n in nodes}
