"""`iothub seed`: the development data set, idempotent, refusing to overwrite changed rows unless
--force, and never touching rows it did not create."""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import psycopg
import pytest
from psycopg.types.json import Jsonb

from iothub import exitcodes
from iothub.cli import main as cli
from iothub.devtools.seed import data as seed_data
from iothub.devtools.seed import dataset as seed
from iothub.devtools.seed import passwords

SEEDED_COUNTS = {"users": 3, "metrics": 7, "devices": 7, "device_metrics": 11, "rules": 11}


@dataclass(frozen=True)
class Run:
    code: int
    out: str
    err: str

    def events(self, name: str) -> list[dict[str, Any]]:
        found = [json.loads(line) for line in self.err.splitlines() if line.startswith("{")]
        return [e for e in found if e["event"] == name]


def run(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], dsn: str, *argv: str
) -> Run:
    monkeypatch.setenv("IOTHUB_DATABASE_URL", dsn)
    monkeypatch.setenv("IOTHUB_LOG_FORMAT", "json")
    capsys.readouterr()
    code = cli.main(["seed", *argv])
    captured = capsys.readouterr()
    return Run(code, captured.out, captured.err)


def counts(conn: psycopg.Connection) -> dict[str, int]:
    tables = [*SEEDED_COUNTS, "events", "telemetries", "rule_states", "action_outbox"]
    result = {}
    for table in tables:
        row = conn.execute(f"SELECT count(*) FROM {table}").fetchone()
        assert row is not None
        result[table] = row[0]
    return result


def fingerprint(conn: psycopg.Connection) -> dict[str, str]:
    """An md5 per table over every column of every row (ids and timestamps included)."""
    result = {}
    for table, order in (
        ("users", "id"),
        ("devices", "id"),
        ("metrics", "id"),
        ("device_metrics", "id"),
        ("rules", "id"),
        ("events", "id"),
        ("telemetries", "device_metric_id, ts"),
    ):
        row = conn.execute(
            f"SELECT md5(coalesce(string_agg(t::text, '|' ORDER BY {order}), '')) FROM {table} AS t"
        ).fetchone()
        assert row is not None
        result[table] = row[0]
    return result


def seeded(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], dsn: str) -> None:
    result = run(monkeypatch, capsys, dsn)
    assert result.code == exitcodes.OK, result.err


# --- the data set itself ---------------------------------------------------------------------


def test_data_set_is_consistent() -> None:
    """Every user, device, binding, rule and incident of the data set refers to what exists."""
    assert seed.spec_problems() == []


@pytest.mark.parametrize("zone", ["UTC", "Europe/Berlin", "America/Los_Angeles", "Asia/Kolkata"])
@pytest.mark.parametrize("hour", [0, 5, 11, 17, 23])
def test_every_incident_fires_exactly_one_event(zone: str, hour: int) -> None:
    """Whatever the time of the run and the time zone, the rules fire once per incident."""
    end = datetime(2026, 3, 29, hour, 7, tzinfo=UTC)  # the night Europe changes to summer time
    dataset = seed.build(end, ZoneInfo(zone))
    assert seed.dataset_problems(dataset) == []
    assert len(dataset.events) == len(seed_data.INCIDENTS)
    assert {e.rule_name for e in dataset.events} <= {r.name for r in seed_data.RULES}


def test_build_is_deterministic() -> None:
    """The same end time gives the same readings and events."""
    end = datetime(2026, 1, 27, 12, 0, tzinfo=UTC)
    assert seed.build(end, ZoneInfo("UTC")) == seed.build(end, ZoneInfo("UTC"))


def test_password_hash_is_django_pbkdf2_sha256() -> None:
    """The hash is PBKDF2-HMAC-SHA256 in Django's encoding (RFC 7914 test vector, c=1)."""
    digest = bytes.fromhex("120fb6cffcf8b32c43e7225256c4f837a86548c92ccc35480805987cb70be17b")
    expected = f"pbkdf2_sha256$1$salt${base64.b64encode(digest).decode()}"
    assert passwords.hash_password("password", salt="salt", iterations=1) == expected
    assert passwords.check_password("password", expected)
    assert not passwords.check_password("Password", expected)
    assert not passwords.check_password("password", "password")  # a plain value never verifies
    fresh = passwords.hash_password("x")
    assert fresh.startswith(f"pbkdf2_sha256${passwords.DEFAULT_ITERATIONS}$")
    assert fresh != passwords.hash_password("x")  # a new salt each time


# --- seeding a database ----------------------------------------------------------------------


