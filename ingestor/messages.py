"""What the MQTT thread hands over: a frozen copy of each message, nothing of paho's."""

from __future__ import annotations

import collections
import threading
import time
from typing import NamedTuple

from ingestor.ownership import Split


class InboundMessage(NamedTuple):
    """One received message. A NamedTuple, not a frozen dataclass: one is made per message in
    the receiving process and again in a worker, and a frozen dataclass costs 3-4 times as
    much to make (measured: 3.7 against 0.8 µs, keywords against positions)."""

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
    # In a worker process: this worker's part of a message whose devices several workers own
    # (ingestor.ownership.Split); None for a message that is all this process's.
    split: Split | None = None


class MessageQueue:
    """Received messages waiting for the pipeline, under a condition: what the pipeline takes
    its batches from. The MQTT intake and a worker's hand-off intake each fill it their way and
    say how to wait (`_wait_for`)."""

    _queue: collections.deque[InboundMessage]
    _cond: threading.Condition

    def _wait_for(self, count: int, timeout: float) -> None:
        """With the condition held: wait until `count` messages are queued, or timeout/close."""
        raise NotImplementedError

    def take_batch(
        self, max_messages: int, first_wait: float, fill_wait: float
    ) -> list[InboundMessage]:
        """Up to `max_messages`: wait at most `first_wait` seconds for the first one, then at
        most `fill_wait` seconds more for the batch to fill (stopping early when closed)."""
        with self._cond:
            self._wait_for(1, first_wait)
            if self._queue and fill_wait > 0:
                self._wait_for(max_messages, fill_wait)
            queue = self._queue
            n = min(len(queue), max_messages)
            return [queue.popleft() for _ in range(n)]

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    def oldest_queued_age(self) -> float:
        try:
            head = self._queue[0]
        except IndexError:
            return 0.0
        return time.monotonic() - head.received_mono
