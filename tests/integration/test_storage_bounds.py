"""Rejections that do not amplify, oversize messages dropped by the broker, a full disk survived,
and retention of the side tables: real PostgreSQL, real Mosquitto, the daemon in process."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest
import structlog
from psycopg import sql

from config.settings import Settings
from ingestor import retention
from ingestor.metrics import RETENTION_TABLES, IngestMetrics
from iothub.daemon.service import IngestService
from schema import db, migrate
from tests.support.daemon import running
from tests.support.fleet import Publisher, count, make_fleet, wait_for
from tests.support.services import LocalMosquitto


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:  # noqa: S310 (local test URL)
            return int(response.status), bytes(response.read())
    except urllib.error.HTTPError as exc:
        return int(exc.code), bytes(exc.read())


def sample(service: IngestService, name: str, **labels: str) -> float:
    value = service.metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else float(value)


def test_a_message_with_many_rejected_readings_stores_its_payload_once(
    make_settings: Callable[..., Settings], db_url: str, broker_url: str, unique: str
) -> None:
    """2,000 unknown metrics in one 58 KB message: one payload row, 100 rejection rows, the
    other 1,900 counted by reason; the good reading beside them is stored."""
    fleet = make_fleet(db_url, f"SN-{unique}", 1)
    serial = fleet.serials[0]
    metrics = {f"unknown_metric_number_{i:05d}": i for i in range(2000)} | {"temperature": 20.5}
    body = json.dumps({"ts": datetime.now(UTC).isoformat(), "metrics": metrics}).encode()
    service = IngestService(make_settings())
    with running(service):
        pub = Publisher(broker_url, f"pub-{unique}")
        try:
            pub.publish(f"t{unique}/devices/{serial}/telemetry", body)
        finally:
            pub.close()
        assert wait_for(lambda: service.totals["messages"] >= 1)
        assert sample(service, "iothub_readings_rejected_total", reason="unknown_metric") == 2000
        assert sample(service, "iothub_rejections_not_recorded_total") == 1900
    assert count(db_url, "SELECT count(*) FROM telemetries") == 1
    assert count(db_url, "SELECT count(*) FROM rejected_messages") == 100
    with psycopg.connect(db_url) as conn:
        rows = conn.execute(
            "SELECT payload, payload_bytes, rejections, not_recorded, topic FROM rejected_payloads"
        ).fetchall()
        stored = conn.execute(
            "SELECT pg_total_relation_size('rejected_messages') "
            "+ pg_total_relation_size('rejected_payloads')"
        ).fetchone()
        by_reason = conn.execute(
            "SELECT reason, count(*) FROM rejected_messages GROUP BY reason"
        ).fetchall()
        # The query of docs/operations.md for every rejected reading, capped ones included.
        exact = conn.execute(
            "SELECT reason, sum(n) FROM ("
            " SELECT reason, count(*) AS n FROM rejected_messages GROUP BY reason"
            " UNION ALL"
            " SELECT r.key, sum(r.value::bigint) FROM rejected_payloads p,"
            " jsonb_each_text(p.not_recorded) r GROUP BY r.key"
            ") t GROUP BY reason"
        ).fetchall()
        linked = conn.execute(
            "SELECT count(*) FROM rejected_messages m JOIN rejected_payloads p "
            "ON p.id = m.payload_id"
        ).fetchone()
    assert len(rows) == 1
    payload, payload_bytes, rejections, not_recorded, topic = rows[0]
    assert bytes(payload) == body and payload_bytes == len(body)
    assert rejections == 2000 and not_recorded == {"unknown_metric": 1900}
    assert topic == f"t{unique}/devices/{serial}/telemetry"
    assert by_reason == [("unknown_metric", 100)]
    assert exact == [("unknown_metric", 2000)]
    assert linked == (100,)
    # Was 2,001 copies (117 MB); now the payload once plus 100 short rows.
    assert stored is not None and stored[0] < 1024 * 1024


def test_readings_the_database_refuses_are_capped_in_rows_logs_and_detail(
    make_settings: Callable[..., Settings], db_url: str, broker_url: str, unique: str
) -> None:
    """150 readings of one message refused by the server with a 5,000-character error: 100
    storage_error rows with a bounded detail, 50 counted, 10 log lines and one count."""
    fleet = make_fleet(db_url, f"SN-{unique}", 1)
    serial = fleet.serials[0]
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("""
            CREATE FUNCTION refuse_all() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
                RAISE EXCEPTION '%', repeat('refused ', 625) USING ERRCODE = '22023';
            END $$;
            CREATE TRIGGER refuse_all BEFORE INSERT ON telemetries
                FOR EACH ROW EXECUTE FUNCTION refuse_all();
        """)
    now = datetime.now(UTC).replace(microsecond=0)
    body = [
        {"ts": (now - timedelta(seconds=i)).isoformat(), "metrics": {"status": "OK"}}
        for i in range(150)
    ]
    service = IngestService(make_settings())
    with structlog.testing.capture_logs() as logs, running(service):
        pub = Publisher(broker_url, f"pub-{unique}")
        try:
            pub.publish(f"t{unique}/devices/{serial}/telemetry", body)
        finally:
            pub.close()
        assert wait_for(lambda: service.totals["messages"] >= 1)
        assert sample(service, "iothub_readings_rejected_total", reason="storage_error") == 150
    assert (
        count(db_url, "SELECT count(*) FROM rejected_messages WHERE reason = 'storage_error'")
        == 100
    )
    assert count(db_url, "SELECT max(length(detail)) FROM rejected_messages") <= 1000
    with psycopg.connect(db_url) as conn:
        row = conn.execute("SELECT rejections, not_recorded FROM rejected_payloads").fetchone()
    assert row == (150, {"storage_error": 50})
    assert sum(e["event"] == "reading_refused_by_database" for e in logs) == 10
    assert [e["count"] for e in logs if e["event"] == "readings_refused_not_logged"] == [140]


def test_batches_are_split_by_readings_and_every_reading_is_stored(
    make_settings: Callable[..., Settings], db_url: str, broker_url: str, unique: str
) -> None:
    """With max_batch_readings 4, twenty messages of two readings still all commit, in more
    batches than batch_size alone would make."""
    fleet = make_fleet(db_url, f"SN-{unique}", 1)
    serial = fleet.serials[0]
    now = datetime.now(UTC).replace(microsecond=0)
    service = IngestService(make_settings(max_batch_readings=4, batch_interval=0.5))
    with running(service):
        pub = Publisher(broker_url, f"pub-{unique}")
        try:
            sent = pub.publish_many(
                (
                    f"t{unique}/devices/{serial}/telemetry",
                    {
                        "ts": (now - timedelta(seconds=i)).isoformat(),
                        "metrics": {"temperature": i, "humidity": i},
                    },
                )
                for i in range(20)
            )
        finally:
            pub.close()
        assert sent == 20
        assert wait_for(lambda: service.totals["rows"] >= 40)
        batches = sample(service, "iothub_batches_total", outcome="committed")
    assert count(db_url, "SELECT count(*) FROM telemetries") == 40
    assert batches >= 10


def test_an_oversize_message_is_dropped_by_the_broker_before_it_reaches_us(
    make_settings: Callable[..., Settings],
    local_mosquitto: LocalMosquitto,
    db_url: str,
    unique: str,
) -> None:
    """CONNECT announces Maximum Packet Size = max_payload_bytes + header room: Mosquitto does
    not send a 1 MB message to the service (nothing received, nothing stored), and the next
    message arrives as usual."""
    fleet = make_fleet(db_url, f"SN-{unique}", 1)
    serial = fleet.serials[0]
    topic = f"t{unique}/devices/{serial}/telemetry"
    service = IngestService(
        make_settings(mqtt_url=local_mosquitto.url, max_payload_bytes=64 * 1024)
    )
    with running(service):
        pub = Publisher(local_mosquitto.url, f"pub-{unique}")
        try:
            huge = json.dumps({"metrics": {"status": "x" * (1024 * 1024)}}).encode()
            pub.publish(topic, huge)
            pub.publish(topic, {"ts": datetime.now(UTC).isoformat(), "metrics": {"temperature": 1}})
        finally:
            pub.close()
        assert wait_for(lambda: service.totals["rows"] >= 1)
        time.sleep(0.5)  # the big one was sent first: had it come, it would be here by now
        assert service.totals["messages"] == 1
        assert sample(service, "iothub_messages_received_total") == 1
    assert count(db_url, "SELECT count(*) FROM rejected_messages") == 0
    assert count(db_url, "SELECT count(*) FROM rejected_payloads") == 0
    assert count(db_url, "SELECT count(*) FROM telemetries") == 1
    # What the operator sees: Mosquitto says so in its log (notice level).
    assert wait_for(
        lambda: "Dropping too large outgoing PUBLISH" in local_mosquitto.log_path.read_text()
    )


def test_messages_held_unacknowledged_are_bounded_in_bytes(
    make_settings: Callable[..., Settings], db_url: str, broker_url: str, unique: str
) -> None:
    """With the writer blocked, intake holds at most max_pending_bytes (1 MiB) of 200 KB
    messages, far below max_pending_messages, then pauses; unblocked, all of them are stored."""
    fleet = make_fleet(db_url, f"SN-{unique}", 1)
    serial = fleet.serials[0]
    now = datetime.now(UTC).replace(microsecond=0)
    padding = b" " * (200 * 1024)  # JSON allows trailing white space: a valid, big message
    service = IngestService(make_settings(max_pending_bytes=1024 * 1024))
    with (
        structlog.testing.capture_logs() as logs,
        running(service),
        psycopg.connect(db_url) as blocker,
    ):
        # Holds the writer's INSERT until the lock goes with this transaction.
        blocker.execute("LOCK TABLE telemetries IN ACCESS EXCLUSIVE MODE")
        pub = Publisher(broker_url, f"pub-{unique}")
        try:
            sent = pub.publish_many(
                (
                    f"t{unique}/devices/{serial}/telemetry",
                    json.dumps(
                        {"ts": (now - timedelta(seconds=i)).isoformat(), "metrics": {"humidity": i}}
                    ).encode()
                    + padding,
                )
                for i in range(30)
            )
            assert sent == 30
            assert wait_for(lambda: any(e["event"] == "intake_paused" for e in logs))
            held = service.intake.pending_bytes
            assert 0 < held <= 1024 * 1024
            assert service.intake.pending <= 6
            blocker.rollback()
            assert wait_for(lambda: service.totals["rows"] >= 30, timeout=30)
        finally:
            pub.close()
        assert max(e["pending_bytes"] for e in logs if e["event"] == "intake_paused") <= 1024**2
    assert count(db_url, "SELECT count(*) FROM telemetries") == 30


# --- a full disk, for real: telemetries on a tablespace on a small tmpfs


@contextlib.contextmanager
def tiny_tablespace(conn: psycopg.Connection, name: str) -> Iterator[Path]:
    """A tablespace on a 1 MiB tmpfs (root only): the server really runs out of space."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    data_dir = conn.execute("SELECT current_setting('data_directory')").fetchone()
    assert data_dir is not None
    owner = os.stat(data_dir[0])
    mount = Path(tempfile.mkdtemp(prefix="iothub-tiny-"))
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], check=True)
    try:
        os.chown(mount, owner.st_uid, owner.st_gid)
        conn.execute(
            sql.SQL("CREATE TABLESPACE {} LOCATION {}").format(
                sql.Identifier(name), sql.Literal(str(mount))
            )
        )
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)
        with contextlib.suppress(OSError):
            mount.rmdir()


