"""Fault injection: nothing acknowledged by the broker is lost, nothing is stored twice.

Publishers send numbered QoS 1 readings; at the end, lost = acknowledged by the broker but not
in the database, duplicates = rows minus distinct readings. Both must be 0.
"""

from __future__ import annotations

import json
import random
import signal
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest

from tests.support.faults import Daemon, NumberedPublisher, wait_stored
from tests.support.fleet import Publisher, count, make_fleet, wait_for
from tests.support.services import LocalMosquitto, LocalPostgres

pytestmark = pytest.mark.slow


@pytest.fixture(params=[1, 2], ids=["workers1", "workers2"])
def workers(request: pytest.FixtureRequest) -> int:
    """Each fault test runs with one process and with two worker processes."""
    return int(request.param)


def daemon_env(dsn: str, broker_url: str, unique: str, workers: int = 1) -> dict[str, str]:
    return {
        "IOTHUB_WORKERS": str(workers),
        "IOTHUB_DATABASE_URL": dsn,
        "IOTHUB_MQTT_URL": broker_url,
        "IOTHUB_MQTT_CLIENT_ID": f"iothub-fault-{unique}",
        "IOTHUB_MQTT_TOPICS": f"t{unique}/devices/{{serial_id}}/telemetry",
        "IOTHUB_HTTP_PORT": "0",
        "IOTHUB_LOG_FORMAT": "json",
        "IOTHUB_BATCH_INTERVAL": "0.05",
        "IOTHUB_BATCH_SIZE": "200",
        "IOTHUB_STATS_INTERVAL": "2",
        "IOTHUB_SHUTDOWN_TIMEOUT": "20",
    }


def check_no_loss(dsn: str, dm_id: int, pub: NumberedPublisher, daemon: Daemon) -> None:
    numbers, total = wait_stored(dsn, dm_id, pub.base, pub.acked, timeout=60)
    lost = pub.acked - numbers
    assert pub.acked, "the broker acknowledged nothing: the test proves nothing"
    if lost:
        with psycopg.connect(dsn, autocommit=True) as conn:
            rejected = conn.execute(
                "SELECT reason, detail FROM rejected_messages LIMIT 5"
            ).fetchall()
        problems = [
            line
            for line in daemon.log_path.read_text().splitlines()
            if '"level": "error"' in line or '"level": "warning"' in line
        ]
        raise AssertionError(
            f"{len(lost)} acknowledged readings lost, e.g. {sorted(lost)[:10]}; "
            f"rejected: {rejected}; warnings: {problems[:20]}"
        )
    assert total == len(numbers), f"{total - len(numbers)} duplicate rows"


def test_kill_9_at_random_points_loses_nothing(
    db_url: str, broker_url: str, unique: str, tmp_path: Path, workers: int
) -> None:
    """The daemon killed with SIGKILL three times mid-stream and restarted: no loss, no
    duplicates (the broker redelivers what was not acknowledged; the unique key drops copies)."""
    fleet = make_fleet(db_url, f"SN-{unique}", 1)
    serial = fleet.serials[0]
    dm_id = fleet.bindings[(serial, "temperature")]
    daemon = Daemon(daemon_env(db_url, broker_url, unique, workers), tmp_path / "daemon.log")
    daemon.start()
    daemon.wait_log("service_ready")
    pub = NumberedPublisher(broker_url, f"t{unique}/devices/{serial}/telemetry", n=3000, rate=400)
    pub.run()
    rng = random.Random(1234)
    for round_no in range(3):
        time.sleep(rng.uniform(0.5, 1.5))
        daemon.kill9()
        time.sleep(rng.uniform(0.0, 0.5))
        daemon.start()
        daemon.wait_log("service_ready", occurrences=round_no + 2)
    pub.wait(60)
    check_no_loss(db_url, dm_id, pub, daemon)
    assert daemon.terminate() == 0


def test_postgres_crash_mid_stream_loses_nothing(
    local_postgres: LocalPostgres, broker_url: str, unique: str, tmp_path: Path, workers: int
) -> None:
    """PostgreSQL stopped with `-m immediate` and restarted: the daemon keeps its broker
    connection, stops acknowledging, retries with backoff and resumes without loss."""
    dsn = psycopg.conninfo.make_conninfo(local_postgres.admin_dsn, dbname="iothub")
    fleet = make_fleet(dsn, f"SN-{unique}", 1)
    serial = fleet.serials[0]
    dm_id = fleet.bindings[(serial, "temperature")]
    daemon = Daemon(daemon_env(dsn, broker_url, unique, workers), tmp_path / "daemon.log")
    daemon.start()
    daemon.wait_log("service_ready")
    pub = NumberedPublisher(broker_url, f"t{unique}/devices/{serial}/telemetry", n=2000, rate=400)
    pub.run()
    time.sleep(1.0)
    local_postgres.stop("immediate")
    daemon.wait_log("db_unavailable")
    time.sleep(2.0)
    local_postgres.start()
    daemon.wait_log("db_recovered", timeout=60)
    pub.wait(60)
    check_no_loss(dsn, dm_id, pub, daemon)
    assert daemon.alive()
    assert '"event": "mqtt_disconnected"' not in daemon.log_path.read_text()
    assert daemon.terminate() == 0