def test_seed_writes_the_whole_data_set(
    db_url: str,
    conn: psycopg.Connection,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A migrated database gets 3 users, 7 metrics, 7 devices, 11 bindings, 11 rules and events."""
    result = run(monkeypatch, capsys, db_url)
    assert result.code == exitcodes.OK, result.err
    found = counts(conn)
    assert {k: found[k] for k in SEEDED_COUNTS} == SEEDED_COUNTS
    assert found["events"] == len(seed_data.INCIDENTS) == 8
    done = result.events("seed_done")[0]
    assert done["mode"] == "insert"
    assert done["telemetries"] == found["telemetries"] > 5000
    assert found["rule_states"] == found["action_outbox"] == 0
    assert result.out.startswith("seeded: 3 users, 7 metrics, 7 devices, 11 device_metrics")

    # The data set is exactly what build() gives for the stored end time.
    last = conn.execute("SELECT max(ts) FROM telemetries").fetchone()
    assert last is not None
    assert datetime.now(UTC) - last[0] < timedelta(minutes=2)  # "the last 24 hours" has data
    assert found["telemetries"] == seed.build(last[0], ZoneInfo("UTC")).telemetry_count


def test_seeded_telemetry_is_realistic(
    db_url: str,
    conn: psycopg.Connection,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Numeric series vary (daily cycle plus noise); booleans and strings take sensible values."""
    seeded(monkeypatch, capsys, db_url)
    numeric = conn.execute(
        """
        SELECT d.serial_id, m.metric_type::text, count(DISTINCT t.value_numeric),
               stddev(t.value_numeric), min(t.ts), max(t.ts)
        FROM telemetries t
        JOIN device_metrics dm ON dm.id = t.device_metric_id
        JOIN devices d ON d.id = dm.device_id
        JOIN metrics m ON m.id = dm.metric_id
        WHERE m.data_type = 'numeric'
        GROUP BY 1, 2
        """
    ).fetchall()
    assert len(numeric) == 6
    for serial, metric, distinct, spread, first, last in numeric:
        assert distinct > 50, (serial, metric)
        assert spread > 0, (serial, metric)
        assert last - first > timedelta(days=2, hours=23), (serial, metric)
    values: dict[Any, Any] = dict(
        conn.execute(
            """
            SELECT m.metric_type::text || ':' || d.serial_id,
                   array_agg(DISTINCT coalesce(t.value_str, t.value_bool::text))
            FROM telemetries t
            JOIN device_metrics dm ON dm.id = t.device_metric_id
            JOIN devices d ON d.id = dm.device_id
            JOIN metrics m ON m.id = dm.metric_id
            WHERE m.data_type <> 'numeric'
            GROUP BY 1
            """
        ).fetchall()
    )
    assert sorted(values["motion_detected:SN-B1-MOT-0101"]) == ["false", "true"]
    assert sorted(values["status:SN-B1-STAT-0102"]) == ["ERROR", "OK"]
    assert sorted(values["online:SN-B1-STAT-0102"]) == ["false", "true"]
    assert sorted(values["firmware_version:SN-B2-FW-0103"]) == ["2.3.1", "2.4.0"]


def test_seeded_events_match_their_readings(
    db_url: str,
    conn: psycopg.Connection,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Each event is 'triggered' on its rule's binding, at a stored reading, with its value."""
    seeded(monkeypatch, capsys, db_url)
    rows = conn.execute(
        """
        SELECT e.kind::text, e.device_metric_id = r.device_metric_id, e.context,
               t.value_jsonb ->> 'v', e."timestamp" = (e.context ->> 'ts')::timestamptz
        FROM events e
        JOIN rules r ON r.id = e.rule_id
        LEFT JOIN telemetries t
            ON t.device_metric_id = e.device_metric_id AND t.ts = e."timestamp"
        """
    ).fetchall()
    assert len(rows) == 8
    for kind, same_binding, context, stored_value, same_ts in rows:
        assert kind == "triggered"
        assert same_binding and same_ts
        assert stored_value is not None, context
        assert json.dumps(context["value"]) == stored_value or str(context["value"]) == stored_value
        assert context["message"] and "{" not in context["message"]
    overheating = [
        r[2] for r in rows if "High temperature in Server room climate" in r[2]["message"]
    ]
    assert len(overheating) == 1 and overheating[0]["value"] > 27.5


def test_passwords_are_stored_hashed(
    db_url: str,
    conn: psycopg.Connection,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Stored passwords are Django pbkdf2_sha256 hashes that verify, never the plain text."""
    seeded(monkeypatch, capsys, db_url)
    stored: dict[str, str] = dict(conn.execute("SELECT username, password FROM users").fetchall())
    assert set(stored) == {"dev_admin", "alex_client", "jordan_client"}
    for user in seed_data.USERS:
        encoded = stored[user.username]
        assert encoded != user.password and user.password not in encoded
        assert encoded.startswith(f"pbkdf2_sha256${passwords.DEFAULT_ITERATIONS}$")
        assert passwords.check_password(user.password, encoded)
        assert not passwords.check_password(user.password + "x", encoded)
    roles: dict[str, str] = dict(conn.execute("SELECT username, role::text FROM users").fetchall())
    assert roles == {"dev_admin": "admin", "alex_client": "client", "jordan_client": "client"}


def test_second_run_changes_nothing(
    db_url: str,
    conn: psycopg.Connection,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Seeding an exactly seeded database says so, exits 0, and leaves every row as it was."""
    seeded(monkeypatch, capsys, db_url)
    before = (counts(conn), fingerprint(conn))
    again = run(monkeypatch, capsys, db_url)
    assert again.code == exitcodes.OK, again.err
    assert again.out.strip() == "already seeded: nothing to do"
    assert again.events("seed_already_done")
    assert (counts(conn), fingerprint(conn)) == before


def test_changed_seeded_row_is_refused(
    db_url: str,
    conn: psycopg.Connection,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A seeded device changed by someone else makes a plain run refuse, changing nothing."""
    seeded(monkeypatch, capsys, db_url)
    conn.execute("UPDATE devices SET name = 'Renamed' WHERE serial_id = 'SN-A1-TEMP-0001'")
    before = fingerprint(conn)
    result = run(monkeypatch, capsys, db_url)
    assert result.code == exitcodes.REFUSED == 4
    refused = result.events("seed_refused")[0]
    assert "SN-A1-TEMP-0001" in refused["differences"][0]
    assert "--force" in refused["reason"]
    assert fingerprint(conn) == before


def test_partial_seed_is_refused(
    db_url: str,
    conn: psycopg.Connection,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A single seeded natural key (a metric type) already present is enough to refuse."""
    conn.execute("INSERT INTO metrics (metric_type, data_type) VALUES ('Temperature', 'numeric')")
    result = run(monkeypatch, capsys, db_url)
    assert result.code == exitcodes.REFUSED
    assert counts(conn)["users"] == 0


def test_force_restores_seeded_rows_and_keeps_others(
    db_url: str,
    conn: psycopg.Connection,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """--force rewrites exactly the seeded rows; a foreign device, its history and rules stay."""
    seeded(monkeypatch, capsys, db_url)
    ids: dict[str, int] = dict(conn.execute("SELECT metric_type::text, id FROM metrics").fetchall())
    device = conn.execute(
        "INSERT INTO devices (serial_id, name) VALUES ('SN-Z9-OTHER-0001', 'not seeded') "
        "RETURNING id"
    ).fetchone()
    assert device is not None
    binding = conn.execute(
        "INSERT INTO device_metrics (device_id, metric_id) VALUES (%s, %s) RETURNING id",
        (device[0], ids["temperature"]),
    ).fetchone()
    assert binding is not None
    start = datetime(2026, 1, 1, tzinfo=UTC)
    with conn.cursor() as cur:
        cur.executemany(
            "INSERT INTO telemetries (device_metric_id, ts, value_jsonb) VALUES (%s, %s, %s)",
            [
                (binding[0], start + timedelta(minutes=i), Jsonb({"t": "numeric", "v": i}))
                for i in range(100)
            ],
        )
    seeded_binding = conn.execute(
        "SELECT dm.id FROM device_metrics dm JOIN devices d ON d.id = dm.device_id "
        "WHERE d.serial_id = 'SN-A1-TEMP-0001' AND dm.metric_id = %s",
        (ids["temperature"],),
    ).fetchone()
    assert seeded_binding is not None
    # A rule someone added to a seeded binding is theirs, not the seed's.
    conn.execute(
        "INSERT INTO rules (name, condition, action, device_metric_id) VALUES ('mine', %s, %s, %s)",
        (
            Jsonb({"type": "threshold", "operator": ">", "value": 40}),
            Jsonb({"type": "notify", "channel": "email"}),
            seeded_binding[0],
        ),
    )
    foreign = conn.execute(
        """
        SELECT (SELECT md5(string_agg(t::text, '|' ORDER BY ts)) FROM telemetries t
                WHERE device_metric_id = %(b)s),
               (SELECT row(d.*)::text FROM devices d WHERE serial_id = 'SN-Z9-OTHER-0001'),
               (SELECT row(r.*)::text FROM rules r WHERE name = 'mine')
        """,
        {"b": binding[0]},
    ).fetchone()
    conn.execute("UPDATE devices SET name = 'Renamed' WHERE serial_id = 'SN-A1-TEMP-0001'")
    conn.execute("UPDATE users SET role = 'admin' WHERE username = 'alex_client'")
    conn.execute(
        "DELETE FROM telemetries WHERE device_metric_id = %s AND ts > now() - interval '1 hour'",
        (seeded_binding[0],),
    )
    conn.execute("DELETE FROM rules WHERE name = 'Boiler overpressure'")

    assert run(monkeypatch, capsys, db_url).code == exitcodes.REFUSED
    result = run(monkeypatch, capsys, db_url, "--force")
    assert result.code == exitcodes.OK, result.err
    assert result.events("seed_done")[0]["mode"] == "refresh"

    name = conn.execute("SELECT name FROM devices WHERE serial_id = 'SN-A1-TEMP-0001'").fetchone()
    assert name == ("Server room climate",)
    role = conn.execute("SELECT role::text FROM users WHERE username = 'alex_client'").fetchone()
    assert role == ("client",)
    after = conn.execute(
        """
        SELECT (SELECT md5(string_agg(t::text, '|' ORDER BY ts)) FROM telemetries t
                WHERE device_metric_id = %(b)s),
               (SELECT row(d.*)::text FROM devices d WHERE serial_id = 'SN-Z9-OTHER-0001'),
               (SELECT row(r.*)::text FROM rules r WHERE name = 'mine')
        """,
        {"b": binding[0]},
    ).fetchone()
    assert after == foreign
    found = counts(conn)
    assert found["devices"] == 8 and found["device_metrics"] == 12 and found["rules"] == 12
    assert found["events"] == 8
    # And the refreshed database is exactly seeded again.
    assert run(monkeypatch, capsys, db_url).out.strip() == "already seeded: nothing to do"


def test_dry_run_writes_nothing(
    db_url: str,
    conn: psycopg.Connection,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """--dry-run validates and counts the data set and tells the plan, without writing."""
    result = run(monkeypatch, capsys, db_url, "--dry-run")
    assert result.code == exitcodes.OK, result.err
    lines = dict(line.split(None, 1) for line in result.out.splitlines() if ":" not in line)
    assert {k: int(lines[k]) for k in SEEDED_COUNTS} == SEEDED_COUNTS
    assert int(lines["events"]) == 8 and int(lines["telemetries"]) > 5000
    assert result.out.splitlines()[-1] == "plan: insert: nothing seeded yet"
    assert all(n == 0 for n in counts(conn).values())

    seeded(monkeypatch, capsys, db_url)
    before = fingerprint(conn)
    again = run(monkeypatch, capsys, db_url, "--dry-run")
    assert again.out.splitlines()[-1] == "plan: nothing: already seeded"
    conn.execute("UPDATE devices SET is_active = false WHERE serial_id = 'SN-B2-FW-0103'")
    changed = run(monkeypatch, capsys, db_url, "--dry-run")
    assert changed.out.splitlines()[-1].startswith("plan: refuse: device SN-B2-FW-0103")
    conn.execute("UPDATE devices SET is_active = true WHERE serial_id = 'SN-B2-FW-0103'")
    assert fingerprint(conn)["telemetries"] == before["telemetries"]


def test_seeded_email_held_by_another_user_fails(
    db_url: str,
    conn: psycopg.Connection,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A foreign user owning a seeded email is reported, and nothing is written, even --force."""
    conn.execute(
        "INSERT INTO users (username, email, password) "
        "VALUES ('someone', 'alex_client@iothub.local', 'x')"
    )
    for argv in ((), ("--force",)):
        result = run(monkeypatch, capsys, db_url, *argv)
        assert result.code == exitcodes.FAILURE
        assert result.events("seed_conflict")[0]["held_by"] == "someone"
    assert counts(conn)["users"] == 1 and counts(conn)["devices"] == 0


def test_unmigrated_database_is_reported(
    empty_db_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Seeding before `iothub migrate` fails with one line that says to migrate first."""
    result = run(monkeypatch, capsys, empty_db_url)
    assert result.code == exitcodes.FAILURE
    failed = result.events("seed_failed")[0]
    assert "migrate" in failed["hint"]
    assert "Traceback" not in result.err
