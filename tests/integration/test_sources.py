"""Sources end to end: every decoder of this build configured at once, a real Mosquitto, a real
database and the daemon in-process; readings stored, rejections recorded with their reason.

Payloads are the ones tests/unit/test_decoders.py quotes from each project's documentation; only
their time is moved to now, since the daemon checks times against its own clock.
"""

from __future__ import annotations

import argparse
import json
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import psycopg
import pytest
from structlog.testing import capture_logs

from config.settings import Settings
from iothub import exitcodes
from iothub.cli import simulate as simulate_cli
from iothub.daemon.service import IngestService
from iothub.devtools.simulator import formats
from tests.integration.test_retained_and_qos import publish_retained
from tests.support.fleet import Fleet, Publisher, count, make_fleet, wait_for
from tests.unit.test_decoder_ttn import DATA_FORMATS_UPLINK, MQTT_JOIN, MQTT_UPLINK_UNDECODED

AMSTERDAM = ZoneInfo("Europe/Amsterdam")


def sparkplug_sources(unique: str) -> list[dict[str, Any]]:
    """The two Sparkplug B sources (devices, edge nodes) on this test's own group."""
    return [
        {
            "name": "spb-devices",
            "topic": f"spBv1.0/g{unique}/{{type}}/{{node}}/{{device}}",
            "decoder": "sparkplug_b",
            "serial": "{device}",
            "exclude": ["Node Control/*"],
        },
        {
            "name": "spb-nodes",
            "topic": f"spBv1.0/g{unique}/{{type}}/{{node}}",
            "decoder": "sparkplug_b",
            "serial": "{node}",
        },
    ]


def all_sources(unique: str) -> list[dict[str, Any]]:
    """One source per decoder, on this test's own topics."""
    return [
        {
            "name": "tasmota",
            "topic": f"t{unique}/tele/{{node}}/SENSOR",
            "decoder": "tasmota",
            "serial": "{node}",
            "time_zone": "Europe/Amsterdam",
            "rename": {"BME280.Temperature": "temperature", "BME280.Humidity": "humidity"},
            "values": {"ON": True, "OFF": False},
        },
        {
            "name": "z2m",
            "topic": f"t{unique}/z2m/{{name+}}",
            "decoder": "flat_json",
            "serial": "{name}",
            "time_field": "last_seen",
            "exclude": ["linkquality"],
            "exclude_topics": [f"t{unique}/z2m/bridge/#", f"t{unique}/z2m/+/+/availability"],
        },
        {
            "name": "esphome",
            "topic": f"t{unique}/esp/{{node}}/sensor/{{object}}/state",
            "decoder": "value",
            "serial": "{node}",
            "metric": "{object}",
            "values": {"ON": True, "OFF": False},
        },
        {
            "name": "senml",
            "topic": f"t{unique}/senml/{{site}}",
            "decoder": "senml",
        },
        {
            "name": "ttn",
            "topic": f"t{unique}/v3/{{app}}/devices/{{device}}/{{kind+}}",
            "decoder": "ttn",
            "serial": "{device}",
        },
        *sparkplug_sources(unique),
        {
            "name": "legacy",
            "topic": f"t{unique}/legacy/{{s}}/up",
            "decoder": "native",
            "serial": "{s}",
        },
    ]


@pytest.fixture
def daemon(
    make_settings: Callable[..., Settings], unique: str
) -> Iterator[Callable[[], IngestService]]:
    started: list[tuple[IngestService, threading.Thread]] = []

    def start() -> IngestService:
        service = IngestService(make_settings(sources=tuple(all_sources(unique))))
        thread = threading.Thread(target=service.run, name="test-service")
        thread.start()
        assert service.wait_ready(30), "service did not become ready"
        started.append((service, thread))
        return service

    yield start
    for service, thread in started:
        service.request_stop("test over")
        thread.join(30)
        assert not thread.is_alive()


def stored(db_url: str, fleet: Fleet, serial: str, metric: str) -> list[tuple[datetime, Any]]:
    with psycopg.connect(db_url, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT ts, value_jsonb -> 'v' FROM telemetries WHERE device_metric_id = %s "
            "ORDER BY ts",
            (fleet.bindings[(serial, metric)],),
        ).fetchall()
    return [(ts, value) for ts, value in rows]


def rejected(db_url: str) -> list[tuple[str, str | None, str | None, str]]:
    with psycopg.connect(db_url, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT reason, serial_id, metric, detail FROM rejected_messages ORDER BY id"
        ).fetchall()
    return [(r[0], r[1], r[2], r[3]) for r in rows]


