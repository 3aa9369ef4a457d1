"""Rules evaluated in the ingestion transaction: events on transitions, state across restarts,
live rule changes."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import psycopg
import pytest

from config.settings import Settings
from tests.support.daemon import make_service, running
from tests.support.fleet import Publisher, count, make_fleet, wait_for


@pytest.fixture(params=[1, 2], ids=["workers1", "workers2"])
def make_settings(
    make_settings: Callable[..., Settings], request: pytest.FixtureRequest
) -> Callable[..., Settings]:
    """Every scenario runs with one process and with two worker processes."""

    def factory(**overrides: object) -> Settings:
        return make_settings(**{"workers": request.param, **overrides})

    return factory


THRESHOLD = {"type": "threshold", "operator": ">", "value": 27.5, "duration_minutes": 10}
NOTIFY = {
    "type": "notify",
    "channel": "email",
    "message": "High temperature in {device_name}: {value}°C",
}


def add_rule(dsn: str, dm_id: int, condition: dict[str, object], name: str = "High temp") -> int:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(
            "INSERT INTO rules (name, condition, action, device_metric_id) VALUES (%s, %s, %s, %s)"
            " RETURNING id",
            (name, json.dumps(condition), json.dumps(NOTIFY), dm_id),
        ).fetchone()
        assert row
        return int(row[0])


def events(dsn: str) -> list[tuple[str, datetime]]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return [
            (k, ts)
            for k, ts in conn.execute('SELECT kind::text, "timestamp" FROM events ORDER BY id')
        ]


def test_duration_fires_once_and_survives_restart(
    make_settings: Callable[..., Settings], db_url: str, broker_url: str, unique: str
) -> None:
    """A pending duration kept in the database fires once after a restart; redeliveries and
    further matching readings write no more events."""
    fleet = make_fleet(db_url, f"SN-{unique}", 1)
    serial = fleet.serials[0]
    add_rule(db_url, fleet.bindings[(serial, "temperature")], THRESHOLD)
    topic = f"t{unique}/devices/{serial}/telemetry"
    t0 = datetime.now(UTC).replace(second=0, microsecond=0) - timedelta(hours=1)
    pub = Publisher(broker_url, f"pub-{unique}")
    settings = make_settings()

    def reading(minute: int, value: float) -> dict[str, object]:
        return {
            "ts": (t0 + timedelta(minutes=minute)).isoformat(),
            "metrics": {"temperature": value},
        }

    try:
        with running(make_service(settings)) as handle:
            for minute in (0, 5):
                pub.publish(topic, reading(minute, 30.0))
            assert wait_for(lambda: handle.service.totals["rows"] >= 2)
            assert events(db_url) == []
        assert count(db_url, "SELECT count(*) FROM rule_states WHERE status = 'pending'") == 1

        with running(make_service(settings)) as handle:
            pub.publish(topic, reading(5, 30.0))  # a redelivered copy: dropped, never evaluated
            pub.publish(topic, reading(10, 31.0))  # 10 minutes held: fires
            pub.publish(topic, reading(12, 32.0))  # still firing: no new event
            pub.publish(topic, reading(14, 20.0))  # back to normal: resolved
            assert wait_for(lambda: len(events(db_url)) >= 2)
            assert wait_for(lambda: handle.service.totals["rows"] >= 3)
    finally:
        pub.close()
    assert events(db_url) == [
        ("triggered", t0 + timedelta(minutes=10)),
        ("resolved", t0 + timedelta(minutes=14)),
    ]
    assert count(db_url, "SELECT count(*) FROM action_outbox WHERE kind = 'notify'") == 1
    context = count(
        db_url,
        "SELECT count(*) FROM events WHERE context->>'message' LIKE "
        "'High temperature in Device %%: 31%%'",
    )
    assert context == 1


def test_rule_inserted_while_running_takes_effect(
    make_settings: Callable[..., Settings], db_url: str, broker_url: str, unique: str
) -> None:
    """A rule added to the database applies to the next readings, without a restart."""
    fleet = make_fleet(db_url, f"SN-{unique}", 1)
    serial = fleet.serials[0]
    topic = f"t{unique}/devices/{serial}/telemetry"
    now = datetime.now(UTC).replace(microsecond=0)
    pub = Publisher(broker_url, f"pub-{unique}")
    try:
        with running(make_service(make_settings())) as handle:
            pub.publish(
                topic,
                {"ts": (now - timedelta(seconds=30)).isoformat(), "metrics": {"status": "FAULT"}},
            )
            assert wait_for(lambda: handle.service.totals["rows"] >= 1)
            add_rule(
                db_url,
                fleet.bindings[(serial, "status")],
                {"type": "string_match", "operator": "!=", "value": "OK"},
                "Status not OK",
            )
            time.sleep(1.0)  # the design's promise: effective within a second
            pub.publish(topic, {"ts": now.isoformat(), "metrics": {"status": "FAULT"}})
            assert wait_for(lambda: len(events(db_url)) >= 1)
    finally:
        pub.close()
    assert events(db_url) == [("triggered", now)]


def test_editing_a_firing_rule_closes_its_alarm_and_starts_afresh(
    make_settings: Callable[..., Settings], db_url: str, broker_url: str, unique: str
) -> None:
    """A rule edited while FIRING gets a resolved event on its next reading, then is evaluated
    under the new condition from OK."""
    fleet = make_fleet(db_url, f"SN-{unique}", 1)
    serial = fleet.serials[0]
    rule_id = add_rule(
        db_url,
        fleet.bindings[(serial, "temperature")],
        {"type": "threshold", "operator": ">", "value": 25},
    )
    topic = f"t{unique}/devices/{serial}/telemetry"
    t0 = datetime.now(UTC).replace(second=0, microsecond=0) - timedelta(minutes=30)
    pub = Publisher(broker_url, f"pub-{unique}")
    try:
        with running(make_service(make_settings())) as handle:
            pub.publish(topic, {"ts": t0.isoformat(), "metrics": {"temperature": 26}})
            assert wait_for(lambda: len(events(db_url)) >= 1)
            with psycopg.connect(db_url, autocommit=True) as conn:
                conn.execute(
                    "UPDATE rules SET condition = %s WHERE id = %s",
                    (json.dumps({"type": "threshold", "operator": ">", "value": 30}), rule_id),
                )
            time.sleep(1.0)
            pub.publish(
                topic,
                {"ts": (t0 + timedelta(minutes=1)).isoformat(), "metrics": {"temperature": 27}},
            )
            pub.publish(
                topic,
                {"ts": (t0 + timedelta(minutes=2)).isoformat(), "metrics": {"temperature": 31}},
            )
            assert wait_for(lambda: len(events(db_url)) >= 3)
            assert wait_for(lambda: handle.service.totals["rows"] >= 3)
    finally:
        pub.close()
    assert events(db_url) == [
        ("triggered", t0),
        ("resolved", t0 + timedelta(minutes=1)),
        ("triggered", t0 + timedelta(minutes=2)),
    ]
