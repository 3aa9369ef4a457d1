"""Turning received messages into rows to store and rejections to record.

Pure (no I/O): it needs the messages, a catalogue snapshot and the limits. Each reading is
checked on its own, so one bad reading never costs its neighbours.

A batch is bounded three ways: by messages (the caller takes at most `batch_size`), by payload
bytes and by readings (`Bounds`). Parsing costs memory per reading (objects for the value, the
time, the row), far more than the payload's bytes, so a handful of messages with thousands of
readings each must not make one huge batch: `prepare` stops taking messages once a bound is
reached, and the caller prepares the rest as the next batch.

Rejections are grouped by message: the payload of a rejected message is recorded once, with at
most `Bounds.max_rejections_per_message` of its rejected readings; the others are only counted.

In a worker process, a message whose devices several workers own comes with its part
(`InboundMessage.split`, see `ingestor.ownership.Split`): the whole message is decoded as
anywhere, but only the readings of this worker's devices are checked against the catalogue and
stored, and only the primary records what the decoder rejected. A message without a split
costs nothing more.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import NamedTuple

from config.topics import TopicRouter
from ingestor import payload
from ingestor.aliases import Birth
from ingestor.catalog import Snapshot
from ingestor.hooks import BatchReading
from ingestor.messages import InboundMessage
from ingestor.reasons import Reason
from ingestor.sources import SourceRouter

MAX_BATCH_READINGS = 50_000  # readings (rows + rejections) per batch, before the last message
MAX_BATCH_BYTES = 16 * 1024 * 1024  # payload bytes per batch, before the last message
MAX_REJECTIONS_PER_MESSAGE = 100  # rejected readings recorded per message; the rest are counted
_SHOW_TOPIC = 120  # characters of a topic quoted in a detail (a topic may be 64 KiB)


@dataclass(frozen=True, slots=True)
class Bounds:
    """How much one batch may hold, and how much of one message's rejections is recorded.

    A batch always takes at least one message, and stops before the message that would start
    over a bound: a batch holds at most `max_readings` + one message's readings
    (`payload.Limits.max_readings_per_message`), and `max_bytes` + one payload.
    """

    max_readings: int = MAX_BATCH_READINGS
    max_bytes: int = MAX_BATCH_BYTES
    max_rejections_per_message: int = MAX_REJECTIONS_PER_MESSAGE


class Row(NamedTuple):
    """A validated, resolved reading ready for COPY (a NamedTuple: one per reading)."""

    device_metric_id: int
    ts: datetime
    value_json: str
    reading: BatchReading
    source: int  # index of its message in the batch, to record it if the server refuses it


@dataclass(frozen=True, slots=True)
class RejectRow:
    """One rejected reading (or a whole message, for message-level reasons)."""

    reason: str
    detail: str
    serial_id: str | None
    metric: str | None


@dataclass
class RejectedMessage:
    """A message with at least one rejection: its payload is recorded once, with its first
    `max_rejections_per_message` rejections; the others are counted by reason."""

    source: int  # index of the message in the batch
    recorded: list[RejectRow] = field(default_factory=list)
    not_recorded: Counter[str] = field(default_factory=Counter)

    @property
    def rejections(self) -> int:
        return len(self.recorded) + sum(self.not_recorded.values())

    def add(self, row: RejectRow, cap: int) -> None:
        if len(self.recorded) < cap:
            self.recorded.append(row)
        else:
            self.not_recorded[row.reason] += 1

    def copy(self) -> RejectedMessage:
        return RejectedMessage(self.source, list(self.recorded), Counter(self.not_recorded))


@dataclass
class Batch:
    messages: list[InboundMessage]
    rows: list[Row] = field(default_factory=list)
    # By message index, in arrival order.
    rejected: dict[int, RejectedMessage] = field(default_factory=dict)
    # Two readings of one device_metric at the same time in one batch: the first is kept, the
    # same way the unique key keeps the first across batches.
    duplicates: int = 0
    bounds: Bounds = field(default_factory=Bounds)
    payload_bytes: int = 0
    # Sparkplug B births of known devices, in arrival order: stored in the batch's transaction.
    births: list[Birth] = field(default_factory=list)
    # A rejected payload is recorded up to this many bytes (the message's limit): a message
    # slightly over it (the broker's packet limit leaves room for headers) is not kept whole.
    keep_payload_bytes: int = payload.MAX_PAYLOAD_BYTES
    # Messages this worker holds as a secondary part (ingestor.ownership.Split): their primary
    # counts them, so that a message counts once in the service's totals.
    secondary_parts: int = 0

    @property
    def counted_messages(self) -> int:
        """The messages this batch counts in the service's totals (each message once)."""
        return len(self.messages) - self.secondary_parts

    @property
    def rejects(self) -> list[RejectRow]:
        """The recorded rejections, message by message."""
        return [row for message in self.rejected.values() for row in message.recorded]

    def rejected_by_reason(self) -> Counter[str]:
        """Every rejected reading by reason, recorded or only counted."""
        counts: Counter[str] = Counter()
        for message in self.rejected.values():
            counts.update(row.reason for row in message.recorded)
            counts.update(message.not_recorded)
        return counts

    def not_recorded(self) -> int:
        return sum(sum(m.not_recorded.values()) for m in self.rejected.values())

    def reject(self, source: int, row: RejectRow) -> None:
        message = self.rejected.get(source)
        if message is None:
            message = self.rejected[source] = RejectedMessage(source)
        message.add(row, self.bounds.max_rejections_per_message)


