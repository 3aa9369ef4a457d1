"""Sparkplug B end to end: the daemon with every decoder configured, a real Mosquitto and a real
database. Births define aliases that survive a restart of iothub (they are kept in the
database); data before any birth is rejected as unknown_alias; signed integers sign-extended in
uint32 are stored as the negative numbers they are.

The topics are Sparkplug's own namespace (spBv1.0/...), so each test has a group of its own.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import psycopg
from structlog.testing import capture_logs

from config.settings import Settings
from ingestor.decoders import sparkplug_b_pb2 as pb
from ingestor.decoders.sparkplug_b import DataType
from iothub.daemon.service import IngestService
from iothub.devtools.simulator import formats
from tests.integration import test_sources
from tests.integration.test_sources import (
    rejected,
    simulate_into_daemon,
    sparkplug_sources,
    stored,
)
from tests.support.fleet import Publisher, count, make_fleet, wait_for

# The daemon with every decoder's source, sparkplug_b among them.
daemon = test_sources.daemon


def stop(service: IngestService) -> None:
    service.request_stop("restart")
    assert wait_for(lambda: service.pipeline.wait_flushed(0.1), timeout=30)


def ms(at: datetime) -> int:
    return int(at.timestamp() * 1000)


def payload(*metrics: pb.Payload.Metric, at: datetime, seq: int) -> bytes:
    return pb.Payload(timestamp=ms(at), seq=seq, metrics=metrics).SerializeToString()


def dbirth(at: datetime) -> bytes:
    return payload(
        pb.Payload.Metric(name="temperature", alias=1, datatype=DataType.Float, float_value=21.5),
        pb.Payload.Metric(name="humidity", alias=2, datatype=DataType.Int8, int_value=40),
        pb.Payload.Metric(name="status", alias=3, datatype=DataType.String, string_value="OK"),
        pb.Payload.Metric(name="online", alias=4, datatype=DataType.Boolean, boolean_value=True),
        pb.Payload.Metric(
            name="Node Control/Rebirth", alias=5, datatype=DataType.Boolean, boolean_value=False
        ),
        at=at,
        seq=1,
    )


def ddata(at: datetime, seq: int = 2) -> bytes:
    return payload(
        pb.Payload.Metric(alias=1, timestamp=ms(at), float_value=22.25),
        pb.Payload.Metric(alias=2, timestamp=ms(at), int_value=4294967209),  # Int8 -87
        pb.Payload.Metric(alias=3, timestamp=ms(at), string_value="FAULT"),
        at=at,
        seq=seq,
    )


def aliases(db_url: str) -> list[tuple[str, str, str, str, int, int]]:
    with psycopg.connect(db_url, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT group_id, edge_node_id, device_id, metric_name, alias, datatype "
            "FROM sparkplug_aliases ORDER BY alias"
        ).fetchall()
    return [(r[0], r[1], r[2], r[3], int(r[4]), r[5]) for r in rows]


def publish_and_wait(
    broker_url: str, unique: str, messages: list[tuple[str, bytes]], done: Callable[[], bool]
) -> None:
    """Publish at QoS 1 (each acknowledged by the broker), then wait until ``done``."""
    pub = Publisher(broker_url, f"pub-{unique}")
    try:
        for topic, data in messages:
            pub.publish(topic, data)
        assert wait_for(done)
    finally:
        pub.close()


def test_birth_then_data_across_a_restart_of_iothub(
    daemon: Callable[[], IngestService], db_url: str, broker_url: str, unique: str
) -> None:
    """DBIRTH stored (its values are readings, its aliases kept); iothub restarts; DDATA by alias
    is resolved from the database, with the sign-extended Int8 stored as -87."""
    fleet = make_fleet(db_url, f"spb{unique}", 1)
    serial = fleet.serials[0]
    born = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=2)
    later = born + timedelta(seconds=30)
    topic = f"spBv1.0/g{unique}/{{}}/edge1/{serial}"
    pub = Publisher(broker_url, f"pub-{unique}")
    try:
        first = daemon()
        pub.publish(topic.format("DBIRTH"), dbirth(born))
        assert wait_for(lambda: count(db_url, "SELECT count(*) FROM telemetries") >= 4)
        stop(first)
        assert [a[3:] for a in aliases(db_url)] == [
            ("temperature", 1, DataType.Float),
            ("humidity", 2, DataType.Int8),
            ("status", 3, DataType.String),
            ("online", 4, DataType.Boolean),
            ("Node Control/Rebirth", 5, DataType.Boolean),
        ]
        daemon()  # a new process would load the same rows: nothing of the first is reused
        pub.publish(topic.format("DDATA"), ddata(later))
        assert wait_for(lambda: count(db_url, "SELECT count(*) FROM telemetries") >= 7)
    finally:
        pub.close()
    assert stored(db_url, fleet, serial, "temperature") == [(born, 21.5), (later, 22.25)]
    assert stored(db_url, fleet, serial, "humidity") == [(born, 40), (later, -87)]
    assert stored(db_url, fleet, serial, "status") == [(born, "OK"), (later, "FAULT")]
    assert stored(db_url, fleet, serial, "online") == [(born, True)]
    assert rejected(db_url) == []


def test_data_before_any_birth_is_rejected_with_the_reason(
    daemon: Callable[[], IngestService], db_url: str, broker_url: str, unique: str
) -> None:
    serial = make_fleet(db_url, f"spb{unique}", 1).serials[0]
    daemon()
    data = ddata(datetime.now(UTC).replace(microsecond=0) - timedelta(seconds=5))
    topic = f"spBv1.0/g{unique}/DDATA/edge1/{serial}"
    messages = [(topic, data), (topic, b"not protobuf \xff\xff")]
    publish_and_wait(broker_url, unique, messages, lambda: len(rejected(db_url)) >= 4)
    assert count(db_url, "SELECT count(*) FROM telemetries") == 0
    rows = rejected(db_url)
    assert [(reason, who) for reason, who, _, _ in rows] == [
        ("unknown_alias", serial),
        ("unknown_alias", serial),
        ("unknown_alias", serial),
        ("bad_schema", serial),
    ]
    assert rows[0][3].startswith(
        f"source 'spb-devices': metric[0]: alias 1 is not defined by a birth of "
        f"'g{unique}/edge1/{serial}'"
    )
    assert "not a Sparkplug B protobuf message" in rows[3][3]
    assert aliases(db_url) == []


def test_births_of_unknown_devices_are_not_kept_and_deaths_are_not_telemetry(
    daemon: Callable[[], IngestService], db_url: str, broker_url: str, unique: str
) -> None:
    serial = make_fleet(db_url, f"spb{unique}", 1).serials[0]
    daemon()
    now = datetime.now(UTC).replace(microsecond=0) - timedelta(seconds=5)
    messages = [
        (f"spBv1.0/g{unique}/DBIRTH/edge1/stranger", dbirth(now)),
        (f"spBv1.0/g{unique}/NDEATH/edge1", payload(at=now, seq=0)),
        (f"spBv1.0/g{unique}/DBIRTH/edge1/{serial}", dbirth(now)),
    ]

    def done() -> bool:
        stored = count(db_url, "SELECT count(*) FROM telemetries")
        return stored >= 4 and len(rejected(db_url)) >= 4

    publish_and_wait(broker_url, unique, messages, done)
    assert {a[2] for a in aliases(db_url)} == {serial}
    # The stranger's four readings are unknown_device (Node Control/* is excluded); the NDEATH
    # left no trace.
    assert [(reason, who) for reason, who, _, _ in rejected(db_url)] == [
        ("unknown_device", "stranger")
    ] * 4


def test_simulate_sparkplug_traffic_is_ingested_with_its_printed_sources(
    make_settings: Callable[..., Settings], db_url: str, unique: str
) -> None:
    """`iothub simulate --format sparkplug` (NBIRTH, DBIRTH, then DDATA by alias, with a
    negative Int8 rssi) into a daemon configured with the sources the simulator prints: every
    reading stored, none rejected, the device births kept."""
    fleet = make_fleet(db_url, f"simspb{unique}", 2)
    settings = make_settings(sources=tuple(formats.sources_of("sparkplug")))
    service = simulate_into_daemon(settings, "sparkplug", fleet, unique, rate=4, messages=5)
    assert rejected(db_url) == []
    assert service.totals["duplicates"] == 0
    # Every device message (all but the NBIRTH) carries the device's four metrics.
    assert count(db_url, "SELECT count(*) FROM telemetries") == 4 * (service.totals["messages"] - 1)
    assert {a[2] for a in aliases(db_url)} == set(fleet.serials)


def test_shared_subscription_with_sparkplug_sources_is_warned_at_start(
    make_settings: Callable[..., Settings], unique: str
) -> None:
    """Births reach one instance of a shared group and their data maybe another: said at start."""
    settings = make_settings(sources=tuple(sparkplug_sources(unique)), mqtt_shared_group="spb")
    service = IngestService(settings)
    thread = threading.Thread(target=service.run, name="test-service")
    with capture_logs() as logs:
        thread.start()
        try:
            assert service.wait_ready(30)
        finally:
            service.request_stop("test over")
            thread.join(30)
    [warned] = [e for e in logs if e["event"] == "sparkplug_shared_subscription"]
    assert warned["group"] == "spb"
    assert "unknown_alias" in warned["why"]
