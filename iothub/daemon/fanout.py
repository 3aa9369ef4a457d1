"""The receiving process of `iothub run --workers N` (N > 1): hand-off and acknowledgements.

The MQTT intake (`ingestor.intake`) runs here, bounded as in one process; this module takes its
messages in chunks, numbers them in arrival order and sends each to the worker process that
owns its device (`ingestor.handoff.owners_of`, a stable hash of the serial_id), where the
pipeline parses, writes and evaluates rules (`iothub.daemon.ingest_worker`). One device's
messages go to one worker, in order, so rules see exactly what one process would see. A
message whose devices several workers own (a gateway's array on the shared topic) goes whole
to each of them, and each stores only its own devices' readings (`ingestor.ownership.Split`); it
is finished once every part is.

Workers report the numbers of the messages whose transaction committed; the PUBACKs go out in
arrival order, for the longest run of finished numbers only: a message is acknowledged after
its own commit (every part's) and after every message that arrived before it finished. A
message a worker gave back (stopping with the database away), or one part of it, is skipped,
never acknowledged: the broker redelivers it and the unique key drops what parts committed.

Two threads: `iothub-dispatch` (intake → workers) and `iothub-results` (workers → PUBACKs,
stats, health, metrics). A worker that dies stops the service (`worker_died`, exit 70): its
messages never finish, so nothing after the first of them is acknowledged, and the broker
redelivers them to the next start.

What the service reads of its pipeline (`db_ok`, `stalled()`, `heartbeat`...) is the worst of
the workers' reports.
"""

from __future__ import annotations

import multiprocessing
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from typing import Any, Final

import structlog

from config.settings import Settings
from ingestor import handoff
from ingestor.intake import MqttIntake
from ingestor.messages import InboundMessage
from ingestor.sources import SourceRouter
from iothub.daemon import ingest_worker
from iothub.daemon.observe import Committed, Observer, ServiceMetrics

log = structlog.get_logger(__name__)

CHUNK_MESSAGES: Final = 500  # messages taken from the intake per hand-off at most
CHUNK_WAIT: Final = 0.002  # seconds a chunk waits to fill once it has a message
TICK: Final = 0.5  # seconds between the threads' checks of the stop flag
START_METHOD: Final = "spawn"  # a fresh interpreter: no paho thread or lock copied by fork
START_TIMEOUT: Final = 60.0  # seconds start() waits for the workers to load their catalogues
JOIN_TIMEOUT: Final = 5.0  # seconds a worker may take to exit after its last report


@dataclass(slots=True)
class _Parts:
    """A message sent to several workers, until each has reported its part."""

    left: int  # parts not yet reported
    acknowledge: bool = True  # False once a part was given back


class InFlight:
    """The messages handed to workers and not yet acknowledged or given back, by sequence
    number in arrival order, and which of them have finished.

    Bounded by the intake's window (max_pending_messages): a message enters when it is handed
    over and leaves in the run that acknowledges or gives it back; its parts (one per owner)
    leave with it. Not locked: the caller holds its lock around each use."""

    def __init__(self) -> None:
        self._messages: dict[int, InboundMessage] = {}  # by seq, in arrival order
        self._finished: dict[int, bool] = {}  # seq -> acknowledge (True) or give back
        self._parts: dict[int, _Parts] = {}  # the messages in flight in several parts
        self._next_seq = 1  # the oldest seq not yet acknowledged or given back
        self._last_seq = 0  # the last seq handed out

    def __len__(self) -> int:
        return len(self._messages)

    def oldest(self) -> InboundMessage | None:
        return next(iter(self._messages.values()), None)

    def add(self, message: InboundMessage, parts: int = 1) -> int:
        """Number a message handed to `parts` workers; it finishes when all have reported."""
        self._last_seq += 1
        seq = self._last_seq
        self._messages[seq] = message
        if parts > 1:
            self._parts[seq] = _Parts(parts)
        return seq

    def finish(
        self, seqs: Sequence[int], *, acknowledge: bool
    ) -> tuple[list[InboundMessage], list[InboundMessage]]:
        """One worker's report on these messages (its parts of them); what leaves: the run of
        finished messages from the oldest one on, as (to acknowledge, to give back). A message
        one of whose parts was given back is given back whole."""
        finished, parts = self._finished, self._parts
        for seq in seqs:
            split = parts.get(seq)
            if split is None:
                finished[seq] = acknowledge
                continue
            split.left -= 1
            split.acknowledge = split.acknowledge and acknowledge
            if split.left == 0:
                del parts[seq]
                finished[seq] = split.acknowledge
        to_ack: list[InboundMessage] = []
        to_give: list[InboundMessage] = []
        seq = self._next_seq
        while seq in finished:
            (to_ack if finished.pop(seq) else to_give).append(self._messages.pop(seq))
            seq += 1
        self._next_seq = seq
        return to_ack, to_give


