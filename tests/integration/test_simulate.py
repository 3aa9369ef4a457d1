"""`iothub simulate` against the real broker: rate, payload shape, bad payloads, seed devices."""

from __future__ import annotations

import argparse
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta

import pytest
from structlog.testing import capture_logs

from config.settings import Settings
from config.topics import TopicRouter
from ingestor import mqtt as mqttclient
from ingestor import payload
from iothub import exitcodes
from iothub.cli import seed
from iothub.cli import simulate as simulate_cli
from iothub.devtools.seed import data as seed_data
from iothub.devtools.simulator import devices as sim_devices
from iothub.devtools.simulator import messages
from iothub.devtools.simulator import publisher as simulate
from iothub.devtools.simulator.devices import SimDevice, SimMetric
from tests.support.fleet import wait_for

ALL_METRICS = tuple(SimMetric(m.metric_type, m.data_type) for m in seed_data.METRICS)


class Subscriber:
    """Collects every message under a topic prefix (QoS 1, so none is dropped by the broker)."""

    def __init__(self, broker_url: str, prefix: str) -> None:
        self.messages: list[tuple[str, bytes, datetime]] = []
        self._ready = threading.Event()
        self.client = mqttclient.make_client(broker_url, f"{prefix}-sub")
        self.client.on_connect = lambda c, *a: c.subscribe(f"{prefix}/#", qos=1)
        self.client.on_subscribe = lambda *a: self._ready.set()
        self.client.on_message = lambda c, u, m: self.messages.append(
            (m.topic, bytes(m.payload), datetime.now(UTC))
        )
        self.client.connect(*mqttclient.host_port(broker_url))
        self.client.loop_start()
        assert self._ready.wait(10), "subscriber did not get its SUBACK"

    def close(self) -> None:
        self.client.disconnect()
        mqttclient.stop_loop(self.client)


@pytest.fixture
def subscriber(broker_url: str, unique: str) -> Iterator[Subscriber]:
    sub = Subscriber(broker_url, f"t{unique}")
    try:
        yield sub
    finally:
        sub.close()


def topics_for(unique: str) -> tuple[str, str]:
    return (f"t{unique}/devices/{{serial_id}}/telemetry", f"t{unique}/telemetry")


def parse_all(
    messages: list[tuple[str, bytes, datetime]], topics: tuple[str, ...]
) -> list[payload.ParseResult]:
    router = TopicRouter.from_strings(topics)
    results = []
    for topic, body, received_at in messages:
        match = router.match(topic)
        assert match is not None, topic
        results.append(payload.parse_message(body, match.serial_id, received_at, payload.Limits()))
    return results


def catalogue_reasons(result: payload.ParseResult, devices: list[SimDevice]) -> list[str]:
    """What the catalogue lookup would add: unknown device or metric, a value of the wrong type."""
    known = {d.serial_id: {m.name: m.data_type for m in d.metrics} for d in devices}
    reasons = []
    for reading in result.readings:
        metrics = known.get(reading.serial_id)
        if metrics is None:
            reasons.append("unknown_device")
        elif reading.metric not in metrics:
            reasons.append("unknown_metric")
        else:
            problem = payload.check_value(reading.value, metrics[reading.metric], payload.Limits())
            if problem is not None:
                reasons.append(str(problem[0]))
    return reasons


def test_rate_is_honoured_and_every_message_acknowledged(
    broker_url: str, unique: str, subscriber: Subscriber
) -> None:
    """At 400 msg/s for 2 s about 800 messages go out, all acknowledged, spread over the devices,
    with progress lines and a final summary logged."""
    devices = sim_devices.generated_devices(5)
    with capture_logs() as logs:
        result = simulate.run_simulation(
            broker_url, topics_for(unique), devices, 400.0, 2.0, progress_interval=0.5
        )
    assert 0.9 * 800 <= result.sent <= 1.05 * 800, result
    assert result.acked == result.sent
    assert 1.9 <= result.seconds <= 2.5
    assert wait_for(lambda: len(subscriber.messages) >= result.sent, timeout=10)
    assert len(subscriber.messages) == result.sent
    per_topic = Counter(topic for topic, _, _ in subscriber.messages)
    assert set(per_topic) == {f"t{unique}/devices/{d.serial_id}/telemetry" for d in devices}
    assert max(per_topic.values()) - min(per_topic.values()) <= 1  # round robin
    events = [entry["event"] for entry in logs]
    assert events.count("simulate_progress") >= 2
    done = next(entry for entry in logs if entry["event"] == "simulate_done")
    assert done["sent"] == result.sent
    assert done["acked"] == result.sent