def simulate_into_daemon(
    settings: Settings,
    fmt: str,
    fleet: Fleet,
    unique: str,
    *,
    rate: float,
    messages: int,
    qos: str = "1",
) -> IngestService:
    """Run `iothub simulate --format fmt --qos qos` for 2.5 s into a daemon started with
    `settings`; returns the stopped service once it had committed `messages`."""
    service = IngestService(settings)
    thread = threading.Thread(target=service.run, name="test-service")
    thread.start()
    try:
        assert service.wait_ready(30)
        parser = argparse.ArgumentParser()
        simulate_cli.add_arguments(parser)
        args = parser.parse_args(
            ["--format", fmt, "--qos", qos, "--duration", "2.5", "--rate", str(rate),
             "--devices", ",".join(fleet.serials), "--client-id", f"sim-{unique}"]
        )  # fmt: skip
        assert simulate_cli.main(settings, args) == exitcodes.OK
        assert wait_for(lambda: service.totals["messages"] >= messages)
    finally:
        service.request_stop("test over")
        thread.join(30)
    return service


def test_tasmota_through_the_daemon(
    daemon: Callable[[], IngestService], db_url: str, broker_url: str, unique: str
) -> None:
    """Tasmota's BME280 message in Amsterdam wall time is stored at the right UTC instant; the
    unbound Pressure is unknown_metric and a time in the DST gap is bad_timestamp."""
    fleet = make_fleet(db_url, f"tas{unique}", 1)
    serial = fleet.serials[0]
    daemon()
    local = datetime.now(AMSTERDAM).replace(microsecond=0, tzinfo=None) - timedelta(minutes=1)
    message = {
        "Time": local.isoformat(),
        "BME280": {"Temperature": 21.7, "Humidity": 66.6, "Pressure": 988.6},
        "PressureUnit": "hPa",
        "TempUnit": "C",
    }
    pub = Publisher(broker_url, f"pub-{unique}")
    try:
        pub.publish(f"t{unique}/tele/{serial}/SENSOR", message)
        pub.publish(
            f"t{unique}/tele/{serial}/SENSOR",
            {"Time": "2026-03-29T02:30:00", "BME280": {"Temperature": 1}},
        )
        assert wait_for(lambda: len(rejected(db_url)) >= 2)
        assert wait_for(lambda: count(db_url, "SELECT count(*) FROM telemetries") >= 2)
    finally:
        pub.close()
    at = local.replace(tzinfo=AMSTERDAM).astimezone(UTC)
    assert stored(db_url, fleet, serial, "temperature") == [(at, 21.7)]
    assert stored(db_url, fleet, serial, "humidity") == [(at, 66.6)]
    reasons = {(reason, metric) for reason, _, metric, _ in rejected(db_url)}
    assert reasons == {("unknown_metric", "BME280.Pressure"), ("bad_timestamp", "temperature")}
    with psycopg.connect(db_url, autocommit=True) as conn:
        units = conn.execute(
            "SELECT value_jsonb ->> 'u' FROM telemetries WHERE device_metric_id IN (%s, %s) "
            "ORDER BY device_metric_id",
            (fleet.bindings[(serial, "temperature")], fleet.bindings[(serial, "humidity")]),
        ).fetchall()
    # TempUnit is the unit of the temperature reading, and of nothing else.
    assert sorted(units, key=str) == sorted([("C",), (None,)], key=str)


def test_zigbee2mqtt_through_the_daemon(
    daemon: Callable[[], IngestService], db_url: str, broker_url: str, unique: str
) -> None:
    """A friendly name with "/" is the serial; last_seen (ISO with offset) is the time;
    linkquality, bridge and availability topics are neither stored nor rejected."""
    fleet = make_fleet(db_url, f"kitchen/{unique}", 1)
    serial = fleet.serials[0]  # "kitchen/<unique>-0": two topic levels
    daemon()
    seen = datetime.now(UTC).replace(microsecond=0) - timedelta(seconds=30)
    pub = Publisher(broker_url, f"pub-{unique}")
    try:
        pub.publish(f"t{unique}/z2m/bridge/state", {"state": "online"})
        pub.publish(f"t{unique}/z2m/{serial}/availability", {"state": "online"})
        pub.publish(
            f"t{unique}/z2m/{serial}",
            {
                "temperature": 27.34,
                "humidity": 44.72,
                "linkquality": 18,
                "last_seen": seen.astimezone(AMSTERDAM).isoformat(),
            },
        )
        assert wait_for(lambda: count(db_url, "SELECT count(*) FROM telemetries") >= 2)
    finally:
        pub.close()
    assert stored(db_url, fleet, serial, "temperature") == [(seen, 27.34)]
    assert stored(db_url, fleet, serial, "humidity") == [(seen, 44.72)]
    assert rejected(db_url) == []