def test_broker_restart_mid_stream_loses_nothing(
    db_url: str, local_mosquitto: LocalMosquitto, unique: str, tmp_path: Path, workers: int
) -> None:
    """Mosquitto stopped with SIGTERM mid-stream and started again: the daemon reconnects to
    the same session and every acknowledged reading is stored once."""
    fleet = make_fleet(db_url, f"SN-{unique}", 1)
    serial = fleet.serials[0]
    dm_id = fleet.bindings[(serial, "temperature")]
    daemon = Daemon(
        daemon_env(db_url, local_mosquitto.url, unique, workers), tmp_path / "daemon.log"
    )
    daemon.start()
    daemon.wait_log("service_ready")
    pub = NumberedPublisher(
        local_mosquitto.url, f"t{unique}/devices/{serial}/telemetry", n=2000, rate=400
    )
    pub.run()
    time.sleep(1.5)
    local_mosquitto.stop(signal.SIGTERM)
    daemon.wait_log("mqtt_disconnected")
    time.sleep(1.0)
    local_mosquitto.start()
    daemon.wait_log("mqtt_connected", occurrences=2, timeout=60)
    pub.wait(90)
    check_no_loss(db_url, dm_id, pub, daemon)
    assert daemon.terminate() == 0


def test_bad_input_corpus_is_rejected_and_the_daemon_lives(
    db_url: str, broker_url: str, unique: str, tmp_path: Path, workers: int
) -> None:
    """Each kind of bad payload, mixed with good readings, is recorded with its reason code;
    every good reading is stored and the daemon stays up."""
    fleet = make_fleet(db_url, f"SN-{unique}", 2, inactive=[f"SN-{unique}-1"])
    serial, inactive = fleet.serials
    dm_id = fleet.bindings[(serial, "temperature")]
    topic = f"t{unique}/devices/{serial}/telemetry"
    now = datetime.now(UTC).replace(microsecond=0)
    corpus: list[tuple[str, bytes, str]] = [
        (topic, b"\xff\xfe not utf-8", "bad_json"),
        (topic, b'{"metrics": {"temperature": 1', "bad_json"),
        (topic, b'{"metrics": {"temperature": NaN}}', "bad_json"),
        (topic, b'{"metrics": {"temperature": Infinity}}', "bad_json"),
        (topic, b'{"metrics": {"temperature": "warm"}}', "type_mismatch"),
        (topic, b'{"metrics": {"online": 1}}', "type_mismatch"),
        (topic, b'{"metrics": {"status": "O\\u0000K"}}', "type_mismatch"),
        (topic, json.dumps({"metrics": {"status": "x" * 5000}}).encode(), "value_too_large"),
        # Over max_payload_bytes but within the Maximum Packet Size we announce (a larger one
        # never reaches us: the broker drops it, see test_storage_bounds).
        (topic, b'"' + b"x" * (256 * 1024 + 100) + b'"', "payload_too_large"),
        (topic, b'{"metrics": {"nosuch": 1}}', "unknown_metric"),
        (
            f"t{unique}/devices/SN-NOBODY/telemetry",
            b'{"metrics": {"temperature": 1}}',
            "unknown_device",
        ),
        (
            f"t{unique}/devices/{inactive}/telemetry",
            b'{"metrics": {"temperature": 1}}',
            "inactive_device",
        ),
        (topic, b'{"device": "SN-OTHER", "metrics": {"temperature": 1}}', "device_mismatch"),
        (topic, b'{"ts": "yesterday", "metrics": {"temperature": 1}}', "bad_timestamp"),
        (
            topic,
            json.dumps(
                {"ts": (now + timedelta(days=365)).isoformat(), "metrics": {"temperature": 1}}
            ).encode(),
            "ts_in_future",
        ),
        (
            topic,
            json.dumps(
                {"ts": (now - timedelta(days=3650)).isoformat(), "metrics": {"temperature": 1}}
            ).encode(),
            "ts_too_old",
        ),
        (topic, b'"just a string"', "bad_schema"),
        (topic, b'{"schema_version": 2, "metrics": {"temperature": 1}}', "bad_schema"),
    ]
    daemon = Daemon(
        daemon_env(db_url, broker_url, unique, workers)
        | {
            "IOTHUB_MQTT_TOPICS": f"t{unique}/devices/{{serial_id}}/telemetry,t{unique}/telemetry",
        },
        tmp_path / "daemon.log",
    )
    daemon.start()
    daemon.wait_log("service_ready")
    pub = Publisher(broker_url, f"pub-{unique}")
    good = 0
    try:
        for i, (bad_topic, payload, _reason) in enumerate(corpus):
            pub.publish(bad_topic, payload)
            pub.publish(
                topic,
                {"ts": (now - timedelta(seconds=i)).isoformat(), "metrics": {"temperature": i}},
            )
            good += 1
    finally:
        pub.close()
    assert wait_for(
        lambda: count(db_url, "SELECT count(*) FROM rejected_messages") >= len(corpus), timeout=30
    )
    assert wait_for(
        lambda: (
            count(db_url, "SELECT count(*) FROM telemetries WHERE device_metric_id = %s", dm_id)
            >= good
        )
    )
    with psycopg.connect(db_url, autocommit=True) as conn:
        rows = conn.execute("SELECT reason, count(*) FROM rejected_messages GROUP BY 1").fetchall()
    got: dict[str, int] = dict(rows)
    expected: dict[str, int] = {}
    for _topic, _payload, reason in corpus:
        expected[reason] = expected.get(reason, 0) + 1
    assert got == expected
    assert (
        count(db_url, "SELECT count(*) FROM telemetries WHERE device_metric_id = %s", dm_id) == good
    )
    assert daemon.alive()
    assert daemon.terminate() == 0