class Fanout:
    """The pipeline of the service with `workers` > 1, in the shape of `ingestor.pipeline`'s."""

    def __init__(
        self,
        settings: Settings,
        *,
        intake: MqttIntake,
        router: SourceRouter,
        observer: Observer,
        metrics: ServiceMetrics,
        stop: threading.Event,
        rules_on: bool,
    ) -> None:
        self.settings = settings
        self.intake = intake
        self.router = router
        self.observer = observer
        self.metrics = metrics
        self._stop = stop
        self.count = settings.workers
        self.fatal: str | None = None
        self._lock = threading.Lock()
        self._inflight = InFlight()  # under _lock: dispatch adds, results finishes
        self._health: list[dict[str, Any]] = [{} for _ in range(self.count)]
        self._bye: list[dict[str, Any] | None] = [None] * self.count
        self._done = threading.Event()
        ctx = multiprocessing.get_context(START_METHOD)
        self._procs: list[BaseProcess] = []
        self._to_workers: list[Connection] = []
        self._from_workers: list[Connection] = []
        self._child_ends: list[Connection] = []
        for index in range(self.count):
            inbox_r, inbox_w = ctx.Pipe(duplex=False)
            reports_r, reports_w = ctx.Pipe(duplex=False)
            spec = ingest_worker.WorkerSpec(settings, index, rules_on, os.getpid())
            self._procs.append(
                ctx.Process(
                    target=ingest_worker.main,
                    args=(spec, inbox_r, reports_w),
                    name=f"iothub-worker-{index}",
                )
            )
            self._to_workers.append(inbox_w)
            self._from_workers.append(reports_r)
            self._child_ends += [inbox_r, reports_w]
        self.thread = threading.Thread(target=self._dispatch_main, name="iothub-dispatch")
        self.thread.daemon = True
        self._results = threading.Thread(target=self._results_main, name="iothub-results")
        self._results.daemon = True
        self._dispatch_beat = time.monotonic()

    # --- the shape of ingestor.pipeline.Pipeline, as the service reads it

    def start(self) -> None:
        for proc in self._procs:
            proc.start()
        # Only the children hold their ends now: a worker's death is EOF on our side.
        for conn in self._child_ends:
            conn.close()
        log.info("workers_started", workers=self.count, pids=[p.pid for p in self._procs])
        self._results.start()
        self.thread.start()
        # Bounded; one that does not get ready in time is the service's start-up failure.
        deadline = time.monotonic() + START_TIMEOUT
        while not self._stop.is_set() and time.monotonic() < deadline:
            if self.wait_ready(TICK):
                return

    def wait_ready(self, timeout: float) -> bool:
        """Every worker has loaded its catalogue (or one failed: then False at once)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.fatal is not None:
                return False
            if all(h.get("catalog_ready") for h in self._health):
                return True
            time.sleep(0.05)
        return False

    def wait_flushed(self, timeout: float) -> bool:
        """Wait until every worker said bye (or died) and what they committed is acknowledged;
        True when everything taken was committed. Workers still running at the deadline are
        killed: what they held is not acknowledged, and the broker delivers it again."""
        deadline = time.monotonic() + timeout
        done = self._done.wait(max(0.0, timeout))
        self.thread.join(max(0.1, deadline - time.monotonic()))
        self._join_all()
        flushed = all(bye is not None and bye["flushed"] for bye in self._bye)
        return done and flushed and self.fatal is None and not self._inflight

    @property
    def db_ok(self) -> bool:
        return all(h.get("db_ok", True) for h in self._health)

    @property
    def disk_full(self) -> bool:
        return any(h.get("disk_full", False) for h in self._health)

    @property
    def heartbeat(self) -> float:
        """The oldest sign of life of the dispatch thread and every worker's writer (the
        monotonic clock is the same in every process on Linux): the watchdog pets only while
        all of them make progress."""
        beats = [float(h["heartbeat"]) for h in self._health if "heartbeat" in h]
        return min([self._dispatch_beat, *beats])

    @property
    def last_commit(self) -> float:
        return max((h.get("last_commit", 0.0) for h in self._health), default=0.0)

    def stalled(self) -> bool:
        return any(h.get("stalled", False) for h in self._health)

    def oldest_unacked_age(self) -> float:
        with self._lock:
            oldest = self._inflight.oldest()
        age = time.monotonic() - oldest.received_mono if oldest is not None else 0.0
        return max(age, self.intake.oldest_queued_age())

    # --- dispatch: intake → workers

    def _crash(self, why: str) -> None:
        if self.fatal is None:
            self.fatal = why
        self._stop.set()
        self.intake.close_intake()

    def _dispatch_main(self) -> None:
        try:
            self._dispatch_loop()
        except Exception as exc:
            log.exception("dispatch_crashed")
            self._crash(f"dispatch crashed: {type(exc).__name__}: {exc}")
        finally:
            for index in range(self.count):
                self._send(index, ("end",))

    def _dispatch_loop(self) -> None:
        workers, limit = self.count, self.settings.max_payload_bytes
        router = self.router
        while True:
            self._dispatch_beat = time.monotonic()
            messages = self.intake.take_batch(CHUNK_MESSAGES, TICK, CHUNK_WAIT)
            if not messages:
                if self._stop.is_set() and self.intake.queue_depth == 0:
                    return
                continue
            chunks: list[list[handoff.Item]] = [[] for _ in range(workers)]
            # Read outside the lock: the results thread's acknowledgements need it meanwhile.
            owned = [
                (message, handoff.owners_of(message.topic, message.payload, router, workers, limit))
                for message in messages
            ]
            with self._lock:
                for message, owners in owned:
                    seq = self._inflight.add(message, len(owners))
                    if len(owners) == 1:
                        chunks[owners[0]].append(handoff.item_of(seq, message))
                        continue
                    # Several workers' devices: each owner gets the whole message (in its
                    # chunk, in arrival order among that worker's messages) and its role.
                    item = handoff.item_of(seq, message, owners)
                    for owner in owners:
                        chunks[owner].append(item)
            for index, chunk in enumerate(chunks):
                if chunk:
                    self._send(index, ("msgs", chunk))

    def _send(self, index: int, message: tuple[Any, ...]) -> None:
        try:
            self._to_workers[index].send(message)
        except (OSError, ValueError):
            # The worker is gone (the results thread reports it): its messages stay unfinished,
            # so nothing from the first of them on is acknowledged.
            if message[0] != "end":
                log.warning("handoff_failed", worker=index, why="the worker's pipe is closed")

    # --- results: workers → acknowledgements, stats, health

    def _results_main(self) -> None:
        try:
            self._results_loop()
        except Exception as exc:
            log.exception("results_crashed")
            self._crash(f"results crashed: {type(exc).__name__}: {exc}")
        finally:
            self._done.set()

    def _results_loop(self) -> None:
        live = {conn: index for index, conn in enumerate(self._from_workers)}
        while live:
            for conn in wait(list(live), timeout=TICK):
                assert isinstance(conn, Connection)
                index = live[conn]
                try:
                    report = conn.recv()
                except (EOFError, OSError):
                    del live[conn]
                    self._worker_gone(index)
                    continue
                self._handle(index, report)

    def _handle(self, index: int, report: handoff.Report) -> None:
        kind = report[0]
        if kind == "done":
            self._finish(report[1], acknowledge=True)
        elif kind == "given_back":
            self._finish(report[1], acknowledge=False)
        elif kind == "stats":
            done: Committed = report[1]
            self.observer.add(done)
        elif kind == "health":
            health: dict[str, Any] = report[1]
            self.metrics.remote[index] = health.pop("metrics")
            self._health[index] = health
        elif kind == "bye":
            self._bye[index] = report[1]
            if report[1]["fatal"]:
                log.error("worker_failed", worker=index, why=report[1]["fatal"])
                self._crash(f"worker {index}: {report[1]['fatal']}")

    def _finish(self, seqs: Sequence[int], *, acknowledge: bool) -> None:
        """Acknowledge (or give back) the run of finished messages from the oldest one on."""
        with self._lock:
            to_ack, to_give = self._inflight.finish(seqs, acknowledge=acknowledge)
        # Only this thread acknowledges: PUBACKs leave in arrival order.
        if to_ack:
            self.intake.ack(to_ack)
        if to_give:
            self.intake.give_back(to_give)

    def _worker_gone(self, index: int) -> None:
        proc = self._procs[index]
        proc.join(JOIN_TIMEOUT)
        if self._bye[index] is not None:
            return
        why = f"worker {index} (pid {proc.pid}) died with exit code {proc.exitcode}"
        log.error(
            "worker_died",
            worker=index,
            pid=proc.pid,
            exitcode=proc.exitcode,
            why="its messages are not acknowledged; the broker redelivers them after a restart",
        )
        self._crash(why)

    def _join_all(self) -> None:
        for proc in self._procs:
            if proc.pid is None:
                continue  # never started
            proc.join(JOIN_TIMEOUT if proc.is_alive() else 0)
            if proc.is_alive():
                log.error("worker_kill", pid=proc.pid, why="still running after the stop")
                proc.kill()
                proc.join(JOIN_TIMEOUT)
