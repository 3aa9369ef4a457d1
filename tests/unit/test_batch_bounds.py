"""Batch preparation: bounded by readings and bytes, rejections recorded once per message."""

from __future__ import annotations

import json
import time
import tracemalloc
from datetime import UTC, datetime

from config.topics import TopicRouter
from ingestor import batch, payload
from ingestor.catalog import Binding, Device, Snapshot
from ingestor.messages import InboundMessage

ROUTER = TopicRouter.from_strings(["devices/{serial_id}/telemetry"])
SERIAL = "SN-1"
READINGS_PER_MESSAGE = 10_000
MIB = 1024 * 1024


def snapshot(metrics: int) -> Snapshot:
    bindings = {f"m{i}": Binding(i + 1, f"m{i}", "numeric") for i in range(metrics)}
    device = Device(1, SERIAL, "one", True, bindings)
    return Snapshot({SERIAL: device}, frozenset(bindings))


def message(body: object, index: int = 0) -> InboundMessage:
    now = time.time()
    return InboundMessage(
        topic=f"devices/{SERIAL}/telemetry",
        payload=json.dumps(body).encode(),
        mid=index + 1,
        qos=1,
        dup=False,
        generation=1,
        received_at=now,
        received_mono=time.monotonic(),
    )


def big_message(index: int) -> InboundMessage:
    ts = datetime.fromtimestamp(time.time() - index, UTC).isoformat()
    body = {"ts": ts, "metrics": {f"m{i}": i + 0.5 for i in range(READINGS_PER_MESSAGE)}}
    return message(body, index)


def test_a_batch_stops_taking_messages_at_its_reading_bound_and_memory_stays_bounded() -> None:
    """10 messages of 10,000 readings: each prepared batch holds two of them (20,000 readings)
    and its peak memory stays far below what the 100,000 readings of all of them would take."""
    messages = [big_message(i) for i in range(10)]
    snap = snapshot(READINGS_PER_MESSAGE)
    bounds = batch.Bounds(max_readings=20_000)
    taken = 0
    peaks = []
    while taken < len(messages):
        tracemalloc.start()
        prepared = batch.prepare(messages[taken:], snap, ROUTER, payload.Limits(), bounds)
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
        assert prepared.messages == messages[taken : taken + 2]
        assert len(prepared.rows) == 2 * READINGS_PER_MESSAGE
        taken += len(prepared.messages)
        del prepared
    assert len(peaks) == 5
    # About 400 bytes per prepared reading: 20,000 readings stay well under 16 MiB, where the
    # whole set in one batch needs some 40 MiB.
    assert max(peaks) < 16 * MIB, [round(p / MIB, 1) for p in peaks]


def test_a_batch_stops_taking_messages_at_its_byte_bound() -> None:
    """Payload bytes bound a batch too; the message that crosses the bound is the last one."""
    # Whole seconds: every payload has the same length (a float's repr would vary by a digit).
    now = int(time.time())
    messages = [message({"metrics": {"m0": i}, "ts": now - i}, i) for i in range(10)]
    size = len(messages[0].payload)
    bounds = batch.Bounds(max_bytes=3 * size)
    prepared = batch.prepare(messages, snapshot(1), ROUTER, payload.Limits(), bounds)
    assert prepared.messages == messages[:3]
    assert prepared.payload_bytes == sum(len(m.payload) for m in messages[:3])
    # However small the bound, a batch takes one message: nothing is ever stuck.
    tiny = batch.Bounds(max_bytes=1, max_readings=1)
    assert batch.prepare(messages, snapshot(1), ROUTER, payload.Limits(), tiny).messages == [
        messages[0]
    ]


def test_rejections_of_one_message_are_capped_and_the_rest_counted_by_reason() -> None:
    """2,000 unknown metrics: 100 recorded, 1,900 counted, all 2,000 in the totals."""
    body = {"metrics": {f"nosuch{i}": i for i in range(2000)} | {"m0": 1.5}}
    prepared = batch.prepare([message(body)], snapshot(1), ROUTER, payload.Limits(), batch.Bounds())
    assert len(prepared.rows) == 1
    assert list(prepared.rejected) == [0]
    rejected = prepared.rejected[0]
    assert len(rejected.recorded) == batch.MAX_REJECTIONS_PER_MESSAGE == 100
    assert dict(rejected.not_recorded) == {"unknown_metric": 1900}
    assert rejected.rejections == 2000
    assert prepared.rejected_by_reason() == {"unknown_metric": 2000}
    assert prepared.not_recorded() == 1900


def test_a_topic_quoted_in_a_detail_is_cut() -> None:
    """A 60,000-character topic is not copied whole into a rejection's detail."""
    msg = message({"metrics": {"m0": 1}})
    long_topic = InboundMessage(
        "x/" + "y" * 60_000, msg.payload, 1, 1, False, 1, msg.received_at, msg.received_mono
    )
    prepared = batch.prepare([long_topic], snapshot(1), ROUTER, payload.Limits())
    (row,) = prepared.rejects
    assert row.reason == "bad_schema"
    assert len(row.detail) < 300
