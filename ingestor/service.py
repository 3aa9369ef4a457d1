"""`iothub run`: the daemon. Ingestion, rules and actions, with an orderly stop.

Threads, each named, each watched (if one dies the service stops loudly rather than limping):
- paho's network thread (`ingestor.intake`): receives, hands over, sends acknowledgements;
- `iothub-writer`: gathers messages into batches, writes each in one transaction, then
  acknowledges;
- `iothub-catalog`: follows device/metric/rule changes in the database;
- the rule engine's workers (outbox delivery, no-data timer), when rules are on;
- the health/metrics HTTP server.
The main thread handles signals, the systemd watchdog and the periodic stats line.

Stop order (SIGTERM/SIGINT): close intake → the writer flushes what it holds, commits and
acknowledges → disconnect from the broker (the session stays) → stop workers → close the pool.
The whole stop is bounded by `shutdown_timeout`; what is not committed by then stays
unacknowledged and the broker delivers it again on the next start. A second signal exits at once.
"""

from __future__ import annotations

import argparse
import os
import queue
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from types import FrameType
from typing import Protocol

import structlog
from psycopg_pool import ConnectionPool

from config.settings import Settings
from ingestor import batch as batch_mod
from ingestor import catalog, payload
from ingestor.backoff import Backoff
from ingestor.hooks import BatchHook, NoHook
from ingestor.intake import MqttIntake
from ingestor.messages import InboundMessage
from ingestor.topics import TopicRouter
from ingestor.writer import BatchWriter, DatabaseUnavailable, WriteResult, configure_connection
from iothub import db, exitcodes
from iothub.http import HealthServer
from iothub.metrics import Metrics
from iothub.systemd import SystemdNotifier
from rules_engine import engine

log = structlog.get_logger(__name__)

STARTUP_TIMEOUT = 60.0  # seconds to reach the database and the broker before giving up
MAIN_TICK = 0.5  # seconds between the main thread's checks
REJECTION_LOGS_PER_INTERVAL = 50  # reading_rejected lines per stats interval, then a count
WRITER_STALL = 120.0  # seconds without a writer heartbeat before the watchdog stops petting


class Worker(Protocol):
    """A background part of the service with a thread of its own."""

    name: str

    def start(self) -> None: ...

    def stop(self, timeout: float) -> None: ...

    @property
    def alive(self) -> bool: ...


@dataclass
class Stats:
    """Counts since the last stats line (the Prometheus counters keep the totals)."""

    messages: int = 0
    rows: int = 0
    duplicates: int = 0
    batches: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    events: Counter[str] = field(default_factory=Counter)
    late: int = 0
    rejection_logs: int = 0
    since: float = field(default_factory=time.monotonic)


def limits_from(settings: Settings) -> payload.Limits:
    return payload.Limits(
        max_payload_bytes=settings.max_payload_bytes,
        max_str_len=settings.max_str_len,
        future_tolerance=timedelta(seconds=settings.future_tolerance),
        max_age=timedelta(seconds=settings.max_age),
    )