def test_a_full_disk_is_reported_retried_with_backoff_and_survived_without_loss(
    make_settings: Callable[..., Settings],
    pg_admin_dsn: str,
    db_url: str,
    broker_url: str,
    unique: str,
) -> None:
    """telemetries on a 1 MiB tmpfs: when it is full the writer gets SQLSTATE 53100, logs
    db_disk_full once, sets iothub_db_disk_full, /healthz says database_disk is down, nothing
    is acknowledged and retries back off; once the tmpfs grows, every reading is stored."""
    fleet = make_fleet(db_url, f"SN-{unique}", 1)
    serial = fleet.serials[0]
    space = f"tiny_{unique}"
    with (
        psycopg.connect(pg_admin_dsn, autocommit=True) as admin,
        tiny_tablespace(admin, space) as mount,
    ):
        try:
            with psycopg.connect(db_url, autocommit=True) as conn:
                conn.execute(
                    sql.SQL("ALTER TABLE telemetries SET TABLESPACE {}").format(
                        sql.Identifier(space)
                    )
                )
            service = IngestService(make_settings(batch_size=500))
            now = datetime.now(UTC).replace(microsecond=0)
            sent = 0
            with structlog.testing.capture_logs() as logs, running(service):
                base = f"http://127.0.0.1:{service.http.port}"
                pub = Publisher(broker_url, f"pub-{unique}")
                try:
                    # ~200 bytes a row: 1 MiB holds some 5,000; send more than that.
                    for chunk in range(8):
                        sent += pub.publish_many(
                            (
                                f"t{unique}/devices/{serial}/telemetry",
                                {
                                    "ts": (now - timedelta(seconds=i)).isoformat(),
                                    "metrics": {"temperature": i, "humidity": i},
                                },
                            )
                            for i in range(chunk * 1000, (chunk + 1) * 1000)
                        )
                        if service.disk_full:
                            break
                    assert wait_for(lambda: service.disk_full, timeout=30)
                    status, body = get(base + "/healthz")
                    assert status == 503
                    assert json.loads(body)["down"] == ["database_disk"]
                    assert sample(service, "iothub_db_disk_full") == 1
                    assert service.intake.pending > 0  # held, not acknowledged
                    # Backing off, not spinning: within 3 s, retries after 0.5, 1 and 2 s
                    # (±20 %), each wait longer than the one before.
                    time.sleep(3.0)
                    delays = [e["retry_in"] for e in logs if e["event"] == "db_unavailable"]
                    assert 2 <= len(delays) <= 5, delays
                    assert all(b > a for a, b in itertools.pairwise(delays)), delays
                    assert sample(service, "iothub_batches_total", outcome="retry") == len(delays)
                    stored_while_full = count(db_url, "SELECT count(*) FROM telemetries")
                    assert stored_while_full < sent * 2
                    # Space comes back: the held batch commits, the backlog drains.
                    subprocess.run(
                        ["mount", "-o", "remount,size=64m", "tmpfs", str(mount)], check=True
                    )
                    assert wait_for(lambda: not service.disk_full, timeout=60)
                    assert wait_for(lambda: service.totals["rows"] >= sent * 2, timeout=60)
                    assert wait_for(lambda: get(base + "/healthz")[0] == 200, timeout=10)
                    assert sample(service, "iothub_db_disk_full") == 0
                finally:
                    pub.close()
            full = [e for e in logs if e["event"] == "db_disk_full"]
            assert len(full) == 1 and full[0]["sqlstate"] == "53100"
            assert any(e["event"] == "db_recovered" and e["disk_was_full"] for e in logs)
            assert not any(e["event"] == "writer_crashed" for e in logs)
            assert count(db_url, "SELECT count(*) FROM telemetries") == sent * 2
        finally:
            with psycopg.connect(db_url, autocommit=True) as conn:
                conn.execute("ALTER TABLE telemetries SET TABLESPACE pg_default")
            admin.execute(sql.SQL("DROP TABLESPACE {}").format(sql.Identifier(space)))