def test_esphome_values_through_the_daemon(
    daemon: Callable[[], IngestService], db_url: str, broker_url: str, unique: str
) -> None:
    """ "23.5" is a number, "nan" a type_mismatch (never 0), "ON" a boolean through values; a
    retained state published before start is not replayed (retain handling 2)."""
    fleet = make_fleet(db_url, f"esp{unique}", 1)
    serial = fleet.serials[0]
    base = f"t{unique}/esp/{serial}/sensor"
    publish_retained(broker_url, f"{base}/status/state", b"retained-old")
    service = daemon()
    pub = Publisher(broker_url, f"pub-{unique}")
    try:
        pub.publish(f"{base}/temperature/state", b"23.5")
        pub.publish(f"{base}/humidity/state", b"nan")
        pub.publish(f"{base}/online/state", b"ON")
        assert wait_for(lambda: count(db_url, "SELECT count(*) FROM telemetries") >= 2)
        assert wait_for(lambda: len(rejected(db_url)) >= 1)
        assert wait_for(lambda: service.totals["messages"] >= 3)
    finally:
        pub.close()
        publish_retained(broker_url, f"{base}/status/state", b"")  # clear the broker's copy
    assert [v for _, v in stored(db_url, fleet, serial, "temperature")] == [23.5]
    assert [v for _, v in stored(db_url, fleet, serial, "online")] == [True]
    assert stored(db_url, fleet, serial, "humidity") == []
    assert stored(db_url, fleet, serial, "status") == []
    [(reason, who, metric, detail)] = rejected(db_url)
    assert (reason, who, metric) == ("type_mismatch", serial, "humidity")
    assert "'nan'" in detail


def test_native_source_and_native_topics_side_by_side(
    daemon: Callable[[], IngestService], db_url: str, broker_url: str, unique: str
) -> None:
    """The native decoder on a source's topic, and mqtt_topics unchanged, in one daemon."""
    fleet = make_fleet(db_url, f"nat{unique}", 2)
    first, second = fleet.serials
    daemon()
    now = datetime.now(UTC).replace(microsecond=0)
    pub = Publisher(broker_url, f"pub-{unique}")
    try:
        pub.publish(
            f"t{unique}/legacy/{first}/up",
            {"ts": now.isoformat(), "metrics": {"temperature": 20}},
        )
        pub.publish(
            f"t{unique}/devices/{second}/telemetry",
            {"ts": now.isoformat(), "metrics": {"temperature": 21}},
        )
        pub.publish(f"t{unique}/legacy/{first}/up", b"{not json")
        assert wait_for(lambda: count(db_url, "SELECT count(*) FROM telemetries") >= 2)
        assert wait_for(lambda: len(rejected(db_url)) >= 1)
    finally:
        pub.close()
    assert stored(db_url, fleet, first, "temperature") == [(now, 20)]
    assert stored(db_url, fleet, second, "temperature") == [(now, 21)]
    [(reason, who, _, detail)] = rejected(db_url)
    assert (reason, who) == ("bad_json", first)
    assert detail.startswith("source 'legacy': ")


def test_service_started_names_the_sources(
    make_settings: Callable[..., Settings], unique: str
) -> None:
    """The start line lists every configured source, so the log says what is being decoded."""
    service = IngestService(make_settings(sources=tuple(all_sources(unique))))
    thread = threading.Thread(target=service.run, name="test-service")
    with capture_logs() as logs:
        thread.start()
        try:
            assert service.wait_ready(30)
            assert wait_for(lambda: any(e["event"] == "service_started" for e in logs))
        finally:
            service.request_stop("test over")
            thread.join(30)
    [started] = [e for e in logs if e["event"] == "service_started"]
    assert started["sources"] == [
        "tasmota",
        "z2m",
        "esphome",
        "senml",
        "ttn",
        "spb-devices",
        "spb-nodes",
        "legacy",
    ]
    assert json.dumps(started["sources"])


