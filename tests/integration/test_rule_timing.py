"""Rule timing under clock trouble: silence is judged on the service's clock (receipt time, and
not from before the intake reconnected or while a backlog drains), and a reading from the
future never moves the cursor past the service's clock."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import psycopg
from prometheus_client import CollectorRegistry
from psycopg_pool import ConnectionPool

from config.settings import Settings
from ingestor.hooks import BatchReading
from iothub.daemon import assemble
from rules_engine.engine import RuleEngine
from rules_engine.metrics import RuleMetrics
from rules_engine.no_data import NoDataWorker
from schema import migrate
from tests.integration.test_rules_in_pipeline import NOTIFY
from tests.support.daemon import make_service, running
from tests.support.fleet import Publisher, make_fleet, wait_for


def add_rule(dsn: str, dm: int, condition: dict[str, object], name: str) -> int:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(
            "INSERT INTO rules (name, condition, action, device_metric_id) "
            "VALUES (%s, %s, %s, %s) RETURNING id",
            (name, json.dumps(condition), json.dumps(NOTIFY), dm),
        ).fetchone()
        assert row
        return int(row[0])


def events(dsn: str) -> list[tuple[str, datetime, str]]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return [
            (kind, ts, reason)
            for kind, ts, reason in conn.execute(
                "SELECT kind::text, \"timestamp\", context->>'reason' FROM events ORDER BY id"
            )
        ]


def reading(dm: int, ts: datetime, value: float) -> BatchReading:
    return BatchReading(dm, ts, value, "numeric", "SN", "Device", "temperature")


def feed(dsn: str, engine: RuleEngine, dm: int, ts: datetime, value: float) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn, conn.transaction():
        engine.on_inserted(conn, [reading(dm, ts, value)])


def last_received(dsn: str, dm: int) -> datetime:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(
            "SELECT last_received FROM rule_cursors WHERE device_metric_id = %s", (dm,)
        ).fetchone()
        assert row
        return row[0]  # type: ignore[no-any-return]


def test_a_device_clock_behind_does_not_make_a_silence(db_url: str, unique: str) -> None:
    """A device whose clock runs 3 minutes behind, reporting every minute, raises no no_data
    alarm on a 2-minute rule; when it really goes silent the alarm counts from its last
    receipt, and the reading that ends it is never resolved before it was triggered."""
    fleet = make_fleet(db_url, f"SN-{unique}", 1)
    dm = fleet.bindings[(fleet.serials[0], "temperature")]
    add_rule(db_url, dm, {"type": "no_data", "minutes": 2}, "Silent")
    engine = RuleEngine(Settings(database_url=db_url), RuleMetrics(CollectorRegistry()))
    behind = timedelta(minutes=3)
    with ConnectionPool(db_url, min_size=1, max_size=1, kwargs={"autocommit": True}) as pool:
        worker = NoDataWorker(engine, pool)
        feed(db_url, engine, dm, datetime.now(UTC) - behind, 20.0)
        # A minute later (the timer runs; the next reading is due): not silent for 2 minutes.
        assert worker.check(datetime.now(UTC) + timedelta(minutes=1)) == 0
        feed(db_url, engine, dm, datetime.now(UTC) - behind + timedelta(minutes=1), 21.0)
        assert worker.check(datetime.now(UTC) + timedelta(minutes=1)) == 0
        assert events(db_url) == []
        # Now silent: 5 minutes on the service's clock after the last receipt.
        heard = last_received(db_url, dm)
        assert worker.check(heard + timedelta(minutes=5)) == 1
        back = datetime.now(UTC) - behind + timedelta(minutes=2)  # device time: 2 min behind
        feed(db_url, engine, dm, back, 22.0)
    (kind1, ts1, _), (kind2, ts2, _) = events(db_url)
    assert (kind1, ts1) == ("triggered", heard + timedelta(minutes=2))
    assert kind2 == "resolved"
    assert ts2 >= ts1


def test_no_verdict_while_the_backlog_is_older_than_the_limit(db_url: str, unique: str) -> None:
    """While the writer holds a message older than no_data_max_backlog, or the intake is not
    connected, the timer gives no verdict; afterwards it judges as usual."""
    fleet = make_fleet(db_url, f"SN-{unique}", 1)
    dm = fleet.bindings[(fleet.serials[0], "temperature")]
    add_rule(db_url, dm, {"type": "no_data", "minutes": 10}, "Silent")
    engine = RuleEngine(
        Settings(database_url=db_url, no_data_max_backlog=5.0), RuleMetrics(CollectorRegistry())
    )
    feed(db_url, engine, dm, datetime.now(UTC) - timedelta(minutes=30), 20.0)
    later = last_received(db_url, dm) + timedelta(minutes=11)
    with ConnectionPool(db_url, min_size=1, max_size=1, kwargs={"autocommit": True}) as pool:
        worker = NoDataWorker(engine, pool)
        engine.backlog_age = lambda: 6.0
        assert worker.check(later) == 0
        engine.backlog_age = lambda: 0.0
        engine.intake_since = lambda: None  # the broker connection is down
        assert worker.check(later) == 0
        engine.intake_since = lambda: later - timedelta(minutes=5)  # reconnected 5 min ago
        assert worker.check(later) == 0
        engine.intake_since = lambda: later - timedelta(minutes=20)
        assert worker.check(later) == 1


def test_a_restart_with_a_broker_backlog_raises_no_false_no_data(
    make_settings: Callable[..., Settings], db_url: str, broker_url: str, unique: str
) -> None:
    """The whole service over the real broker: stopped while the device keeps publishing, then
    started with the backlog queued at the broker and its drain held up by the database. The
    device was never silent, so no no_data event is written; once it really stops, one
    triggered event is."""
    fleet = make_fleet(db_url, f"SN-{unique}", 1)
    serial = fleet.serials[0]
    dm = fleet.bindings[(serial, "temperature")]
    add_rule(db_url, dm, {"type": "no_data", "minutes": 0.1}, "Silent")  # 6 s
    settings = make_settings(no_data_check_interval=0.2)
    topic = f"t{unique}/devices/{serial}/telemetry"
    pub = Publisher(broker_url, f"pub-{unique}")
    stop_publishing = threading.Event()

    def device() -> None:
        while not stop_publishing.wait(0.5):
            body = {"ts": datetime.now(UTC).isoformat(), "metrics": {"temperature": 20.0}}
            pub.publish(topic, body)

    publisher = threading.Thread(target=device, name="test-device")
    try:
        with running(assemble.build(settings)) as handle:
            publisher.start()
            assert wait_for(lambda: handle.service.totals["rows"] >= 3)
        time.sleep(8.0)  # the device goes on; the broker queues for the stopped service
        with psycopg.connect(db_url) as blocker:
            # The backlog's batches wait for this lock: a drain that takes a while.
            blocker.execute("LOCK TABLE telemetries IN SHARE MODE")
            with running(assemble.build(settings)) as handle:
                time.sleep(3.0)
                blocker.commit()
                assert wait_for(lambda: handle.service.totals["rows"] >= 10)
                time.sleep(2.0)
                assert events(db_url) == []
                stop_publishing.set()
                publisher.join(10)
                assert wait_for(lambda: events(db_url), timeout=20)
    finally:
        stop_publishing.set()
        pub.close()
    assert [kind for kind, _ts, _reason in events(db_url)] == ["triggered"]


def test_a_reading_from_the_future_does_not_make_later_readings_late(
    make_settings: Callable[..., Settings], db_url: str, broker_url: str, unique: str
) -> None:
    """A reading 4 min 50 s ahead (within future_tolerance) is stored but evaluated as of the
    service's clock, so the on-time readings after it are evaluated: 80, 85, 90 on a `> 50`
    rule fire once. The cursor never passes the service's clock."""
    fleet = make_fleet(db_url, f"SN-{unique}", 1)
    serial = fleet.serials[0]
    dm = fleet.bindings[(serial, "temperature")]
    add_rule(db_url, dm, {"type": "threshold", "operator": ">", "value": 50}, "Hot")
    topic = f"t{unique}/devices/{serial}/telemetry"
    pub = Publisher(broker_url, f"pub-{unique}")
    try:
        with running(make_service(make_settings())) as handle:
            ahead = datetime.now(UTC) + timedelta(minutes=4, seconds=50)
            pub.publish(topic, {"ts": ahead.isoformat(), "metrics": {"temperature": 20.0}})
            assert wait_for(lambda: handle.service.totals["rows"] >= 1)
            for n, value in enumerate((80.0, 85.0, 90.0), start=2):
                time.sleep(0.05)
                pub.publish(
                    topic,
                    {"ts": datetime.now(UTC).isoformat(), "metrics": {"temperature": value}},
                )
                assert wait_for(lambda n=n: handle.service.totals["rows"] >= n)
            assert wait_for(lambda: events(db_url))
            with psycopg.connect(db_url, autocommit=True) as conn:
                row = conn.execute(
                    "SELECT last_ts <= now() FROM rule_cursors WHERE device_metric_id = %s", (dm,)
                ).fetchone()
            assert row == (True,)
    finally:
        pub.close()
    found = events(db_url)
    assert [kind for kind, _ts, _reason in found] == ["triggered"]
    assert "80" in found[0][2]