# --- retention


def _old_and_new_side_rows(conn: psycopg.Connection, unique: str) -> None:
    """Rejections, outbox rows and attempts 40 days old and fresh, of every status."""
    fleet_dm = conn.execute(
        "WITH d AS (INSERT INTO devices (serial_id, name) VALUES (%s, 'd') RETURNING id), "
        "m AS (INSERT INTO metrics (metric_type, data_type) VALUES (%s, 'numeric') RETURNING id) "
        "INSERT INTO device_metrics (device_id, metric_id) SELECT d.id, m.id FROM d, m "
        "RETURNING id",
        (f"SN-{unique}", f"m{unique}"),
    ).fetchone()
    assert fleet_dm is not None
    rule = conn.execute(
        "INSERT INTO rules (name, condition, action, device_metric_id) "
        "VALUES ('r', '{}', '{}', %s) RETURNING id",
        fleet_dm,
    ).fetchone()
    assert rule is not None
    event = conn.execute(
        'INSERT INTO events (rule_id, "timestamp") VALUES (%s, now()) RETURNING id', rule
    ).fetchone()
    assert event is not None
    for age in ("40 days", "1 hour"):
        for _ in range(5):
            payload = conn.execute(
                "INSERT INTO rejected_payloads (received_at, topic, payload, payload_bytes, "
                "rejections) VALUES (now() - %s::interval, 't', 'x', 1, 3) RETURNING id",
                (age,),
            ).fetchone()
            assert payload is not None
            conn.execute(
                "INSERT INTO rejected_messages (payload_id, received_at, reason, detail) "
                "SELECT %s, now() - %s::interval, 'bad_json', 'd' FROM generate_series(1, 3)",
                (payload[0], age),
            )
        for status in ("delivered", "failed", "pending"):
            outbox = conn.execute(
                "INSERT INTO action_outbox (event_id, rule_id, kind, target, status, "
                "next_attempt_at, delivered_at) VALUES (%s, %s, 'notify', '{}', %s, "
                "now() - %s::interval, CASE WHEN %s = 'delivered' THEN now() - %s::interval END) "
                "RETURNING id",
                (event[0], rule[0], status, age, status, age),
            ).fetchone()
            assert outbox is not None
            conn.execute(
                "INSERT INTO action_attempts (outbox_id, attempted_at, ok, detail) "
                "SELECT %s, now() - %s::interval, false, 'e' FROM generate_series(1, 2)",
                (outbox[0], age),
            )


