"""Turning received messages into rows to store and rejections to record.

Pure (no I/O): it needs the messages, a catalogue snapshot and the limits. Each reading is
checked on its own, so one bad reading never costs its neighbours.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

from ingestor import payload
from ingestor.catalog import Snapshot
from ingestor.hooks import StoredReading
from ingestor.messages import InboundMessage
from ingestor.reasons import Reason
from ingestor.topics import TopicRouter


@dataclass(frozen=True, slots=True)
class Row:
    """A validated, resolved reading ready for COPY."""

    device_metric_id: int
    ts: datetime
    value_json: str
    reading: StoredReading
    source: int  # index of its message in the batch, to record it if the server refuses it


@dataclass(frozen=True, slots=True)
class RejectRow:
    received_at: datetime
    topic: str
    payload: bytes
    reason: str
    detail: str
    serial_id: str | None
    metric: str | None


@dataclass
class Batch:
    messages: list[InboundMessage]
    rows: list[Row] = field(default_factory=list)
    rejects: list[RejectRow] = field(default_factory=list)
    # Two readings of one device_metric at the same time in one batch: the first is kept, the
    # same way the unique key keeps the first across batches.
    duplicates: int = 0

    def rejected_by_reason(self) -> Counter[str]:
        return Counter(r.reason for r in self.rejects)


def prepare(
    messages: Sequence[InboundMessage],
    snapshot: Snapshot,
    router: TopicRouter,
    limits: payload.Limits,
) -> Batch:
    batch = Batch(list(messages))
    seen: set[tuple[int, datetime]] = set()
    for index, msg in enumerate(messages):
        received_at = datetime.fromtimestamp(msg.received_at, UTC)

        def reject(
            reason: str,
            detail: str,
            serial: str | None = None,
            metric: str | None = None,
            *,
            _msg: InboundMessage = msg,
            _at: datetime = received_at,
        ) -> None:
            batch.rejects.append(
                RejectRow(_at, _msg.topic, _msg.payload, reason, detail, serial, metric)
            )

        match = router.match(msg.topic)
        if match is None:
            reject(Reason.bad_schema, f"topic {msg.topic!r} matches no configured topic pattern")
            continue
        parsed = payload.parse_message(msg.payload, match.serial_id, received_at, limits)
        for rejection in parsed.rejections:
            reject(rejection.reason, rejection.detail, rejection.serial_id, rejection.metric)
        for reading in parsed.readings:
            device = snapshot.devices.get(reading.serial_id)
            if device is None:
                reject(
                    Reason.unknown_device,
                    f"no device with serial_id {reading.serial_id!r}",
                    reading.serial_id,
                    reading.metric,
                )
                continue
            if not device.is_active:
                reject(
                    Reason.inactive_device,
                    f"device {reading.serial_id!r} is not active",
                    reading.serial_id,
                    reading.metric,
                )
                continue
            binding = device.bindings.get(reading.metric.lower())
            if binding is None:
                why = (
                    f"metric {reading.metric!r} is not bound to device {reading.serial_id!r}"
                    if reading.metric.lower() in snapshot.metric_types
                    else f"no metric type {reading.metric!r}"
                )
                reject(Reason.unknown_metric, why, reading.serial_id, reading.metric)
                continue
            problem = payload.check_value(reading.value, binding.data_type, limits)
            if problem is not None:
                reason, detail = problem
                reject(
                    reason,
                    f"metric {reading.metric!r}: {detail}",
                    reading.serial_id,
                    reading.metric,
                )
                continue
            key = (binding.device_metric_id, reading.ts)
            if key in seen:
                batch.duplicates += 1
                continue
            seen.add(key)
            batch.rows.append(
                Row(
                    binding.device_metric_id,
                    reading.ts,
                    payload.encode_value(reading.value, binding.data_type, reading.unit),
                    StoredReading(
                        binding.device_metric_id,
                        reading.ts,
                        payload.rule_value(reading.value),
                        binding.data_type,
                        device.serial_id,
                        device.name,
                        binding.metric_type,
                    ),
                    index,
                )
            )
    return batch