def test_migration_7_takes_the_receipt_time_from_the_last_cursor_write(empty_db_url: str) -> None:
    """Upgrading a database with cursors: each one's last_received is when it was last written,
    and new cursors get one by default."""
    written = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
    with psycopg.connect(empty_db_url, autocommit=True) as conn:
        conn.execute(migrate.queries["create_migrations_table"])
        for m in [m for m in migrate.available() if m.version < 7]:
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
        )
        conn.execute(
            "INSERT INTO rule_cursors (device_metric_id, last_ts, last_value, updated_at) "
            "SELECT id, %s, '1', %s FROM device_metrics",
            (written - timedelta(minutes=3), written),
        )
        assert 7 in [m.version for m in migrate.migrate(conn)]
        row = conn.execute("SELECT last_received FROM rule_cursors").fetchone()
        assert row == (written,)
        nullable = conn.execute(
            "SELECT is_nullable FROM information_schema.columns "
            "WHERE table_name = 'rule_cursors' AND column_name = 'last_received'"
        ).fetchone()
        assert nullable == ("NO",)


def test_a_device_clock_jumping_forward_is_not_a_silence(db_url: str, unique: str) -> None:
    """Two readings received a moment apart whose device times are 30 minutes apart (the
    device's clock was corrected) write no triggered/resolved pair on a 10-minute no_data
    rule: in the service, silence is the timer's to judge, on the service's clock."""
    fleet = make_fleet(db_url, f"SN-{unique}", 1)
    dm = fleet.bindings[(fleet.serials[0], "temperature")]
    add_rule(db_url, dm, {"type": "no_data", "minutes": 10}, "Silent")
    engine = RuleEngine(Settings(database_url=db_url), RuleMetrics(CollectorRegistry()))
    now = datetime.now(UTC)
    feed(db_url, engine, dm, now - timedelta(minutes=31), 20.0)
    feed(db_url, engine, dm, now - timedelta(minutes=1), 20.0)
    assert events(db_url) == []