def test_retention_prunes_old_rows_in_small_batches_and_keeps_pending_actions(
    make_settings: Callable[..., Settings], db_url: str, unique: str
) -> None:
    """Rows older than their retention go, a few per statement; fresh rows and pending
    actions (however old) stay."""
    with psycopg.connect(db_url, autocommit=True) as conn:
        _old_and_new_side_rows(conn, unique)
    settings = make_settings(retention_batch_size=2)
    metrics = IngestMetrics()
    # Every pruned table has its series from the start, at 0, for rate() and alerts.
    assert (
        metrics.registry.get_sample_value(
            "iothub_retention_deleted_total", {"table": "action_outbox"}
        )
        == 0
    )
    pool = db.make_pool(settings, "retention")
    pool.open(wait=True)
    try:
        worker = retention.RetentionWorker(settings, pool, metrics)
        deleted = worker.prune_once()
        assert deleted == {
            "rejected_messages": 15,
            "rejected_payloads": 5,
            "action_attempts": 6,
            "action_outbox": 2,
        }
        assert worker.prune_once() == {}
        sizes = worker.measure_sizes()
    finally:
        pool.close()
    # Each table's size, as the server reports it, in the gauge and for the stats line.
    assert set(sizes) == set(RETENTION_TABLES)
    for table, size in sizes.items():
        assert size == count(db_url, f"SELECT pg_total_relation_size('{table}')") > 0
        assert metrics.registry.get_sample_value("iothub_table_bytes", {"table": table}) == size
    assert metrics.table_sizes == sizes
    assert (
        metrics.registry.get_sample_value(
            "iothub_retention_deleted_total", {"table": "rejected_messages"}
        )
        == 15
    )
    assert count(db_url, "SELECT count(*) FROM rejected_payloads") == 5
    assert count(db_url, "SELECT count(*) FROM rejected_messages") == 15
    assert count(db_url, "SELECT count(*) FROM action_attempts") == 6
    # The 40-day-old pending row stays, with the fresh three.
    assert count(db_url, "SELECT count(*) FROM action_outbox") == 4
    assert count(db_url, "SELECT count(*) FROM action_outbox WHERE status = 'pending'") == 2


