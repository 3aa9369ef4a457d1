"""The rule engine never costs the telemetry, or the other rules, for one bad or vanished rule."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import psycopg
from prometheus_client import CollectorRegistry
from psycopg_pool import ConnectionPool
from structlog.testing import capture_logs

from config.settings import Settings
from ingestor.hooks import BatchReading
from rules_engine.engine import RuleEngine
from rules_engine.metrics import RuleMetrics
from rules_engine.no_data import NoDataWorker
from tests.integration.test_rules_in_pipeline import NOTIFY, add_rule, events
from tests.support.fleet import make_fleet

HOT = {"type": "threshold", "operator": ">", "value": 25}


def reading(dm: int, ts: datetime, value: float) -> BatchReading:
    return BatchReading(dm, ts, value, "numeric", "SN", "Device", "temperature")


def test_a_rule_that_cannot_be_compiled_is_skipped_not_fatal(db_url: str, unique: str) -> None:
    """A stored condition Python cannot even hold (a number beyond float range) is reported as
    rule_invalid and skipped; the other rule on the same binding still fires."""
    fleet = make_fleet(db_url, f"SN-{unique}", 1)
    dm = fleet.bindings[(fleet.serials[0], "temperature")]
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO rules (name, condition, action, device_metric_id) VALUES (%s, %s, %s, %s)",
            (
                "Huge",
                '{"type": "threshold", "operator": ">", "value": 1e309}',
                json.dumps(NOTIFY),
                dm,
            ),
        )
    add_rule(db_url, dm, HOT, "Hot")
    engine = RuleEngine(Settings(database_url=db_url), RuleMetrics(CollectorRegistry()))
    ts = datetime.now(UTC).replace(microsecond=0)
    with (
        psycopg.connect(db_url, autocommit=True) as conn,
        capture_logs() as logs,
        conn.transaction(),
    ):
        result = engine.on_inserted(conn, [reading(dm, ts, 30.0)])
    assert result.events == {"triggered": 1}
    assert [e["rule_name"] for e in logs if e["event"] == "rule_invalid"] == ["Huge"]
    assert events(db_url) == [("triggered", ts)]


def test_a_rule_deleted_after_the_cache_loaded_costs_nothing(db_url: str, unique: str) -> None:
    """A rule deleted before the reload notification arrives is left out of the batch instead
    of failing its inserts; the rules still there keep their effects."""
    fleet = make_fleet(db_url, f"SN-{unique}", 1)
    dm = fleet.bindings[(fleet.serials[0], "temperature")]
    add_rule(db_url, dm, HOT, "Hot")
    doomed = add_rule(db_url, dm, HOT, "Doomed")
    engine = RuleEngine(Settings(database_url=db_url), RuleMetrics(CollectorRegistry()))
    ts = datetime.now(UTC).replace(microsecond=0)
    with psycopg.connect(db_url, autocommit=True) as conn:
        engine.cache.current(conn)  # cached with both rules
        conn.execute("DELETE FROM rules WHERE id = %s", (doomed,))
        with conn.transaction():
            result = engine.on_inserted(conn, [reading(dm, ts, 30.0)])
        names = [
            r[0]
            for r in conn.execute("SELECT r.name FROM events e JOIN rules r ON r.id = e.rule_id")
        ]
    assert result.events == {"triggered": 1}
    assert names == ["Hot"]


def test_no_data_waits_for_the_backlog(db_url: str, unique: str) -> None:
    """While ingestion is behind, silence is judged only up to what was ingested: a device whose
    readings are still queued does not raise a no_data alarm. Silence counts from when the
    service received the last reading, on its own clock."""
    fleet = make_fleet(db_url, f"SN-{unique}", 1)
    dm = fleet.bindings[(fleet.serials[0], "temperature")]
    add_rule(db_url, dm, {"type": "no_data", "minutes": 10}, "Silent")
    settings = Settings(database_url=db_url)
    engine = RuleEngine(settings, RuleMetrics(CollectorRegistry()))
    last = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=30)
    with psycopg.connect(db_url, autocommit=True) as conn, conn.transaction():
        engine.on_inserted(conn, [reading(dm, last, 20.0)])
    with psycopg.connect(db_url, autocommit=True) as conn:
        row = conn.execute("SELECT last_received FROM rule_cursors").fetchone()
        assert row
        received: datetime = row[0]
    later = received + timedelta(minutes=11)
    with ConnectionPool(db_url, min_size=1, max_size=1, kwargs={"autocommit": True}) as pool:
        worker = NoDataWorker(engine, pool)
        engine.backlog_age = lambda: 3600.0  # an hour of readings still waiting in the queue
        assert worker.check(later) == 0
        engine.backlog_age = lambda: 0.0
        assert worker.check(later) == 1
    assert events(db_url) == [("triggered", received + timedelta(minutes=10))]