def _show_topic(topic: str) -> str:
    if len(topic) > _SHOW_TOPIC:
        return f"{topic[:_SHOW_TOPIC]!r}... ({len(topic)} characters)"
    return repr(topic)


def _keep_births(
    batch: Batch, router: SourceRouter, snapshot: Snapshot, births: Sequence[Birth]
) -> None:
    """Apply a message's Sparkplug births before the next message is decoded (data after a
    birth in the same batch uses it) and keep them for the batch's transaction. Births of
    devices the catalogue does not know are not kept, so the state is bounded by the fleet."""
    for birth in births:
        if birth.serial_id in snapshot.devices:
            router.aliases.apply(birth)
            batch.births.append(birth)


# One loop, its checks inline: it runs per reading, where a function call per check costs. A
# rejection is added with batch.reject directly: a closure defined per message to shorten that
# call cost 70 ns on every message, rejected or not.
def prepare(  # noqa: C901
    messages: Sequence[InboundMessage],
    snapshot: Snapshot,
    router: TopicRouter | SourceRouter,
    limits: payload.Limits,
    bounds: Bounds | None = None,
) -> Batch:
    """Prepare a prefix of `messages` as one batch (`Batch.messages` says how many were taken:
    at least one, fewer than all when a bound was reached)."""
    bounds = bounds or Bounds()
    if isinstance(router, TopicRouter):
        router = SourceRouter(router)
    batch = Batch([], bounds=bounds, keep_payload_bytes=limits.max_payload_bytes)
    seen: set[tuple[int, datetime]] = set()
    readings = 0
    reject = batch.reject
    for index, msg in enumerate(messages):
        if index > 0 and (
            readings >= bounds.max_readings or batch.payload_bytes >= bounds.max_bytes
        ):
            break
        batch.messages.append(msg)
        batch.payload_bytes += len(msg.payload)
        split = msg.split
        # Of a message several workers own, what the decoder rejected is the same in every
        # part: the primary alone records it. A reading is judged (and, if rejected, recorded)
        # by the worker that owns its device, with that worker's catalogue.
        records = split is None or split.primary
        if not records:
            batch.secondary_parts += 1
        match = router.match(msg.topic)
        if msg.retain:
            # We subscribe with retain handling 2 and without retain-as-published, so the flag
            # reaches us only when a broker replays its retained copy anyway (one that ignores
            # retain handling). That copy is the same old reading on every (re)subscribe, and
            # without a ts of its own it would be stored again at each receipt time: recorded
            # once per replay, never stored.
            if records:
                reject(
                    index,
                    RejectRow(
                        Reason.retained,
                        "retained message replayed by the broker on subscribe; publish"
                        " telemetry without the retain flag",
                        match.serial_id if match is not None else None,
                        None,
                    ),
                )
            continue
        if match is None:
            readings += 1
            reject(
                index,
                RejectRow(
                    Reason.bad_schema,
                    f"topic {_show_topic(msg.topic)} matches no configured topic pattern",
                    None,
                    None,
                ),
            )
            continue
        received_at = datetime.fromtimestamp(msg.received_at, UTC)
        parsed = match.decode(msg.payload, received_at, limits)
        readings += len(parsed.rejections) + len(parsed.readings)
        if parsed.births:
            _keep_births(batch, router, snapshot, parsed.births)
        if records:
            for rejection in parsed.rejections:
                reject(
                    index,
                    RejectRow(
                        rejection.reason, rejection.detail, rejection.serial_id, rejection.metric
                    ),
                )
        for serial, metric, ts, value, unit in parsed.readings:
            if split is not None and not split.keeps(serial):
                continue  # another worker's device: judged, stored and evaluated there
            device = snapshot.devices.get(serial)
            if device is None:
                reject(
                    index,
                    RejectRow(
                        Reason.unknown_device,
                        f"no device with serial_id {serial!r}",
                        serial,
                        metric,
                    ),
                )
                continue
            if not device.is_active:
                reject(
                    index,
                    RejectRow(
                        Reason.inactive_device, f"device {serial!r} is not active", serial, metric
                    ),
                )
                continue
            metric_key = metric.lower()
            binding = device.bindings.get(metric_key)
            if binding is None:
                why = (
                    f"metric {metric!r} is not bound to device {serial!r}"
                    if metric_key in snapshot.metric_types
                    else f"no metric type {metric!r}"
                )
                reject(index, RejectRow(Reason.unknown_metric, why, serial, metric))
                continue
            data_type = binding.data_type
            problem = payload.check_value(value, data_type, limits)
            if problem is not None:
                reason, detail = problem
                reject(index, RejectRow(reason, f"metric {metric!r}: {detail}", serial, metric))
                continue
            device_metric_id = binding.device_metric_id
            key = (device_metric_id, ts)
            if key in seen:
                batch.duplicates += 1
                continue
            seen.add(key)
            batch.rows.append(
                Row(
                    device_metric_id,
                    ts,
                    payload.encode_value(value, data_type, unit),
                    BatchReading(
                        device_metric_id,
                        ts,
                        payload.rule_value(value),
                        data_type,
                        device.serial_id,
                        device.name,
                        binding.metric_type,
                    ),
                    index,
                )
            )
    return batch