def test_the_daemon_prunes_on_its_timer_and_backs_off_when_the_database_refuses(
    make_settings: Callable[..., Settings], db_url: str, unique: str
) -> None:
    """`iothub run`'s retention thread deletes expired rejections by itself; when a pass fails
    it logs retention_failed and tries again later instead of dying."""
    with psycopg.connect(db_url, autocommit=True) as conn:
        _old_and_new_side_rows(conn, unique)
        # Until the trigger is dropped, every pass fails with a real server error.
        conn.execute(
            "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
            "RAISE EXCEPTION 'refused for the test' USING ERRCODE = 'insufficient_privilege'; "
            "END $$"
        )
        conn.execute(
            "CREATE TRIGGER refuse BEFORE DELETE ON rejected_messages "
            "FOR EACH STATEMENT EXECUTE FUNCTION refuse()"
        )
    service = IngestService(make_settings(retention_interval=0.2, stats_interval=0.5))
    with structlog.testing.capture_logs() as logs, running(service):
        assert wait_for(lambda: any(e["event"] == "retention_failed" for e in logs), timeout=20)
        assert service.retention.alive
        with psycopg.connect(db_url, autocommit=True) as conn:
            conn.execute("DROP TRIGGER refuse ON rejected_messages")
        assert wait_for(
            lambda: count(db_url, "SELECT count(*) FROM rejected_payloads") == 5, timeout=30
        )
        # The first successful pass also measured the tables; the stats line shows them.
        assert wait_for(
            lambda: any(
                e["event"] == "stats" and e["table_bytes"].get("rejected_messages", 0) > 0
                for e in logs
            ),
            timeout=10,
        )
    failed = [e for e in logs if e["event"] == "retention_failed"]
    assert failed[0]["sqlstate"] == "42501" and failed[0]["retry_in"] >= 4
    assert any(e["event"] == "retention_pruned" for e in logs)
    assert count(db_url, "SELECT count(*) FROM rejected_messages") == 15


