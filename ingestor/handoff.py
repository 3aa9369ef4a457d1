"""Handing received messages from the receiving process to the worker that owns their device.

With `workers` > 1 the receiving process holds the MQTT connection and nothing else of the
per-message work; each worker process runs the pipeline (parse, batch, write, rules) for the
devices it owns. This module is what both sides share:

- `owners_of`: which workers own a message, from its devices' serial_ids (the topic's, else the
  payload's), by a stable hash, so one device's messages always reach one worker, in order;
- a message whose devices several workers own (a gateway's array on the shared topic) goes
  whole to every owner, with its part (`ingestor.ownership.Split`);
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
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection
from typing import Any, Final

import msgspec
import structlog

from config.sources import SENML_BASE_NAME, template_fields
from config.topics import TopicRouter
from ingestor.decoders import senml
from ingestor.messages import InboundMessage, MessageQueue
from ingestor.ownership import Split, device_owner
from ingestor.sources import Route, SourceRouter

log = structlog.get_logger(__name__)

# A message on its way to a worker: an InboundMessage's fields as a plain tuple (plain tuples
# pickle several times faster than objects), with the hand-off's sequence number as its `mid`
# and generation 0, and in the place of `split` the owners it is sent to (the primary first)
# when several workers own its devices, else None: the worker rebuilds the message from it
# without looking at the other fields.
Item = tuple[str, bytes, int, int, bool, int, float, float, bool, tuple[int, ...] | None]
# What goes to a worker: ("msgs", [Item, ...]) or ("end",): drain, commit, report, exit.
# What comes back: ("done", [seq, ...]) committed (or recorded as rejected) and to acknowledge;
# ("given_back", [seq, ...]) not committed, never to acknowledge; ("stats", {...}) after each
# commit; ("health", {...}) every REPORT_INTERVAL; ("bye", {...}) at the end.
Report = tuple[str, Any]

POLL: Final = 0.5  # seconds a worker's reader waits on the pipe before checking its parent
UNROUTABLE_OWNER: Final = 0  # the worker that rejects (and records) what names no device


def owners_of(
    topic: str,
    payload: bytes,
    router: TopicRouter | SourceRouter,
    workers: int,
    max_payload_bytes: int,
) -> tuple[int, ...]:
    """The indexes of the workers that own this message's devices, the primary first.

    The serial comes from the topic when the pattern has one; on a topic without one (the shared
    `telemetry` topic, a source whose serial is in the payload) from every element's `device`
    (native) or every record's `bn` (SenML), in order: the primary owns the first device. A
    payload that cannot be read that way, and a topic no pattern matches, go to one fixed
    worker, which rejects and records them as one process would."""
    if workers == 1:
        return (0,)
    if isinstance(router, TopicRouter):
        found = router.match(topic)
        route = None if found is None else Route(found.serial_id)
    else:
        route = router.match(topic)
    if route is None:
        return (UNROUTABLE_OWNER,)
    if not names_devices_in_payload(route):
        assert route.serial_id is not None
        return (device_owner(route.serial_id, workers),)
    serials = serials_in_payload(route, payload, max_payload_bytes)
    if not serials:
        return (UNROUTABLE_OWNER,)
    return tuple(dict.fromkeys(device_owner(serial, workers) for serial in serials))


def names_devices_in_payload(route: Route) -> bool:
    """Whether the route's devices are named by the payload rather than by the topic."""
    source = route.source
    if source is not None and source.decoder == "senml" and source.serial is not None:
        # A serial template built from the base name ("senml-{bn}") names one device per bn.
        return SENML_BASE_NAME in template_fields(source.serial)
    return route.serial_id is None


class _Named(msgspec.Struct):
    """What the receiving process reads of an element: the fields that name its device. Every
    other field is skipped without building a Python object for it."""

    device: Any = msgspec.UNSET
    bn: Any = msgspec.UNSET


_NAMED = msgspec.json.Decoder(list[_Named] | _Named)
_BOM = b"\xef\xbb\xbf"


def serials_in_payload(route: Route, payload: bytes, max_payload_bytes: int) -> tuple[str, ...]:
    """The devices a payload names, each once, in the order they first appear; empty when there
    is none to read.

    They are the serials the route's decoder will give the readings (native: each element's
    `device`; SenML: the base name as it applies to each record, through the source's serial
    template), so that each worker finds its own devices among them. Within the bounds the worker
    will check again: nothing over `max_payload_bytes` is parsed, and a payload nested too deep is
    a RecursionError caught here (the worker rejects it)."""
    if len(payload) > max_payload_bytes:
        return ()
    elements = _named_elements(payload)
    if elements is None:
        return ()
    source = route.source
    serials: dict[str, None] = {}
    if source is not None and source.decoder == "senml":
        if not isinstance(elements, list):
            return ()  # not a pack: the decoder rejects it whole
        # RFC 8428 4.1: a record's bn applies to it and to the records after it.
        base_name: object = None
        for element in elements:
            if element.bn is not msgspec.UNSET:
                base_name = element.bn
            serial = senml.serial_of(source, route.fields, base_name)
            if serial:
                serials[serial] = None
    else:
        for element in elements if isinstance(elements, list) else (elements,):
            device = element.device
            if isinstance(device, str) and device:
                serials[device] = None
    return tuple(serials)


def _named_elements(payload: bytes) -> list[_Named] | _Named | None:
    """The payload's elements as far as they name devices: the objects of an array (other
    elements name none), or the one object; None when it is neither or not JSON."""
    if payload.startswith(_BOM):
        payload = payload[len(_BOM) :]
    try:
        # msgspec skips the fields that name no device: several times cheaper than json.loads
        # here, where the receiving process is the service's bottleneck.
        named: list[_Named] | _Named = _NAMED.decode(payload)
        return named
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError):
        pass
    # What msgspec refuses (an array with elements that are not objects, a lone surrogate in a
    # string, a nesting deeper than it goes) is read as one process reads it, with the stdlib.
    try:
        document = json.loads(payload)
    except (ValueError, RecursionError):
        return None
    if isinstance(document, dict):
        return _named(document)
    if isinstance(document, list):
        return [_named(element) for element in document if isinstance(element, dict)]
    return None


def _named(element: dict[str, Any]) -> _Named:
    return _Named(element.get("device", msgspec.UNSET), element.get("bn", msgspec.UNSET))


def item_of(seq: int, message: InboundMessage, owners: tuple[int, ...] | None = None) -> Item:
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
        owners,
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
        *,
        worker: int = 0,
        workers: int = 1,
    ) -> None:
        self._inbox = inbox
        self._worker = worker
        self._workers = workers
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
            worker, workers = self._worker, self._workers
            make = InboundMessage._make
            received = [
                make(item)
                if item[9] is None
                else make((*item[:9], Split(worker, workers, item[9])))
                for item in items
            ]
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
