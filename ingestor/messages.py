"""What the MQTT thread hands over: a frozen copy of each message, nothing of paho's."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class InboundMessage:
    topic: str
    payload: bytes
    mid: int
    qos: int
    dup: bool
    # Which broker connection delivered it: a message id is only valid on the connection (and
    # the session) it came with, so an acknowledgement for another generation is never sent.
    generation: int
    received_at: float  # wall clock, seconds since the epoch
    received_mono: float  # monotonic clock, for ages
    # The broker sent it as a retained message, i.e. because of the subscription and not because
    # it was just published: an old reading replayed, never stored (see ingestor/batch.py).
    retain: bool = False
