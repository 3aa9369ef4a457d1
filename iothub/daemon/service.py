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
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Protocol, runtime_checkable

import structlog
from psycopg_pool import ConnectionPool

from config.settings import Settings
from config.topics import TopicRouter
from ingestor import batch as batch_mod
from ingestor import catalog, payload, retention
from ingestor.backoff import Backoff
from ingestor.hooks import BatchHook, NoHook
from ingestor.intake import MqttIntake, held_bytes
from ingestor.messages import InboundMessage
from ingestor.writer import (
    BatchTimedOut,
    BatchWriter,
    DatabaseUnavailable,
    WriteResult,
    connection_setup,
)
from iothub import exitcodes, signals
from iothub.daemon.http import HealthServer
from iothub.daemon.observe import ServiceMetrics
from iothub.daemon.systemd import SystemdNotifier
from rules_engine import engine
from schema import db

log = structlog.get_logger(__name__)

STARTUP_TIMEOUT = 60.0  # seconds to reach the database and the broker before giving up
MAIN_TICK = 0.5  # seconds between the main thread's checks
REJECTION_LOGS_PER_INTERVAL = 50  # reading_rejected lines per stats interval, then a count
WRITER_STALL = 120.0  # seconds without a writer heartbeat before the watchdog stops petting
LOGGED_TOPIC_CHARS = 200  # characters of a topic in a reading_rejected line (topics reach 64 KiB)


class Worker(Protocol):
    """A background part of the service with a thread of its own."""

    name: str

    def start(self) -> None: ...

    def stop(self, timeout: float) -> None: ...

    @property
    def alive(self) -> bool: ...


@runtime_checkable
class HealthReporter(Protocol):
    """A worker that can tell it is alive but not making progress."""

    def health(self) -> dict[str, bool]: ...


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


