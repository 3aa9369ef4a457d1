"""What the intake subscribes to and accepts: no retained replays, QoS 1 or nothing.

Real Mosquitto brokers of the test's own (restartable), a real database, the daemon in-process.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
from structlog.testing import capture_logs

from config.settings import Settings
from ingestor import mqtt as mqttclient
from iothub import exitcodes
from iothub.daemon.service import IngestService
from tests.support.fleet import Publisher, count, make_fleet, wait_for
from tests.support.paho_api import client as mqtt
from tests.support.services import LocalMosquitto

FAULT = b'{"metrics": {"status": "FAULT"}}'  # no ts: it would take each receipt's time
READY_TIMEOUT = 30.0  # seconds
STOP_TIMEOUT = 30.0  # seconds


def publish_retained(broker_url: str, topic: str, body: bytes) -> None:
    """Publish with the retain flag at QoS 1 and wait for the broker's PUBACK."""
    client = mqttclient.make_client(broker_url, f"retainer-{id(body)}")
    connected = threading.Event()
    client.on_connect = lambda *args: connected.set()
    client.connect(*mqttclient.host_port(broker_url))
    client.loop_start()
    try:
        assert connected.wait(10), "retainer could not connect"
        info = client.publish(topic, body, qos=1, retain=True)
        info.wait_for_publish(10)
        assert info.is_published()
    finally:
        client.disconnect()
        mqttclient.stop_loop(client)


@contextmanager
def daemon(settings: Settings) -> Iterator[IngestService]:
    """The daemon (no rules) running in a thread until the block ends; it must exit 0."""
    service = IngestService(settings)
    result: dict[str, int] = {}
    thread = threading.Thread(target=lambda: result.setdefault("rc", service.run()), name="svc")
    thread.start()
    try:
        assert service.wait_ready(READY_TIMEOUT), "service did not become ready"
        yield service
    finally:
        service.request_stop("test")
        thread.join(STOP_TIMEOUT)
        assert not thread.is_alive(), "service did not stop"
    assert result.get("rc") == exitcodes.OK


class Probe:
    """Readings with a ts of their own: once one is stored, whatever the broker sent before it
    on the same subscription (retained messages come right after the SUBACK) was written too."""

    def __init__(self, db_url: str, broker_url: str, topic: str, dm_id: int) -> None:
        self.db_url, self.broker_url, self.topic, self.dm_id = db_url, broker_url, topic, dm_id
        self.sent = 0
        self.start = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=1)

    def round_trip(self) -> None:
        self.sent += 1
        pub = Publisher(self.broker_url, f"probe-{id(self)}-{self.sent}")
        try:
            ts = self.start + timedelta(seconds=self.sent)
            pub.publish(self.topic, {"ts": ts.isoformat(), "metrics": {"temperature": self.sent}})
        finally:
            pub.close()
        query = "SELECT count(*) FROM telemetries WHERE device_metric_id = %s"
        assert wait_for(lambda: count(self.db_url, query, self.dm_id) == self.sent), "probe lost"


def status_rows(db_url: str, dm_id: int) -> int:
    return count(db_url, "SELECT count(*) FROM telemetries WHERE device_metric_id = %s", dm_id)


def rejected(db_url: str) -> dict[str, int]:
    with_reason = "SELECT reason, count(*) FROM rejected_messages GROUP BY reason"
    with psycopg.connect(db_url, autocommit=True) as conn:
        return {reason: int(n) for reason, n in conn.execute(with_reason).fetchall()}


def test_retained_reading_is_not_stored_again_on_restart_or_reconnect(
    db_url: str,
    local_mosquitto: LocalMosquitto,
    make_settings: Callable[..., Settings],
    unique: str,
) -> None:
    """A retained FAULT published before iothub subscribed is never replayed to it: not at
    the first start, not after a daemon restart, not after a broker restart."""
    fleet = make_fleet(db_url, f"SN-{unique}", 1)
    serial = fleet.serials[0]
    topic = f"t{unique}/devices/{serial}/telemetry"
    status_dm = fleet.bindings[(serial, "status")]
    probe = Probe(db_url, local_mosquitto.url, topic, fleet.bindings[(serial, "temperature")])
    settings = make_settings(mqtt_url=local_mosquitto.url)
    publish_retained(local_mosquitto.url, topic, FAULT)

    with daemon(settings):
        probe.round_trip()
    with daemon(settings) as service:
        probe.round_trip()
        local_mosquitto.stop()
        assert wait_for(lambda: not service.intake.connected)
        local_mosquitto.start()
        assert wait_for(lambda: service.intake.connected, timeout=60)
        probe.round_trip()

    assert status_rows(db_url, status_dm) == 0
    assert rejected(db_url) == {}