def test_readings_ahead_in_one_batch_are_evaluated_once_at_the_clock(
    db_url: str, unique: str
) -> None:
    """Two readings ahead of the service's clock in one batch: the newest is evaluated, as of
    the clock, the other counts as late; the cursor stays at the clock."""
    fleet = make_fleet(db_url, f"SN-{unique}", 1)
    dm = fleet.bindings[(fleet.serials[0], "temperature")]
    add_rule(db_url, dm, {"type": "threshold", "operator": ">", "value": 50}, "Hot")
    engine = RuleEngine(Settings(database_url=db_url), RuleMetrics(CollectorRegistry()))
    clock = datetime.now(UTC).replace(microsecond=0)
    engine.clock = lambda: clock
    ahead = [reading(dm, clock + timedelta(minutes=m), v) for m, v in ((2, 20.0), (4, 80.0))]
    with psycopg.connect(db_url, autocommit=True) as conn, conn.transaction():
        result = engine.on_inserted(conn, ahead)
    assert (result.events, result.late) == ({"triggered": 1}, 1)
    assert [(kind, ts) for kind, ts, _reason in events(db_url)] == [("triggered", clock)]
    with psycopg.connect(db_url, autocommit=True) as conn:
        row = conn.execute("SELECT last_ts, last_value FROM rule_cursors").fetchone()
    assert row == (clock, 80.0)