class IngestService:
    """Everything `iothub run` runs, startable and stoppable from a test as well."""

    def __init__(
        self,
        settings: Settings,
        *,
        hook: BatchHook | None = None,
        workers: Sequence[Worker] = (),
        on_catalog_change: Callable[[catalog.Snapshot, frozenset[str]], None] | None = None,
        metrics: ServiceMetrics | None = None,
        notifier: SystemdNotifier | None = None,
        pool: ConnectionPool | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics or ServiceMetrics()
        self.notifier = notifier or SystemdNotifier(None)
        self.stop_event = threading.Event()
        self.router = TopicRouter.from_strings(settings.mqtt_topics)
        self.limits = limits_from(settings)
        self.bounds = bounds_from(settings)
        self.pool = pool or db.make_pool(settings, "ingest", configure=connection_setup(settings))
        self.hook = hook or NoHook()
        # Retention runs with or without rules: rejections pile up either way.
        self.retention = retention.RetentionWorker(settings, self.pool, self.metrics.ingest)
        self.workers = [*workers, self.retention]
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
        # True while batches fail with SQLSTATE 53100, until one commits again.
        self.disk_full = False
        self.fatal: str | None = None
        self.stats = Stats()
        self._writer_done = threading.Event()
        self._abandoned = False  # a batch was left to the broker at stop: not a clean exit
        self._writer_crashed = False  # what it held was left to the broker: not flushed either
        self._writer_heartbeat = time.monotonic()
        self._writing_since: float | None = None
        self._last_commit = time.monotonic()  # a batch committed, for the stall check
        self._stalled = False  # what the main loop last logged
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
        # In slices: a subscription the broker refused or downgraded ends the wait at once.
        while not self.intake.ever_connected.wait(min(MAIN_TICK, timeout)):
            if self.intake.fatal is not None or time.monotonic() >= deadline:
                return False
        return True

    def readiness(self) -> dict[str, bool]:
        checks = {
            "mqtt": self.intake.connected,
            "database": self.db_ok and self.catalog.connected,
            "writer": not self.writer_stalled(),
            # Reachable but refusing writes: named apart, so the cause is plain in /healthz.
            "database_disk": not self.disk_full,
        }
        # Workers that watch themselves (the outbox reports a stuck delivery) add their checks;
        # the main loop calls this every tick, so their reports do not wait for a /healthz poll.
        for worker in self.workers:
            if isinstance(worker, HealthReporter):
                checks.update(worker.health())
        return checks

    def writer_stalled(self) -> bool:
        """Messages have waited, and no batch has committed, for writer_stall_timeout: the
        writer is blocked (a lock, a hung statement, a retry loop) while the database and the
        broker may both look fine."""
        limit = self.settings.writer_stall_timeout
        return self.oldest_unacked_age() > limit and time.monotonic() - self._last_commit > limit

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
            if self.intake.fatal is not None:
                return self._refuse_broker()
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
            self._check_writer_progress()
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
        if self.intake.fatal is not None:
            return exitcodes.CONFIG_ERROR
        if self.fatal:
            return exitcodes.CRASH
        return exitcodes.OK if flushed else exitcodes.FAILURE

    def _refuse_broker(self) -> int:
        """The broker will not give us QoS 1 subscriptions: stop, as a configuration error."""
        log.error("mqtt_qos_refused", why=self.intake.fatal, fix="let the broker grant QoS 1")
        self.request_stop("broker subscription not at QoS 1")
        self.shutdown()
        return exitcodes.CONFIG_ERROR

    def _check_writer_progress(self) -> None:
        stalled = self.writer_stalled()
        if stalled != self._stalled:
            self._stalled = stalled
            if stalled:
                log.warning(
                    "writer_stalled",
                    pending=self.intake.pending,
                    oldest_unacked_s=round(self.oldest_unacked_age(), 1),
                    since_commit_s=round(time.monotonic() - self._last_commit, 1),
                )
            else:
                log.info("writer_progressing")

    def _check_threads(self) -> None:
        if self.intake.fatal is not None and not self.stop_event.is_set():
            # A later connection's SUBACK: same refusal, after draining what was received.
            log.error("mqtt_qos_refused", why=self.intake.fatal, fix="let the broker grant QoS 1")
            self.request_stop("broker subscription not at QoS 1")
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
            # A batch is bounded by readings and bytes too: what one batch does not take is
            # prepared as the next one, in order.
            while messages:
                prepared = batch_mod.prepare(
                    messages, self.catalog.snapshot, self.router, self.limits, self.bounds
                )
                self._prepared.put(prepared)
                messages = messages[len(prepared.messages) :]

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
                self.intake.release(len(messages), held_bytes(messages))
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
            self.intake.release(len(prepared.messages), held_bytes(prepared.messages))

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
                    self.metrics.ingest.db_disk_full.set(1)
                elif not timed_out:
                    self.db_ok = False
                self.metrics.ingest.batches.labels(outcome="retry").inc()
                if self.stop_event.is_set():
                    if give_up_at is None:
                        give_up_at = time.monotonic() + self.settings.shutdown_timeout * 0.8
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
                self._writer_heartbeat = time.monotonic()
                time.sleep(delay)
                continue
            if backoff.failing:
                log.info("db_recovered", disk_was_full=self.disk_full)
            self.db_ok = True
            self._last_commit = time.monotonic()
            self.disk_full = False
            self.metrics.ingest.db_disk_full.set(0)
            self._record(prepared, result)
            return True

    def _record(self, prepared: batch_mod.Batch, result: WriteResult) -> None:
        m = self.metrics.ingest
        n_msgs = len(prepared.messages)
        rejected = prepared.rejected_by_reason()
        if result.storage_rejects:
            rejected["storage_error"] += result.storage_rejects
        if result.rejections_not_recorded:
            m.rejections_not_recorded.inc(result.rejections_not_recorded)
        m.messages_received.inc(n_msgs)
        m.readings_stored.inc(result.inserted)
        m.duplicates.inc(result.duplicates)
        m.batches.labels(outcome="committed").inc()
        m.batch_seconds.observe(result.seconds)
        for reason, count in rejected.items():
            m.rejected.labels(reason=reason).inc(count)
        for kind, count in result.hook.events.items():
            self.metrics.rules.events.labels(kind=kind).inc(count)
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
        for message in prepared.rejected.values():
            if s.rejection_logs >= REJECTION_LOGS_PER_INTERVAL:
                break
            topic = prepared.messages[message.source].topic[:LOGGED_TOPIC_CHARS]
            for r in message.recorded:
                if s.rejection_logs >= REJECTION_LOGS_PER_INTERVAL:
                    break
                s.rejection_logs += 1
                log.info(
                    "reading_rejected",
                    reason=str(r.reason),
                    detail=r.detail,
                    topic=topic,
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
        m = self.metrics.ingest
        m.queue_depth.set(self.intake.queue_depth)
        m.pending.set(self.intake.pending)
        m.pending_bytes.set(self.intake.pending_bytes)
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
    metrics = ServiceMetrics()
    pool = db.make_pool(settings, "ingest", configure=connection_setup(settings))
    rules = engine.RuleEngine(settings, metrics.rules)
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

    def stop(name: str) -> None:
        service.request_stop(f"signal {name}")

    with signals.on_stop(stop):
        return service.run()