class IngestService:
    """Everything `iothub run` runs, startable and stoppable from a test as well."""

    def __init__(
        self,
        settings: Settings,
        *,
        hook: BatchHook | None = None,
        workers: Sequence[Worker] = (),
        on_catalog_change: Callable[[catalog.Snapshot, frozenset[str]], None] | None = None,
        metrics: Metrics | None = None,
        notifier: SystemdNotifier | None = None,
        pool: ConnectionPool | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics or Metrics()
        self.notifier = notifier or SystemdNotifier(None)
        self.stop_event = threading.Event()
        self.router = TopicRouter.from_strings(settings.mqtt_topics)
        self.limits = limits_from(settings)
        self.pool = pool or db.make_pool(settings, "ingest", configure=configure_connection)
        self.hook = hook or NoHook()
        self.workers = list(workers)
        self._on_catalog_change = on_catalog_change
        self.intake = MqttIntake(settings, self.router)
        self.writer = BatchWriter(self.pool, self.hook)
        self.catalog = catalog.CatalogListener(
            db.conninfo(settings, "catalog"), self._catalog_changed, self.stop_event
        )
        self.http = HealthServer(
            settings.http_host,
            settings.http_port,
            readiness=self.readiness,
            metrics=self.metrics,
        )
        # False after a failed batch until one commits again; idle, the catalogue's own
        # connection speaks for the database.
        self.db_ok = True
        self.fatal: str | None = None
        self.stats = Stats()
        self._writer_done = threading.Event()
        self._abandoned = False  # a batch was left to the broker at stop: not a clean exit
        self._writer_crashed = False  # what it held was left to the broker: not flushed either
        self._writer_heartbeat = time.monotonic()
        self._writing_since: float | None = None
        self._prepared: queue.Queue[batch_mod.Batch | None] = queue.Queue(maxsize=1)
        self._writer = threading.Thread(target=self._writer_main, name="iothub-writer", daemon=True)
        self.totals: Counter[str] = Counter()

    # --- lifecycle

    def start(self) -> None:
        self.pool.open(wait=False)
        self.catalog.start()
        self.http.start()
        self.intake.start()
        for worker in self.workers:
            worker.start()
        self._writer.start()
        log.info(
            "service_started",
            http_port=self.http.port,
            topics=list(self.settings.mqtt_topics),
            batch_size=self.settings.batch_size,
            batch_interval=self.settings.batch_interval,
        )

    def wait_ready(self, timeout: float = STARTUP_TIMEOUT) -> bool:
        """True once the catalogue is loaded and the broker connected."""
        deadline = time.monotonic() + timeout
        if not self.catalog.wait_ready(timeout):
            return False
        remaining = max(0.0, deadline - time.monotonic())
        return self.intake.ever_connected.wait(remaining)

    def readiness(self) -> dict[str, bool]:
        return {"mqtt": self.intake.connected, "database": self.db_ok and self.catalog.connected}

    def request_stop(self, why: str = "requested") -> None:
        if not self.stop_event.is_set():
            log.info("service_stopping", why=why)
            self.notifier.stopping()
            self.stop_event.set()
            self.intake.close_intake()

    def shutdown(self) -> bool:
        """Stop in order, bounded by `shutdown_timeout`; True when everything was flushed."""
        self.request_stop()
        deadline = time.monotonic() + self.settings.shutdown_timeout
        flushed = self._writer_done.wait(max(0.0, deadline - time.monotonic()))
        flushed = flushed and not self._abandoned and not self._writer_crashed
        if not flushed:
            log.error(
                "shutdown_timeout",
                pending=self.intake.pending,
                why="not committed in time; the broker will deliver these again",
            )
        self.intake.stop()
        for worker in reversed(self.workers):  # started first, stopped last
            worker.stop(max(0.5, deadline - time.monotonic()))
        self.http.stop()
        self.pool.close(timeout=max(0.5, deadline - time.monotonic()))
        self.catalog.thread.join(max(0.5, deadline - time.monotonic()))
        log.info("service_stopped", flushed=flushed, totals=dict(self.totals))
        return flushed

    def run(self) -> int:
        """Start, serve until stopped, stop. Returns the exit code."""
        self.start()
        if not self.wait_ready(STARTUP_TIMEOUT):
            missing = [name for name, ok in self.readiness().items() if not ok]
            log.error("startup_failed", waiting_for=missing, timeout_s=STARTUP_TIMEOUT)
            self.request_stop("startup failed")
            self.shutdown()
            return exitcodes.CONNECTION_FAILED
        self.notifier.ready()
        log.info("service_ready")
        watchdog = self.notifier.watchdog_interval()
        next_stats = time.monotonic() + self.settings.stats_interval
        next_pet = time.monotonic()
        while not self.stop_event.wait(MAIN_TICK):
            self._check_threads()
            now = time.monotonic()
            self._update_gauges()
            if now >= next_stats:
                self._log_stats()
                next_stats = now + self.settings.stats_interval
            if watchdog and now >= next_pet:
                # Pet only while the writer makes progress: a hung writer gets us restarted.
                if now - self._writer_heartbeat < WRITER_STALL:
                    self.notifier.watchdog()
                next_pet = now + watchdog
        flushed = self.shutdown()
        self._log_stats()
        if self.fatal:
            return exitcodes.CRASH
        return exitcodes.OK if flushed else exitcodes.FAILURE

    def _check_threads(self) -> None:
        dead = []
        if not self.intake.thread_alive and self.intake.ever_connected.is_set():
            dead.append("mqtt")
        if not self._writer.is_alive():
            dead.append("iothub-writer")
        if not self.catalog.thread.is_alive():
            dead.append("iothub-catalog")
        dead += [w.name for w in self.workers if not w.alive]
        if dead:
            self.fatal = f"thread(s) died: {', '.join(dead)}"
            log.error("thread_died", threads=dead)
            self.request_stop(self.fatal)

    # --- the writer thread

    def _catalog_changed(self, snapshot: catalog.Snapshot, tables: frozenset[str]) -> None:
        if self._on_catalog_change is not None:
            self._on_catalog_change(snapshot, tables)

    def _writer_main(self) -> None:
        preparer = threading.Thread(target=self._prepare_main, name="iothub-prepare", daemon=True)
        try:
            preparer.start()
            self._writer_loop()
        except Exception as exc:
            self.fatal = f"writer crashed: {type(exc).__name__}: {exc}"
            self._writer_crashed = True
            log.exception("writer_crashed")
            self.stop_event.set()
            self.intake.close_intake()
            self._drain_prepared()
        finally:
            preparer.join(self.settings.shutdown_timeout)
            self._writer_done.set()

    def _gather(self) -> list[InboundMessage]:
        """Messages for one batch: up to `batch_size`, or what came within `batch_interval`."""
        size, interval = self.settings.batch_size, self.settings.batch_interval
        return self.intake.take_batch(size, interval, interval)

    # Two stages, so that parsing the next batch (Python, holding the GIL) overlaps the
    # current transaction (the server's work, GIL released): `iothub-prepare` gathers and
    # prepares, the writer stores and acknowledges. One prepared batch waits between them at
    # most, its messages still counted as pending, so memory stays bounded by
    # max_pending_messages; batches are written and acknowledged in the order they were taken.

    def _prepare_main(self) -> None:
        try:
            self._prepare_loop()
        except Exception as exc:
            self.fatal = f"writer crashed: {type(exc).__name__}: {exc}"
            self._writer_crashed = True
            log.exception("writer_crashed", stage="prepare")
            self.stop_event.set()
            self.intake.close_intake()
        finally:
            self._prepared.put(None)  # end of stream: the writer stops after what came before

    def _prepare_loop(self) -> None:
        # Nothing is parsed before the catalogue is there: readings would all be unknown_device.
        while not self.catalog.wait_ready(MAIN_TICK):
            if self.stop_event.is_set():
                return
        while True:
            messages = self._gather()
            if not messages:
                if self.stop_event.is_set() and self.intake.queue_depth == 0:
                    return
                continue
            prepared = batch_mod.prepare(messages, self.catalog.snapshot, self.router, self.limits)
            self._prepared.put(prepared)

    def _writer_loop(self) -> None:
        while True:
            self._writer_heartbeat = time.monotonic()
            try:
                prepared = self._prepared.get(timeout=MAIN_TICK)
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
                self.intake.release(len(messages))
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
            self.intake.release(len(prepared.messages))

    def _write_with_retry(self, prepared: batch_mod.Batch) -> bool:
        backoff = Backoff()
        give_up_at: float | None = None
        while True:
            try:
                result = self.writer.write(prepared)
            except DatabaseUnavailable as exc:
                self.db_ok = False
                self.metrics.batches.labels(outcome="retry").inc()
                if self.stop_event.is_set():
                    if give_up_at is None:
                        give_up_at = time.monotonic() + self.settings.shutdown_timeout * 0.8
                    if time.monotonic() >= give_up_at:
                        log.error("batch_abandoned_at_stop", messages=len(prepared.messages))
                        self._abandoned = True
                        return False
                delay = backoff.next()
                log.warning(
                    "db_unavailable",
                    error=str(exc).splitlines()[0][:300],
                    retry_in=round(delay, 2),
                    messages=len(prepared.messages),
                )
                self._writer_heartbeat = time.monotonic()
                time.sleep(delay)
                continue
            if backoff.failing:
                log.info("db_recovered")
            self.db_ok = True
            self._record(prepared, result)
            return True

    def _record(self, prepared: batch_mod.Batch, result: WriteResult) -> None:
        m = self.metrics
        n_msgs = len(prepared.messages)
        rejected = prepared.rejected_by_reason()
        if result.storage_rejects:
            rejected["storage_error"] += result.storage_rejects
        m.messages_received.inc(n_msgs)
        m.readings_stored.inc(result.inserted)
        m.duplicates.inc(result.duplicates)
        m.batches.labels(outcome="committed").inc()
        m.batch_seconds.observe(result.seconds)
        for reason, count in rejected.items():
            m.rejected.labels(reason=reason).inc(count)
        for kind, count in result.hook.events.items():
            m.events.labels(kind=kind).inc(count)
        m.late.inc(result.hook.late)
        s = self.stats
        s.messages += n_msgs
        s.rows += result.inserted
        s.duplicates += result.duplicates
        s.batches += 1
        s.rejected.update(rejected)
        s.events.update(result.hook.events)
        s.late += result.hook.late
        self.totals.update(
            messages=n_msgs,
            rows=result.inserted,
            duplicates=result.duplicates,
            rejected=sum(rejected.values()),
        )
        for r in prepared.rejects:
            if s.rejection_logs >= REJECTION_LOGS_PER_INTERVAL:
                break
            s.rejection_logs += 1
            log.info(
                "reading_rejected",
                reason=str(r.reason),
                detail=r.detail,
                topic=r.topic,
                serial_id=r.serial_id,
                metric=r.metric,
            )
        log.debug(
            "batch_committed",
            messages=n_msgs,
            rows=result.inserted,
            duplicates=result.duplicates,
            rejected=sum(rejected.values()),
            ms=round(result.seconds * 1000, 1),
        )

    # --- observation

    def oldest_unacked_age(self) -> float:
        writing = self._writing_since
        age = time.monotonic() - writing if writing is not None else 0.0
        return max(age, self.intake.oldest_queued_age())

    def _update_gauges(self) -> None:
        m = self.metrics
        m.queue_depth.set(self.intake.queue_depth)
        m.pending.set(self.intake.pending)
        m.sessions_lost.set(self.intake.session_lost)
        m.stale_acks.set(self.intake.stale_acks)
        m.oldest_unacked_seconds.set(self.oldest_unacked_age())
        m.mqtt_connected.set(1 if self.intake.connected else 0)
        m.db_connected.set(1 if self.readiness()["database"] else 0)

    def _log_stats(self) -> None:
        s = self.stats
        elapsed = max(time.monotonic() - s.since, 1e-6)
        suppressed = max(0, sum(s.rejected.values()) - s.rejection_logs)
        log.info(
            "stats",
            msgs_per_s=round(s.messages / elapsed, 1),
            rows_per_s=round(s.rows / elapsed, 1),
            batches=s.batches,
            duplicates=s.duplicates,
            rejected=dict(s.rejected),
            rejections_not_logged=suppressed,
            events=dict(s.events),
            late=s.late,
            queue_depth=self.intake.queue_depth,
            pending=self.intake.pending,
            oldest_unacked_s=round(self.oldest_unacked_age(), 3),
            mqtt_connected=self.intake.connected,
            db_ok=self.db_ok,
        )
        self.notifier.status(
            f"{s.messages / elapsed:.0f} msg/s, {s.rows / elapsed:.0f} rows/s, "
            f"pending {self.intake.pending}, rejected {sum(s.rejected.values())}"
        )
        self.stats = Stats()


def build(settings: Settings, notifier: SystemdNotifier | None = None) -> IngestService:
    """The service with the rule engine plugged in (its hook, workers and rule cache)."""
    metrics = Metrics()
    pool = db.make_pool(settings, "ingest", configure=configure_connection)
    rules = engine.RuleEngine(settings, metrics)
    service = IngestService(
        settings,
        hook=rules,
        workers=rules.workers(pool),
        on_catalog_change=rules.on_catalog_change,
        metrics=metrics,
        notifier=notifier,
        pool=pool,
    )
    rules.backlog_age = service.oldest_unacked_age
    rules.intake_since = service.intake.connected_since
    return service


# --- the CLI command


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--no-rules", action="store_true", help="store telemetry only; rules and actions off"
    )


def main(settings: Settings, args: argparse.Namespace) -> int:
    log.info("config_loaded", settings=settings.redacted())
    notifier = SystemdNotifier.from_environ()
    service = (
        IngestService(settings, notifier=notifier) if args.no_rules else build(settings, notifier)
    )
    signals = {"count": 0}

    def on_signal(signum: int, frame: FrameType | None) -> None:
        signals["count"] += 1
        if signals["count"] > 1:
            # Second signal: the operator means it. Unacknowledged messages come back later.
            os.write(2, b'{"event": "forced_exit", "level": "error"}\n')
            os._exit(exitcodes.INTERRUPTED)
        service.request_stop(f"signal {signal.Signals(signum).name}")

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    return service.run()
