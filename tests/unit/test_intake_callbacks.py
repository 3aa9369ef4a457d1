"""paho callbacks hand work over and never raise (a raise would end paho's network thread)."""

from __future__ import annotations

import threading
import time

from structlog.testing import capture_logs

from config.settings import Settings
from config.topics import TopicRouter
from ingestor.intake import MqttIntake
from tests.support.paho_api import client as mqtt


def make_intake(**overrides: object) -> MqttIntake:
    settings = Settings(**overrides)  # type: ignore[arg-type]
    return MqttIntake(settings, TopicRouter.from_strings(settings.mqtt_topics))


def test_on_message_copies_the_message_and_counts_it_pending() -> None:
    """A received message becomes a frozen value on the queue, counted until acknowledged."""
    intake = make_intake()
    message = mqtt.MQTTMessage(mid=7, topic=b"devices/SN-1/telemetry")
    message.payload = b'{"metrics": {}}'
    message.qos = 1
    intake._on_message(intake._client, None, message)
    (taken,) = intake.take(10, 0.0)
    assert (taken.topic, taken.payload, taken.mid, taken.qos) == (
        "devices/SN-1/telemetry",
        b'{"metrics": {}}',
        7,
        1,
    )
    assert intake.pending == 1


def test_a_failing_callback_is_logged_not_raised() -> None:
    """Whatever goes wrong inside on_message is logged as mqtt_callback_failed and swallowed."""
    intake = make_intake()
    broken = mqtt.MQTTMessage(mid=1, topic=b"devices/SN-1/telemetry")
    broken.payload = object()  # type: ignore[assignment]  # bytes() of it raises TypeError
    with capture_logs() as logs:
        intake._on_message(intake._client, None, broken)
    assert [e["event"] for e in logs] == ["mqtt_callback_failed"]
    assert intake.pending == 0


def test_invalid_utf8_topic_is_kept_for_the_rejection_record() -> None:
    """A topic that is not UTF-8 is decoded with replacement, so the message can still be
    recorded as rejected rather than lost in the callback."""
    intake = make_intake()
    message = mqtt.MQTTMessage(mid=2, topic=b"devices/\xff/telemetry")
    message.payload = b"{}"
    message.qos = 1
    intake._on_message(intake._client, None, message)
    (taken,) = intake.take(10, 0.0)
    assert taken.topic == "devices/\ufffd/telemetry"


def test_closed_intake_leaves_new_messages_to_the_broker() -> None:
    """After close_intake() a message is neither queued nor counted (never acknowledged)."""
    intake = make_intake()
    intake.close_intake()
    message = mqtt.MQTTMessage(mid=3, topic=b"devices/SN-1/telemetry")
    message.payload = b"{}"
    message.qos = 1
    intake._on_message(intake._client, None, message)
    assert intake.take(10, 0.0) == []
    assert intake.pending == 0


def test_on_message_keeps_the_retain_flag() -> None:
    """A retained message stays marked as such, so the batch can reject it as `retained`."""
    intake = make_intake()
    message = mqtt.MQTTMessage(mid=4, topic=b"devices/SN-1/telemetry")
    message.payload = b'{"metrics": {"status": "FAULT"}}'
    message.qos = 1
    message.retain = True
    intake._on_message(intake._client, None, message)
    (taken,) = intake.take(10, 0.0)
    assert taken.retain is True


def _suback(intake: MqttIntake, *codes: int) -> None:
    from tests.support.paho_api import PacketTypes, ReasonCode

    intake._on_subscribe(
        intake._client, None, 1, [ReasonCode(PacketTypes.SUBACK, identifier=c) for c in codes], None
    )


def test_suback_at_qos_1_makes_the_intake_ready() -> None:
    """Every filter granted QoS 1: ready, nothing fatal."""
    intake = make_intake()
    _suback(intake, 1, 1)
    assert intake.ever_connected.is_set()
    assert intake.fatal is None


def test_suback_granting_qos_0_or_refusing_is_fatal() -> None:
    """A filter granted QoS 0, or refused (0x87), is logged and makes the intake fatal; it
    never reports ready."""
    for codes, expected in (((1, 0), "granted QoS"), ((0x87, 1), "refused")):
        intake = make_intake()
        with capture_logs() as logs:
            _suback(intake, *codes)
        assert [e["event"] for e in logs] == ["mqtt_subscribe_refused"]
        assert intake.fatal is not None and expected in intake.fatal
        assert not intake.ever_connected.is_set()


def test_a_run_that_fills_the_window_hands_over_what_it_queued() -> None:
    """A consumer waiting for a batch gets what a run queued before the pending limit stopped
    it, at once: room comes only from acknowledging what the writer already holds, so waiting
    for more would wait for nothing."""
    intake = make_intake(max_pending_messages=100)
    topic = "devices/SN-1/telemetry"
    intake._on_publishes([(topic, b"{}", mid, 1, False, False) for mid in range(1, 61)])
    held = intake.take(60, 0.0)  # with the writer: pending, not acknowledged
    assert len(held) == 60
    taken: list[int] = []

    def consumer() -> None:
        taken.append(len(intake.take_batch(50, 5.0, 5.0)))

    waiting = threading.Thread(target=consumer)
    waiting.start()
    time.sleep(0.1)  # the consumer waits for its batch
    run = [(topic, b"{}", mid, 1, False, False) for mid in range(61, 121)]
    feeding = threading.Thread(target=intake._on_publishes, args=(run,), daemon=True)
    started = time.monotonic()
    feeding.start()  # 40 fit; then it waits for room
    waiting.join(2.0)
    assert not waiting.is_alive() and taken == [40]
    assert time.monotonic() - started < 1.0
    intake.ack(held)  # room: the rest of the run goes in
    feeding.join(2.0)
    assert not feeding.is_alive()
    assert len(intake.take(100, 0.0)) == 20