# --- the migration


def test_migration_5_keeps_each_rejected_payload_once(empty_db_url: str) -> None:
    """Upgrading a database with per-reading copies of a payload: they become one
    rejected_payloads row that the rejections point to; rejections by reason are unchanged."""
    with psycopg.connect(empty_db_url, autocommit=True) as conn:
        conn.execute(migrate.queries["create_migrations_table"])
        for m in migrate.available()[:4]:
            with conn.transaction():
                conn.execute(m.sql.encode())
                conn.execute(
                    migrate.queries["record_migration"],
                    {"version": m.version, "name": m.name, "checksum": m.checksum},
                )
        conn.execute(
            "INSERT INTO rejected_messages (received_at, topic, payload, reason, detail) VALUES "
            "('2026-01-01T00:00:00Z', 't/a', 'AAA', 'unknown_metric', 'm1'), "
            "('2026-01-01T00:00:00Z', 't/a', 'AAA', 'unknown_metric', 'm2'), "
            "('2026-01-01T00:00:00Z', 't/a', 'AAA', 'type_mismatch', 'm3'), "
            "('2026-01-02T00:00:00Z', 't/b', 'BB', 'bad_json', 'x')"
        )
        # 5 and every later migration: the upgrade applies what the previous release lacked.
        applied = [m.version for m in migrate.migrate(conn)]
        assert applied == [m.version for m in migrate.available()[4:]]
        assert applied[0] == 5
        payloads = conn.execute(
            "SELECT topic, payload, payload_bytes, rejections FROM rejected_payloads ORDER BY 1"
        ).fetchall()
        assert payloads == [("t/a", b"AAA", 3, 3), ("t/b", b"BB", 2, 1)]
        by_reason = conn.execute(
            "SELECT reason, count(*) FROM rejected_messages GROUP BY 1 ORDER BY 1"
        ).fetchall()
        assert by_reason == [("bad_json", 1), ("type_mismatch", 1), ("unknown_metric", 2)]
        joined = conn.execute(
            "SELECT m.detail, p.topic FROM rejected_messages m "
            "JOIN rejected_payloads p ON p.id = m.payload_id ORDER BY 1"
        ).fetchall()
        assert joined == [("m1", "t/a"), ("m2", "t/a"), ("m3", "t/a"), ("x", "t/b")]
