"""Scaling out: two daemons on one MQTT shared subscription share the load without loss,
duplicates or corrupted rule state."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import psycopg

from config.settings import Settings
from tests.integration.test_rules_in_pipeline import add_rule, events
from tests.support.daemon import make_service, running
from tests.support.faults import NumberedPublisher, wait_stored
from tests.support.fleet import Publisher, make_fleet, wait_for


def test_two_instances_share_a_subscription_without_loss_or_duplicates(
    make_settings: Callable[..., Settings], db_url: str, broker_url: str, unique: str
) -> None:
    """Readings published to one topic are split between two instances; every acknowledged
    reading is stored once, both instances did part of the work, and a rule fed one reading at
    a time (alternating instances) writes exactly the events one instance would have."""
    fleet = make_fleet(db_url, f"SN-{unique}", 2)
    serial, other = fleet.serials
    dm_id = fleet.bindings[(serial, "temperature")]
    add_rule(
        db_url,
        fleet.bindings[(other, "temperature")],
        {"type": "threshold", "operator": ">", "value": 27.5},
    )
    a = make_service(make_settings(mqtt_client_id=f"a-{unique}", mqtt_shared_group="iothub"))
    b = make_service(make_settings(mqtt_client_id=f"b-{unique}", mqtt_shared_group="iothub"))
    with running(a), running(b):
        pub = NumberedPublisher(
            broker_url, f"t{unique}/devices/{serial}/telemetry", n=2000, rate=1000
        )
        pub.run()
        pub.wait(60)
        numbers, total = wait_stored(db_url, dm_id, pub.base, pub.acked)
        assert pub.acked and pub.acked <= numbers
        assert total == len(numbers)
        assert a.totals["rows"] > 0 and b.totals["rows"] > 0
        assert a.totals["rows"] + b.totals["rows"] == total

        # One reading at a time: whichever instance gets it, the state in the database is
        # the one both read and write under the device_metric's lock.
        t0 = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=30)
        values = [20, 30, 31, 20, 29, 19]
        single = Publisher(broker_url, f"pub-{unique}")
        try:
            for minute, value in enumerate(values):
                single.publish(
                    f"t{unique}/devices/{other}/telemetry",
                    {
                        "ts": (t0 + timedelta(minutes=minute)).isoformat(),
                        "metrics": {"temperature": value},
                    },
                )
                expected_rows = minute + 1
                assert wait_for(
                    lambda n=expected_rows: (
                        _rows(db_url, fleet.bindings[(other, "temperature")]) >= n
                    )
                )
                time.sleep(0.05)
        finally:
            single.close()
    assert events(db_url) == [
        ("triggered", t0 + timedelta(minutes=1)),
        ("resolved", t0 + timedelta(minutes=3)),
        ("triggered", t0 + timedelta(minutes=4)),
        ("resolved", t0 + timedelta(minutes=5)),
    ]


def _rows(dsn: str, dm_id: int) -> int:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM telemetries WHERE device_metric_id = %s", (dm_id,)
        ).fetchone()
        return int(row[0]) if row else 0