def test_senml_through_the_daemon(
    daemon: Callable[[], IngestService], db_url: str, broker_url: str, unique: str
) -> None:
    """A SenML pack: the device from bn, an absolute bt and a relative t; vd is rejected with
    its reason while the pack's other records are stored."""
    fleet = make_fleet(db_url, f"urn:dev:{unique}", 1)
    serial = fleet.serials[0]
    daemon()
    bt = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=2)
    pack = [
        {"bn": f"{serial}:", "bt": bt.timestamp(), "bu": "Cel", "n": "temperature", "v": 23.1},
        {"n": "temperature", "t": 60, "v": 23.4},
        {"n": "humidity", "u": "%RH", "t": 60, "v": 41},
        {"n": "status", "vd": "aGVsbG8"},
    ]
    pub = Publisher(broker_url, f"pub-{unique}")
    try:
        pub.publish(f"t{unique}/senml/north", pack)
        assert wait_for(lambda: count(db_url, "SELECT count(*) FROM telemetries") >= 3)
        assert wait_for(lambda: len(rejected(db_url)) >= 1)
    finally:
        pub.close()
    later = bt + timedelta(seconds=60)
    assert stored(db_url, fleet, serial, "temperature") == [(bt, 23.1), (later, 23.4)]
    assert stored(db_url, fleet, serial, "humidity") == [(later, 41)]
    [(reason, who, _, detail)] = rejected(db_url)
    assert (reason, who) == ("bad_schema", serial)
    assert "vd (a data value) is not supported" in detail


@pytest.mark.parametrize(("fmt", "qos"), [("tasmota", "1"), ("ttn", "0")])
def test_simulate_format_traffic_is_ingested_with_its_printed_source(
    make_settings: Callable[..., Settings], db_url: str, unique: str, fmt: str, qos: str
) -> None:
    """`iothub simulate --format tasmota|ttn` into a daemon configured with the source the
    simulator prints: every reading stored, none rejected (ttn at QoS 0, as The Things Stack
    publishes). Under one message per second per device, since Tasmota's Time has whole seconds
    (docs/sources.md)."""
    fleet = make_fleet(db_url, f"sim{fmt}{unique}", 1)
    settings = make_settings(sources=(formats.SOURCES[fmt],))
    service = simulate_into_daemon(settings, fmt, fleet, unique, rate=0.9, messages=2, qos=qos)
    assert rejected(db_url) == []
    assert service.totals["duplicates"] == 0
    # Every message carries all four metrics of the device.
    assert count(db_url, "SELECT count(*) FROM telemetries") == 4 * service.totals["messages"]


def test_ttn_through_the_daemon(
    daemon: Callable[[], IngestService], db_url: str, broker_url: str, unique: str
) -> None:
    """The Things Stack's documented uplink, published at QoS 0 as its MQTT server does: stored
    at uplink_message.received_at (nanoseconds cut); the unbound luminosity is unknown_metric, an
    uplink without decoded_payload bad_schema, a join message neither stored nor rejected."""
    fleet = make_fleet(db_url, f"ttn{unique}", 1)
    serial = fleet.serials[0]
    service = daemon()
    now = datetime.now(UTC).replace(microsecond=0)
    network = now - timedelta(seconds=20)
    uplink = json.loads(DATA_FORMATS_UPLINK)
    uplink["end_device_ids"]["device_id"] = serial
    uplink["received_at"] = f"{(network + timedelta(seconds=1)).isoformat()[:19]}.014773143Z"
    uplink["uplink_message"]["received_at"] = f"{network.isoformat()[:19]}.789585559Z"
    base = f"t{unique}/v3/app1@tenant1/devices/{serial}"
    pub = Publisher(broker_url, f"pub-{unique}")
    try:
        for topic, body in [
            (f"{base}/join", MQTT_JOIN),
            (f"{base}/up", json.dumps(uplink)),
            (f"{base}/up", MQTT_UPLINK_UNDECODED),
        ]:
            pub.client.publish(topic, body.encode(), qos=0).wait_for_publish(10)
        assert wait_for(lambda: count(db_url, "SELECT count(*) FROM telemetries") >= 1)
        assert wait_for(lambda: len(rejected(db_url)) >= 2)
        assert wait_for(lambda: service.totals["messages"] >= 3)
    finally:
        pub.close()
    at = network.replace(microsecond=789585)
    assert stored(db_url, fleet, serial, "temperature") == [(at, 1.0)]
    found = {(reason, who, metric) for reason, who, metric, _ in rejected(db_url)}
    assert found == {("unknown_metric", serial, "luminosity"), ("bad_schema", serial, None)}
    [detail] = [d for reason, _, _, d in rejected(db_url) if reason == "bad_schema"]
    assert detail.startswith("source 'ttn': uplink_message has no decoded_payload")