def test_payloads_parse_as_valid_telemetry(
    broker_url: str, unique: str, subscriber: Subscriber
) -> None:
    """Without bad share every payload parses into readings of the device's metrics, each of
    the metric's data type and within the service's time bounds, with plausible values."""
    devices = [SimDevice(f"SN-{unique}-{i}", ALL_METRICS) for i in range(3)]
    topics = topics_for(unique)
    result = simulate.run_simulation(broker_url, topics, devices, 200.0, 1.0, seed=1)
    assert wait_for(lambda: len(subscriber.messages) >= result.sent, timeout=10)
    parsed = parse_all(subscriber.messages, topics)
    assert all(not r.rejections for r in parsed)
    assert all(catalogue_reasons(r, devices) == [] for r in parsed)
    assert all(len(r.readings) == len(ALL_METRICS) for r in parsed)
    assert result.readings == len(ALL_METRICS) * result.sent
    values: dict[str, set[object]] = {}
    for r in parsed:
        for reading in r.readings:
            values.setdefault(reading.metric, set()).add(reading.value)
    assert all(10.0 < float(v) < 35.0 for v in values["temperature"])  # type: ignore[arg-type]
    assert all(20.0 < float(v) < 95.0 for v in values["humidity"])  # type: ignore[arg-type]
    assert values["status"] <= {"OK", "WARN", "FAULT"}
    assert len(values["firmware_version"]) == 1
    assert values["online"] <= {True, False}
    # Per device, readings are strictly later message after message (no unique-key clash).
    last: dict[str, datetime] = {}
    for r in parsed:
        ts = r.readings[0].ts
        serial = r.readings[0].serial_id
        assert serial not in last or ts > last[serial]
        last[serial] = ts


def test_readings_per_message_rotates_through_the_metrics(
    broker_url: str, unique: str, subscriber: Subscriber
) -> None:
    """With two readings per message, each message carries two metrics and every metric of the
    device is reported in turn."""
    devices = [SimDevice(f"SN-{unique}", ALL_METRICS)]
    topics = topics_for(unique)
    result = simulate.run_simulation(
        broker_url, topics, devices, 100.0, 0.5, readings_per_message=2
    )
    assert wait_for(lambda: len(subscriber.messages) >= result.sent, timeout=10)
    parsed = parse_all(subscriber.messages, topics)
    assert all(len(r.readings) == 2 for r in parsed)
    seen = Counter(reading.metric for r in parsed for reading in r.readings)
    assert set(seen) == {m.name for m in ALL_METRICS}


def test_bad_share_sends_bad_payloads_of_several_kinds(
    broker_url: str, unique: str, subscriber: Subscriber
) -> None:
    """With half the messages bad, many kinds are sent, each bad message yields exactly one
    rejection with the kind's expected reason, and the good ones yield none."""
    devices = [SimDevice(f"SN-{unique}-{i}", ALL_METRICS) for i in range(3)]
    topics = topics_for(unique)
    result = simulate.run_simulation(broker_url, topics, devices, 400.0, 1.5, 0.5, seed=7)
    bad = sum(result.bad_sent.values())
    assert len(result.bad_sent) >= 8, result.bad_sent
    assert 0.35 * result.sent <= bad <= 0.65 * result.sent
    assert wait_for(lambda: len(subscriber.messages) >= result.sent, timeout=10)
    reasons: Counter[str] = Counter()
    rejected_messages = 0
    for r in parse_all(subscriber.messages, topics):
        found = [str(j.reason) for j in r.rejections] + catalogue_reasons(r, devices)
        assert len(found) <= 1, found
        rejected_messages += len(found)
        reasons.update(found)
    assert rejected_messages == bad
    expected = Counter[str]()
    for kind, count in result.bad_sent.items():
        expected[messages.EXPECTED_REASON[kind]] += count
    assert reasons == expected
    assert {"bad_json", "type_mismatch", "unknown_device", "ts_in_future"} <= set(reasons)


