"""The ingestion pipeline behind the intake: the prepare and write stages, the retries of a
batch, and the acknowledgement after commit.

Two threads, so that parsing the next batch (Python, holding the GIL) overlaps the current
transaction (the server's work, GIL released): `iothub-prepare` gathers and prepares,
`iothub-writer` stores and acknowledges. One prepared batch waits between them at most, its
messages still counted as pending, so memory stays bounded by max_pending_messages; batches are
written and acknowledged in the order they were taken.

A message is acknowledged only after the transaction that stored it committed; what is not
committed when the pipeline stops is released unacknowledged, and the broker delivers it again.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Protocol

import structlog

from config.settings import Settings
from config.topics import TopicRouter
from ingestor import batch as batch_mod
from ingestor import catalog, payload
from ingestor.backoff import Backoff
from ingestor.messages import InboundMessage
from ingestor.metrics import IngestMetrics
from ingestor.sources import SourceRouter
from ingestor.writer import BatchTimedOut, BatchWriter, DatabaseUnavailable, WriteResult

log = structlog.get_logger(__name__)

TICK = 0.5  # seconds between a stage's checks of the stop flag
# Share of shutdown_timeout a batch keeps retrying after the stop, leaving the rest for the
# other steps of the stop.
STOP_RETRY_SHARE = 0.8

OnCommitted = Callable[[batch_mod.Batch, WriteResult], None]
"""Called on the writer thread after each committed batch (before its acknowledgement)."""


class Intake(Protocol):
    """What the pipeline takes messages from and acknowledges them to: the MQTT connection
    (`ingestor.intake.MqttIntake`) or, in a worker process, the hand-off from the receiving
    process (`ingestor.handoff.PipeIntake`)."""

    def take_batch(
        self, max_messages: int, first_wait: float, fill_wait: float
    ) -> list[InboundMessage]: ...

    def ack(self, messages: Sequence[InboundMessage]) -> None: ...

    def give_back(self, messages: Sequence[InboundMessage]) -> None: ...

    def close_intake(self) -> None: ...

    @property
    def queue_depth(self) -> int: ...

    def oldest_queued_age(self) -> float: ...


def bounds_from(settings: Settings) -> batch_mod.Bounds:
    return batch_mod.Bounds(
        max_readings=settings.max_batch_readings,
        max_bytes=settings.max_batch_bytes,
        max_rejections_per_message=settings.max_rejections_per_message,
    )


def limits_from(settings: Settings) -> payload.Limits:
    return payload.Limits(
        max_payload_bytes=settings.max_payload_bytes,
        max_str_len=settings.max_str_len,
        future_tolerance=timedelta(seconds=settings.future_tolerance),
        max_age=timedelta(seconds=settings.max_age),
    )


class Pipeline:
    """Takes batches from the intake, writes each in one transaction, acknowledges them.

    `stop` is the service's stop flag: once set, the prepare stage takes what is queued and
    ends, the writer writes what it was handed and ends. A crash of either stage sets it too.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        intake: Intake,
        catalog: catalog.CatalogListener,
        writer: BatchWriter,
        router: TopicRouter | SourceRouter,
        metrics: IngestMetrics,
        stop: threading.Event,
        on_committed: OnCommitted,
    ) -> None:
        self.settings = settings
        self.intake = intake
        self.catalog = catalog
        self.writer = writer
        self.router = router
        self.metrics = metrics
        self.limits = limits_from(settings)
        self.bounds = bounds_from(settings)
        self._stop = stop
        self._on_committed = on_committed
        # False after a failed batch until one commits again; idle, the catalogue's own
        # connection speaks for the database.
        self.db_ok = True
        # True while batches fail with SQLSTATE 53100, until one commits again.
        self.disk_full = False
        self.fatal: str | None = None
        self.heartbeat = time.monotonic()
        self._done = threading.Event()
        self._abandoned = False  # a batch was left to the broker at stop: not a clean exit
        self._crashed = False  # what it held was left to the broker: not flushed either
        self._writing_since: float | None = None
        self.last_commit = time.monotonic()  # a batch committed, for the stall check
        self._prepared: queue.Queue[batch_mod.Batch | None] = queue.Queue(maxsize=1)
        self.thread = threading.Thread(target=self._writer_main, name="iothub-writer", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def wait_ready(self, timeout: float) -> bool:
        """Ready to prepare batches: the catalogue is loaded."""
        return self.catalog.wait_ready(timeout)

    def wait_flushed(self, timeout: float) -> bool:
        """Wait for both stages to end; True when everything taken was committed."""
        done = self._done.wait(max(0.0, timeout))
        return done and not self._abandoned and not self._crashed

    def oldest_unacked_age(self) -> float:
        """Seconds the oldest message received and not yet acknowledged has waited."""
        writing = self._writing_since
        age = time.monotonic() - writing if writing is not None else 0.0
        return max(age, self.intake.oldest_queued_age())

    def stalled(self) -> bool:
        """Messages have waited, and no batch has committed, for writer_stall_timeout: the
        writer is blocked (a lock, a hung statement, a retry loop) while the database and the
        broker may both look fine."""
        limit = self.settings.writer_stall_timeout
        return self.oldest_unacked_age() > limit and time.monotonic() - self.last_commit > limit

    # --- the threads

    def _crash(self, exc: Exception, **context: str) -> None:
        self.fatal = f"writer crashed: {type(exc).__name__}: {exc}"
        self._crashed = True
        log.exception("writer_crashed", **context)
        self._stop.set()
        self.intake.close_intake()

    def _writer_main(self) -> None:
        preparer = threading.Thread(target=self._prepare_main, name="iothub-prepare", daemon=True)
        try:
            preparer.start()
            self._writer_loop()
        except Exception as exc:
            self._crash(exc)
            self._drain_prepared()
        finally:
            preparer.join(self.settings.shutdown_timeout)
            self._done.set()

    def _gather(self) -> list[InboundMessage]:
        """Messages for one batch: up to `batch_size`, or what came within `batch_interval`."""
        size, interval = self.settings.batch_size, self.settings.batch_interval
        return self.intake.take_batch(size, interval, interval)

    def _prepare_main(self) -> None:
        try:
            self._prepare_loop()
        except Exception as exc:
            self._crash(exc, stage="prepare")
        finally:
            self._prepared.put(None)  # end of stream: the writer stops after what came before

    def _prepare_loop(self) -> None:
        # Nothing is parsed before the catalogue is there: readings would all be unknown_device.
        while not self.catalog.wait_ready(TICK):
            if self._stop.is_set():
                return
        keeps_aliases = isinstance(self.router, SourceRouter) and self.router.keeps_aliases
        if keeps_aliases and not self._load_aliases():
            return
        while True:
            messages = self._gather()
            if not messages:
                if self._stop.is_set() and self.intake.queue_depth == 0:
                    return
                continue
            # A batch is bounded by readings and bytes too: what one batch does not take is
            # prepared as the next one, in order.
            while messages:
                prepared = batch_mod.prepare(
                    messages, self.catalog.snapshot, self.router, self.limits, self.bounds
                )
                self._prepared.put(prepared)
                messages = messages[len(prepared.messages) :]

    def _load_aliases(self) -> bool:
        """Load the Sparkplug births kept in the database before any message is decoded, so
        that data after a restart resolves; retried with backoff. False: stopped meanwhile."""
        assert isinstance(self.router, SourceRouter)
        backoff = Backoff()
        while not self._stop.is_set():
            try:
                scopes = self.writer.load_aliases(self.router.aliases)
            except DatabaseUnavailable as exc:
                delay = backoff.next()
                log.warning(
                    "sparkplug_aliases_load_failed",
                    error=str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__,
                    retry_in=round(delay, 2),
                )
                self._stop.wait(delay)
                continue
            log.info("sparkplug_aliases_loaded", scopes=scopes)
            return True
        return False

    def _writer_loop(self) -> None:
        while True:
            self.heartbeat = time.monotonic()
            try:
                prepared = self._prepared.get(timeout=TICK)
            except queue.Empty:
                continue
            if prepared is None:
                return
            messages = prepared.messages
            self._writing_since = messages[0].received_mono
            if self._write_with_retry(prepared):
                self.intake.ack(messages)
            else:
                # Stopping with the database away: leave them to the broker.
                self.intake.give_back(messages)
                self._drain_prepared()
                return
            self._writing_since = None

    def _drain_prepared(self) -> None:
        """Give back, unacknowledged, whatever the prepare stage still hands over."""
        while True:
            try:
                prepared = self._prepared.get(timeout=self.settings.shutdown_timeout)
            except queue.Empty:
                return
            if prepared is None:
                return
            self.intake.give_back(prepared.messages)

    def _write_with_retry(self, prepared: batch_mod.Batch) -> bool:
        backoff = Backoff()
        give_up_at: float | None = None
        while True:
            try:
                result = self.writer.write(prepared)
            except DatabaseUnavailable as exc:
                # A timed-out batch says nothing about the database being reachable; whether
                # the writer is stuck is the stall check's to say.
                timed_out = isinstance(exc, BatchTimedOut)
                if exc.disk_full:
                    if not self.disk_full:
                        log.error(
                            "db_disk_full",
                            sqlstate=exc.sqlstate,
                            error=str(exc).splitlines()[0][:300],
                            why="the database has no space left; nothing is acknowledged "
                            "until a batch commits again",
                        )
                    self.disk_full = True
                    self.metrics.db_disk_full.set(1)
                elif not timed_out:
                    self.db_ok = False
                self.metrics.batches.labels(outcome="retry").inc()
                if self._stop.is_set():
                    if give_up_at is None:
                        give_up_at = (
                            time.monotonic() + self.settings.shutdown_timeout * STOP_RETRY_SHARE
                        )
                    if time.monotonic() >= give_up_at:
                        log.error("batch_abandoned_at_stop", messages=len(prepared.messages))
                        self._abandoned = True
                        return False
                delay = backoff.next()
                log.warning(
                    "batch_timed_out" if timed_out else "db_unavailable",
                    error=str(exc).splitlines()[0][:300],
                    retry_in=round(delay, 2),
                    messages=len(prepared.messages),
                )
                self.heartbeat = time.monotonic()
                time.sleep(delay)
                continue
            if backoff.failing:
                log.info("db_recovered", disk_was_full=self.disk_full)
            self.db_ok = True
            self.last_commit = time.monotonic()
            self.disk_full = False
            self.metrics.db_disk_full.set(0)
            self._on_committed(prepared, result)
            return True
