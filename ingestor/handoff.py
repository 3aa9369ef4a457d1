"""Handing received messages from the receiving process to the worker that owns their device.

With `workers` > 1 the receiving process holds the MQTT connection and nothing else of the
per-message work; each worker process runs the pipeline (parse, batch, write, rules) for the
devices it owns. This module is what both sides share:

- `owner_of`: which worker owns a message, from its device's serial_id (the topic's, else the
  payload's), by a stable hash, so one device's messages always reach one worker, in order;
- the wire: chunks of `Item` tuples to a worker, `Report` tuples back;
- `PipeIntake`: the worker's side of the hand-off, in the shape the pipeline takes from
  `ingestor.intake.MqttIntake` (take, acknowledge, give back), over a pipe.

The worker acknowledges a message by reporting its sequence number; the receiving process
sends the PUBACKs, in arrival order, on its own connection.
"""

from __future__ import annotations

import collections
import json
import threading
import time
import zlib
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection
from typing import Any, Final

import structlog

from config.topics import TopicRouter
from ingestor.messages import InboundMessage, MessageQueue
from ingestor.sources import SourceRouter

log = structlog.get_logger(__name__)

# A message on its way to a worker: an InboundMessage's fields as a plain tuple (plain tuples
# pickle several times faster than objects), with the hand-off's sequence number as its `mid`
# and generation 0: the worker rebuilds the message from it without looking at the fields.
Item = tuple[str, bytes, int, int, bool, int, float, float, bool]
# What goes to a worker: ("msgs", [Item, ...]) or ("end",): drain, commit, report, exit.
# What comes back: ("done", [seq, ...]) committed (or recorded as rejected) and to acknowledge;
# ("given_back", [seq, ...]) not committed, never to acknowledge; ("stats", {...}) after each
# commit; ("health", {...}) every REPORT_INTERVAL; ("bye", {...}) at the end.
Report = tuple[str, Any]

POLL: Final = 0.5  # seconds a worker's reader waits on the pipe before checking its parent
UNROUTABLE_OWNER: Final = 0  # the worker that rejects (and records) what names no device


def owner_of(
    topic: str,
    payload: bytes,
    router: TopicRouter | SourceRouter,
    workers: int,
    max_payload_bytes: int,
) -> int:
    """The index of the worker that owns this message's device (0 .. workers - 1).

    The serial comes from the topic when the pattern has one; on a topic without one (the shared
    `telemetry` topic, a source whose serial is in the payload) from the payload's first
    `device` (native) or `bn` (SenML) field. A payload that cannot be read that way, and a topic
    no pattern matches, go to one fixed worker, which rejects and records them as one process
    would."""
    if workers == 1:
        return 0
    route = router.match(topic)
    if route is None:
        return UNROUTABLE_OWNER
    serial = route.serial_id
    if serial is None:
        serial = serial_in_payload(payload, max_payload_bytes)
        if serial is None:
            return UNROUTABLE_OWNER
    # crc32, not hash(): Python salts str hashes per process, and every process must agree.
    return zlib.crc32(serial.encode("utf-8", "surrogatepass")) % workers


def serial_in_payload(payload: bytes, max_payload_bytes: int) -> str | None:
    """The device named by the payload's first element, or None when there is none to read.

    Within the bounds the worker will check again: nothing over `max_payload_bytes` is parsed,
    and a payload nested too deep is a RecursionError caught here (the worker rejects it)."""
    if len(payload) > max_payload_bytes:
        return None
    try:
        document = json.loads(payload)
    except (ValueError, RecursionError):
        return None
    if isinstance(document, list):
        document = document[0] if document else None
    if not isinstance(document, dict):
        return None
    for key in ("device", "bn"):
        value = document.get(key)
        if isinstance(value, str) and value:
            return value
    return None


def item_of(seq: int, message: InboundMessage) -> Item:
    return (
        message.topic,
        message.payload,
        seq,
        message.qos,
        message.dup,
        0,
        message.received_at,
        message.received_mono,
        message.retain,
    )


class Link:
    """The worker's end of its report pipe: one sender at a time (the writer thread reports
    acknowledgements, the main thread health)."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self._lock = threading.Lock()

    def send(self, report: Report) -> None:
        with self._lock:
            self._conn.send(report)


class PipeIntake(MessageQueue):
    """The worker's intake: messages arrive from the receiving process over a pipe, and
    acknowledgements go back to it as sequence numbers (the message's `mid` here).

    What it holds is bounded by the receiving process, which hands over no more than its
    `max_pending_messages` / `max_pending_bytes` of unacknowledged messages in all workers.
    `("end",)` closes it: the pipeline drains what is queued and stops. The pipe closing
    without one means the receiving process is gone: `on_orphaned` is called."""

    def __init__(
        self,
        inbox: Connection,
        link: Link,
        on_end: Callable[[], None],
        on_orphaned: Callable[[], None],
    ) -> None:
        self._inbox = inbox
        self._link = link
        self._on_end = on_end
        self._on_orphaned = on_orphaned
        self._queue: collections.deque[InboundMessage] = collections.deque()
        self._cond = threading.Condition()
        self._closed = False
        self.thread = threading.Thread(target=self._read_main, name="iothub-handoff", daemon=True)

    def start(self) -> None:
        self.thread.start()

    # --- the reader thread

    def _read_main(self) -> None:
        try:
            self._read_loop()
        except (EOFError, OSError):
            log.error("worker_orphaned", why="the receiving process closed the pipe")
            self._on_orphaned()
        except Exception:
            log.exception("handoff_reader_crashed")
            self._on_orphaned()

    def _read_loop(self) -> None:
        while True:
            if not self._inbox.poll(POLL):
                continue
            message = self._inbox.recv()
            if message[0] == "end":
                self.close_intake()
                self._on_end()
                return
            items: list[Item] = message[1]
            make = InboundMessage._make
            received = [make(item) for item in items]
            with self._cond:
                self._queue.extend(received)
                self._cond.notify_all()

    # --- what the pipeline uses (the shape of MqttIntake's)

    def _wait_for(self, count: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while len(self._queue) < count and not self._closed:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            self._cond.wait(remaining)

    def ack(self, messages: Sequence[InboundMessage]) -> None:
        """Committed: the receiving process acknowledges them in arrival order."""
        self._link.send(("done", [m.mid for m in messages]))

    def give_back(self, messages: Sequence[InboundMessage]) -> None:
        """Not committed (stopping with the database away): never acknowledged."""
        self._link.send(("given_back", [m.mid for m in messages]))

    def close_intake(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