def test_retained_reading_published_while_iothub_is_away_is_stored_once(
    db_url: str,
    local_mosquitto: LocalMosquitto,
    make_settings: Callable[..., Settings],
    unique: str,
) -> None:
    """Published with the retain flag while the session waits offline, a reading is delivered
    once through the session, stored once, and not again at the next start."""
    fleet = make_fleet(db_url, f"SN-{unique}", 1)
    serial = fleet.serials[0]
    topic = f"t{unique}/devices/{serial}/telemetry"
    status_dm = fleet.bindings[(serial, "status")]
    probe = Probe(db_url, local_mosquitto.url, topic, fleet.bindings[(serial, "temperature")])
    settings = make_settings(mqtt_url=local_mosquitto.url)
    with daemon(settings):
        probe.round_trip()

    publish_retained(local_mosquitto.url, topic, FAULT)
    with daemon(settings):
        assert wait_for(lambda: status_rows(db_url, status_dm) == 1)
        probe.round_trip()
    with daemon(settings):
        probe.round_trip()

    assert status_rows(db_url, status_dm) == 1
    assert rejected(db_url) == {}


def test_a_retained_message_that_still_arrives_is_rejected_as_retained(
    db_url: str,
    broker_url: str,
    make_settings: Callable[..., Settings],
    unique: str,
) -> None:
    """A message with the retain flag (a broker ignoring retain handling) is recorded as
    `retained` with its topic's serial and payload, and nothing of it is stored."""
    fleet = make_fleet(db_url, f"SN-{unique}", 1)
    serial = fleet.serials[0]
    topic = f"t{unique}/devices/{serial}/telemetry"
    replayed = mqtt.MQTTMessage(mid=0, topic=topic.encode())
    replayed.payload = FAULT
    replayed.qos = 0  # a made-up message id must not be acknowledged to the broker
    replayed.retain = True

    with daemon(make_settings()) as service:
        service.intake._on_message(service.intake._client, None, replayed)
        assert wait_for(lambda: rejected(db_url) == {"retained": 1})

    assert status_rows(db_url, fleet.bindings[(serial, "status")]) == 0
    with psycopg.connect(db_url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT p.topic, p.payload, m.serial_id FROM rejected_messages m"
            " JOIN rejected_payloads p ON p.id = m.payload_id"
        ).fetchone()
    assert row == (topic, replayed.payload, serial)


def test_a_broker_granting_qos_0_stops_the_daemon_as_a_configuration_error(
    tmp_path: Path, make_settings: Callable[..., Settings]
) -> None:
    """With a broker that grants QoS 0 (max_qos 0), `iothub run` refuses to run: it exits 78
    at once with mqtt_subscribe_refused, instead of ingesting at most once."""
    broker = LocalMosquitto(tmp_path / "qos0", extra_config="max_qos 0\n")
    broker.start()
    try:
        service = IngestService(make_settings(mqtt_url=broker.url))
        result: dict[str, int] = {}
        with capture_logs() as logs:
            thread = threading.Thread(target=lambda: result.setdefault("rc", service.run()))
            thread.start()
            thread.join(STOP_TIMEOUT)
            if thread.is_alive():
                service.request_stop("test: still running")
                thread.join(STOP_TIMEOUT)
    finally:
        broker.destroy()

    assert result.get("rc") == exitcodes.CONFIG_ERROR
    refused = [e for e in logs if e["event"] == "mqtt_subscribe_refused"]
    assert refused and set(refused[0]["downgraded"].values()) == {0}
    assert not any(e["event"] == "service_ready" for e in logs)
