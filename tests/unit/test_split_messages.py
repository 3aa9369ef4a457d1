"""A message whose devices two workers own: each part keeps its own devices' readings, the
primary alone records what the decoder rejected and counts the message, and the receiving
process finishes the message only when every part has."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime, timedelta

from config.topics import TopicRouter
from ingestor import batch, ownership, payload
from ingestor.catalog import Binding, Device, Snapshot
from ingestor.messages import InboundMessage
from iothub.daemon.fanout import InFlight

ROUTER = TopicRouter.from_strings(["devices/{serial_id}/telemetry", "telemetry"])
WORKERS = 2


def serials_of(owner: int, count: int) -> list[str]:
    """`count` serials that worker `owner` of WORKERS owns."""
    found = [
        s for s in (f"GW-{i}" for i in range(100)) if ownership.device_owner(s, WORKERS) == owner
    ]
    return found[:count]


A0, A1 = serials_of(0, 2)  # worker 0's devices
B0, B1 = serials_of(1, 2)  # worker 1's devices
SNAPSHOT = Snapshot(
    {
        serial: Device(n + 1, serial, f"dev {serial}", True, {"t": Binding(n + 1, "t", "numeric")})
        for n, serial in enumerate((A0, A1, B0, B1))
    },
    frozenset({"t"}),
)
TS = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=5)


def message(
    body: object, split: ownership.Split | None = None, *, retain: bool = False
) -> InboundMessage:
    return InboundMessage(
        topic="telemetry",
        payload=body if isinstance(body, bytes) else json.dumps(body).encode(),
        mid=1,
        qos=1,
        dup=False,
        generation=0,
        received_at=time.time(),
        received_mono=time.monotonic(),
        retain=retain,
        split=split,
    )


def element(serial: str, value: object, seconds: int = 0) -> dict[str, object]:
    return {
        "device": serial,
        "ts": (TS + timedelta(seconds=seconds)).isoformat(),
        "metrics": {"t": value},
    }


GATEWAY = [
    element(B0, 1.0),  # the first device is worker 1's: it is the primary
    element(A0, 2.0),
    {"device": A1, "metrics": "not an object"},  # bad_schema naming worker 0's device
    element(A1, "hot"),  # type_mismatch: judged by the catalogue, by its owner
    element(B1, 3.0),
    element(B0, 4.0, 1),
]


def prepared(body: object, worker: int | None, *, retain: bool = False) -> batch.Batch:
    split = None if worker is None else ownership.Split(worker, WORKERS, (1, 0))
    return batch.prepare([message(body, split, retain=retain)], SNAPSHOT, ROUTER, payload.Limits())


def stored(prepared_batch: batch.Batch) -> list[tuple[str, float]]:
    return [(r.reading.serial_id, float(r.reading.value)) for r in prepared_batch.rows]


def test_each_part_stores_its_own_devices_and_together_what_one_process_stores() -> None:
    """The parts' rows are disjoint, by owner, and add up to the rows of the whole message."""
    whole, primary, secondary = prepared(GATEWAY, None), prepared(GATEWAY, 1), prepared(GATEWAY, 0)
    assert stored(primary) == [(B0, 1.0), (B1, 3.0), (B0, 4.0)]
    assert stored(secondary) == [(A0, 2.0)]
    assert sorted(stored(primary) + stored(secondary)) == sorted(stored(whole))


def test_the_primary_records_the_decoders_rejections_the_owner_the_catalogues() -> None:
    """The bad element naming worker 0's device is the primary's to record (one row for the
    message); the value its catalogue refuses is worker 0's, which judged it."""
    primary, secondary = prepared(GATEWAY, 1), prepared(GATEWAY, 0)
    assert [(r.reason, r.serial_id) for r in primary.rejects] == [("bad_schema", A1)]
    assert [(r.reason, r.serial_id) for r in secondary.rejects] == [("type_mismatch", A1)]
    whole = prepared(GATEWAY, None)
    assert sorted(r.reason for r in whole.rejects) == sorted(
        r.reason for r in primary.rejects + secondary.rejects
    )


def test_a_message_counts_once_where_it_is_the_primary() -> None:
    primary, secondary = prepared(GATEWAY, 1), prepared(GATEWAY, 0)
    assert (primary.counted_messages, secondary.counted_messages) == (1, 0)
    assert prepared(GATEWAY, None).counted_messages == 1


def test_a_message_refused_whole_is_recorded_by_the_primary_only() -> None:
    """Invalid JSON and a retained replay: one rejection, in the primary's batch."""
    gateway = [element(B0, 1.0), element(A0, 2.0)]
    duplicate_key = json.dumps(gateway).encode().replace(b'"ts"', b'"device": "x", "ts"', 1)
    for body, retain in ((gateway, True), (duplicate_key, False)):
        primary, secondary = prepared(body, 1, retain=retain), prepared(body, 0, retain=retain)
        assert len(primary.rejects) == 1 and not secondary.rejected, primary.rejects
        assert not primary.rows and not secondary.rows


def test_a_device_whose_owner_got_no_part_is_the_primarys() -> None:
    """Had the receiving process read fewer devices than the decoder finds, the readings of an
    owner without a part are stored by the primary: stored once, never lost."""
    only_primary = ownership.Split(1, WORKERS, (1,))
    assert only_primary.keeps(A0) and only_primary.keeps(B0)
    secondary = ownership.Split(0, WORKERS, (1, 0))
    assert secondary.keeps(A0) and not secondary.keeps(B0)
    assert not ownership.Split(1, WORKERS, (1, 0)).keeps(A0)


def inbound(i: int) -> InboundMessage:
    return message({"device": A0, "metrics": {"t": i}})


def test_a_message_in_parts_finishes_when_every_part_has_in_arrival_order() -> None:
    """Acknowledged only after both parts reported done, and after the messages before it."""
    inflight = InFlight()
    first, split, third = inbound(1), inbound(2), inbound(3)
    seqs = [inflight.add(first), inflight.add(split, parts=2), inflight.add(third)]
    assert seqs == [1, 2, 3]
    assert inflight.finish([2, 3], acknowledge=True) == ([], [])  # one part of 2; 1 open
    assert inflight.finish([1], acknowledge=True) == ([first], [])  # 2 still has a part out
    assert inflight.oldest() is split
    assert inflight.finish([2], acknowledge=True) == ([split, third], [])
    assert len(inflight) == 0


def test_a_message_one_part_of_which_was_given_back_is_given_back() -> None:
    """One part committed, the other given back: never acknowledged (redelivered; the unique
    key drops the committed part's rows)."""
    for order in ((True, False), (False, True)):
        inflight = InFlight()
        split = inbound(1)
        inflight.add(split, parts=2)
        assert inflight.finish([1], acknowledge=order[0]) == ([], [])
        assert inflight.finish([1], acknowledge=order[1]) == ([], [split])
        assert len(inflight) == 0
