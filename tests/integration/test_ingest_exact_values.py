"""Numbers and times end to end: what a device sends is what telemetries holds, exactly."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import psycopg

from config.settings import Settings
from tests.integration.test_rules_in_pipeline import add_rule, events
from tests.support.daemon import make_service, running
from tests.support.fleet import Publisher, make_fleet, wait_for

# (JSON number as sent, value_numeric as stored); each is sent as its own reading.
EXACT = [
    ("1e-400", Decimal("1e-400")),
    ("123456789012345678901234567890.5", Decimal("123456789012345678901234567890.5")),
    ("0.1000000000000000055511151231257827", Decimal("0.1000000000000000055511151231257827")),
    ("23.5", Decimal("23.5")),
    ("1E5", Decimal("100000")),
    ("-0", Decimal("0")),
    ("-0.0", Decimal("0")),
    ("42", Decimal("42")),
]
# Refused with a reason instead of being stored rounded.
REFUSED = [
    ("1e400", "value_too_large"),
    ("1" + "0" * 50 + "." + "1" * 60, "value_too_large"),  # 111 significant digits
    ("1e-1001", "value_too_large"),  # a digit 1001 places after the point
]


def test_numbers_are_stored_exactly_or_refused_with_a_reason(
    make_settings: Callable[..., Settings], db_url: str, broker_url: str, unique: str
) -> None:
    """Tiny, long and negative-zero numbers reach value_numeric digit for digit (-0 as 0, since
    numeric has no negative zero), the rule engine takes them, and what cannot be kept is
    value_too_large rather than rounded."""
    fleet = make_fleet(db_url, f"SN-{unique}", 1)
    serial = fleet.serials[0]
    dm_id = fleet.bindings[(serial, "temperature")]
    add_rule(db_url, dm_id, {"type": "threshold", "operator": ">", "value": 1e20})
    topic = f"t{unique}/devices/{serial}/telemetry"
    t0 = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=1)
    sent = [number for number, _ in EXACT] + [number for number, _ in REFUSED]
    pub = Publisher(broker_url, f"pub-{unique}")
    try:
        with running(make_service(make_settings())) as handle:
            for minute, number in enumerate(sent):
                ts = (t0 + timedelta(minutes=minute)).isoformat()
                body = f'{{"ts": "{ts}", "metrics": {{"temperature": {number}}}}}'
                pub.publish(topic, body.encode())
            assert wait_for(
                lambda: (
                    handle.service.totals["rows"] + handle.service.totals["rejected"] >= len(sent)
                )
            )
    finally:
        pub.close()
    with psycopg.connect(db_url, autocommit=True) as conn:
        stored = conn.execute(
            "SELECT ts, value_numeric, value_jsonb->>'t' FROM telemetries"
            " WHERE device_metric_id = %s ORDER BY ts",
            (dm_id,),
        ).fetchall()
        rejected = conn.execute(
            "SELECT reason::text, detail FROM rejected_messages ORDER BY id"
        ).fetchall()
    assert [(ts, value) for ts, value, _ in stored] == [
        (t0 + timedelta(minutes=minute), value) for minute, (_, value) in enumerate(EXACT)
    ]
    assert {kind for _, _, kind in stored} == {"numeric"}
    assert [reason for reason, _ in rejected] == [reason for _, reason in REFUSED]
    assert "significant digits" in rejected[1][1] and "after the decimal point" in rejected[2][1]
    # The 30-digit value went through the rule engine (as the nearest double): it fired.
    assert events(db_url) == [
        ("triggered", t0 + timedelta(minutes=1)),
        ("resolved", t0 + timedelta(minutes=2)),
    ]


def test_rfc3339_timestamps_are_taken_and_iso_week_dates_are_not(
    make_settings: Callable[..., Settings], db_url: str, broker_url: str, unique: str
) -> None:
    """Lower-case t and z, long fractions and a numeric offset are stored at the instant they
    name; an ISO 8601 week date is bad_timestamp, not a reading at a guessed time."""
    fleet = make_fleet(db_url, f"SN-{unique}", 1)
    serial = fleet.serials[0]
    dm_id = fleet.bindings[(serial, "temperature")]
    day = (datetime.now(UTC) - timedelta(days=1)).date()
    week = day.isocalendar()
    texts = [
        f"{day.isoformat()}t10:00:00z",
        f"{day.isoformat()}T11:00:00.123456789Z",
        f"{day.isoformat()}T14:00:00+02:00",
        f"{week.year}-W{week.week:02d}-{week.weekday}T13:00:00Z",
    ]
    pub = Publisher(broker_url, f"pub-{unique}")
    try:
        with running(make_service(make_settings(), rules=False)) as handle:
            for value, text in enumerate(texts):
                pub.publish(
                    f"t{unique}/devices/{serial}/telemetry",
                    {"ts": text, "metrics": {"temperature": value}},
                )
            assert wait_for(
                lambda: (
                    handle.service.totals["rows"] + handle.service.totals["rejected"] >= len(texts)
                )
            )
    finally:
        pub.close()
    midnight = datetime(day.year, day.month, day.day, tzinfo=UTC)
    with psycopg.connect(db_url, autocommit=True) as conn:
        stored = conn.execute(
            "SELECT ts, value_numeric FROM telemetries WHERE device_metric_id = %s ORDER BY ts",
            (dm_id,),
        ).fetchall()
        rejected = conn.execute("SELECT reason::text FROM rejected_messages").fetchall()
    assert stored == [
        (midnight + timedelta(hours=10), 0),
        (midnight + timedelta(hours=11, microseconds=123456), 1),
        (midnight + timedelta(hours=12), 2),
    ]
    assert rejected == [("bad_timestamp",)]