def test_device_time_can_run_faster_but_never_ahead_of_the_clock(
    broker_url: str, unique: str, subscriber: Subscriber
) -> None:
    """At 60x from 2 hours ago, one second of run spans about a minute of device time; from
    10 seconds ago the device time catches up with the wall clock and then keeps to it."""
    topics = topics_for(unique)
    device = SimDevice(f"SN-{unique}", (SimMetric("temperature", "numeric"),))
    start = datetime.now(UTC) - timedelta(hours=2)
    result = simulate.run_simulation(
        broker_url, topics, [device], 50.0, 1.0, start_time=start, time_scale=60.0
    )
    assert wait_for(lambda: len(subscriber.messages) >= result.sent, timeout=10)
    stamps = [r.readings[0].ts for r in parse_all(subscriber.messages, topics)]
    assert start - timedelta(seconds=1) <= min(stamps) <= start + timedelta(seconds=5)
    assert timedelta(seconds=50) <= max(stamps) - min(stamps) <= timedelta(seconds=70)

    subscriber.messages.clear()
    recent = datetime.now(UTC) - timedelta(seconds=10)
    result = simulate.run_simulation(
        broker_url, topics, [device], 50.0, 1.0, start_time=recent, time_scale=60.0
    )
    assert wait_for(lambda: len(subscriber.messages) >= result.sent, timeout=10)
    received = subscriber.messages
    stamps = []
    for (_, body, received_at), r in zip(received, parse_all(received, topics), strict=True):
        # Messages of one burst share a clock reading and step 1 ms apart to stay distinct.
        assert r.readings[0].ts <= received_at + timedelta(milliseconds=50), body
        stamps.append(r.readings[0].ts)
    assert max(stamps) - min(stamps) <= timedelta(seconds=12)  # 60x would have made it 60 s


def cli_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    simulate_cli.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_cli_uses_the_seeded_devices_of_the_database(
    make_settings: Callable[..., Settings], unique: str, subscriber: Subscriber
) -> None:
    """`iothub simulate` on a seeded database publishes as the seed's seven devices, each with
    exactly the metrics the seed binds to it, and exits 0 after --duration."""
    settings = make_settings()
    assert seed.main(settings, argparse.Namespace(force=False, dry_run=False, debug=False)) == 0
    code = simulate_cli.main(settings, cli_args("--duration", "1", "--rate", "100"))
    assert code == exitcodes.OK
    assert wait_for(lambda: len(subscriber.messages) >= 90, timeout=10)
    bound: dict[str, set[str]] = {}
    for b in seed_data.BINDINGS:
        bound.setdefault(b.serial_id, set()).add(b.metric)
    metrics_seen: dict[str, set[str]] = {}
    for r in parse_all(subscriber.messages, settings.mqtt_topics):
        for reading in r.readings:
            metrics_seen.setdefault(reading.serial_id, set()).add(reading.metric)
    assert metrics_seen == bound


def test_cli_without_database_generates_devices(
    broker_url: str, unique: str, subscriber: Subscriber
) -> None:
    """With no database answering, `--device-count 3` publishes as three generated devices."""
    settings = Settings(
        database_url="postgresql://nobody@127.0.0.1:1/none",
        mqtt_url=broker_url,
        mqtt_topics=topics_for(unique),
    )
    code = simulate_cli.main(
        settings, cli_args("--duration", "0.5", "--rate", "60", "--device-count", "3")
    )
    assert code == exitcodes.OK
    assert wait_for(lambda: len(subscriber.messages) >= 25, timeout=10)
    serials = {topic.split("/")[2] for topic, _, _ in subscriber.messages}
    assert serials == {f"{sim_devices.GENERATED_PREFIX}-{i:04d}" for i in range(3)}


def test_cli_refuses_the_service_client_id(broker_url: str) -> None:
    """Using the ingestor's client id would take its session over: refused with USAGE."""
    settings = Settings(mqtt_url=broker_url, mqtt_client_id="iothub-prod")
    code = simulate_cli.main(settings, cli_args("--duration", "1", "--client-id", "iothub-prod"))
    assert code == exitcodes.USAGE


def test_stop_event_ends_an_open_ended_run(broker_url: str, unique: str) -> None:
    """Without a duration the simulation runs until its stop event is set, then returns its
    result with everything acknowledged."""
    stop = threading.Event()
    timer = threading.Timer(0.5, stop.set)
    timer.start()
    started = time.monotonic()
    result = simulate.run_simulation(
        broker_url, topics_for(unique), sim_devices.generated_devices(2), 100.0, None, stop=stop
    )
    timer.join()
    assert time.monotonic() - started < 5
    assert result.sent > 20
    assert result.acked == result.sent


def test_unreachable_broker_is_an_error(unique: str) -> None:
    """A broker that does not answer raises SimulationError (the CLI exits CONNECTION_FAILED)."""
    with pytest.raises(simulate.SimulationError, match="cannot connect"):
        simulate.run_simulation(
            "mqtt://127.0.0.1:1", topics_for(unique), sim_devices.generated_devices(1), 10.0, 1.0
        )
