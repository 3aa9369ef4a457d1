"""The daemon's lifecycle: start, readiness, the main loop's watchdog and checks, the stop.

What runs is assembled in `iothub.daemon.assemble` (the rule engine plugged in); the pipeline
behind the intake is `ingestor.pipeline`; what the service shows of itself is
`iothub.daemon.observe`.

Threads, each named, each watched (if one dies the service stops loudly rather than limping):
- paho's network thread (`ingestor.intake`): receives, hands over, sends acknowledgements;
- `iothub-prepare` and `iothub-writer` (`ingestor.pipeline`): gather messages into batches,
  write each in one transaction, then acknowledge;
- `iothub-catalog`: follows device/metric/rule changes in the database;
- the rule engine's workers (outbox delivery, no-data timer), when rules are on;
- the health/metrics HTTP server.
The main thread handles signals, the systemd watchdog and the periodic stats line.

Before any of that, `run()` waits in standby until it holds the election lock of its client id
(`iothub.daemon.election`); only the active connects to the broker. While the lock is
unconfirmed (its connection broke: a database restart, a network cut) acknowledgements wait and
no broker reconnect is made; taken back, ingestion goes on. Losing the lock to another instance
fences the service: no more acknowledgements, off the broker, stop (exit 69; the supervisor
restarts it as a standby).

Stop order (SIGTERM/SIGINT): close intake → the writer flushes what it holds, commits and
acknowledges → disconnect from the broker (the session stays) → release the election lock (a
standby takes over now) → stop workers → close the pool.
The whole stop is bounded by `shutdown_timeout`; what is not committed by then stays
unacknowledged and the broker delivers it again on the next start. A second signal exits at once.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Protocol, runtime_checkable

import structlog
from psycopg_pool import ConnectionPool

from config import sources as config_sources
from config.settings import Settings
from ingestor import catalog, retention, sources
from ingestor.hooks import BatchHook, NoHook
from ingestor.intake import MqttIntake
from ingestor.pipeline import Pipeline
from ingestor.writer import BatchWriter, connection_setup
from iothub import exitcodes
from iothub.daemon.election import Election
from iothub.daemon.http import HealthServer
from iothub.daemon.observe import Observer, ServiceMetrics
from iothub.daemon.systemd import SystemdNotifier
from schema import db

log = structlog.get_logger(__name__)

STARTUP_TIMEOUT = 60.0  # seconds to reach the database and the broker before giving up
MAIN_TICK = 0.5  # seconds between the main thread's checks
WRITER_STALL = 120.0  # seconds without a writer heartbeat before the watchdog stops petting


class Worker(Protocol):
    """A background part of the service with a thread of its own."""

    name: str

    def start(self) -> None: ...

    def stop(self, timeout: float) -> None: ...

    @property
    def alive(self) -> bool: ...


class Stage(Protocol):
    """What the service runs behind its intake and reads of it: the pipeline of one process
    (`ingestor.pipeline.Pipeline`) or, with `workers` > 1, the hand-off to worker processes
    (`iothub.daemon.fanout.Fanout`)."""

    @property
    def fatal(self) -> str | None: ...

    @property
    def db_ok(self) -> bool: ...

    @property
    def disk_full(self) -> bool: ...

    @property
    def heartbeat(self) -> float: ...

    @property
    def last_commit(self) -> float: ...

    @property
    def thread(self) -> threading.Thread: ...

    def start(self) -> None: ...

    def wait_ready(self, timeout: float) -> bool: ...

    def wait_flushed(self, timeout: float) -> bool: ...

    def stalled(self) -> bool: ...

    def oldest_unacked_age(self) -> float: ...


@runtime_checkable
class HealthReporter(Protocol):
    """A worker that can tell it is alive but not making progress."""

    def health(self) -> dict[str, bool]: ...


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
        stage: Callable[[IngestService], Stage] | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics or ServiceMetrics()
        self.notifier = notifier or SystemdNotifier(None)
        self.stop_event = threading.Event()
        self.router = sources.router_for(
            settings.mqtt_topics, config_sources.parse_sources(settings.sources)
        )
        self.pool = pool or db.make_pool(settings, "ingest", configure=connection_setup(settings))
        self.hook = hook or NoHook()
        # Retention runs with or without rules: rejections pile up either way.
        self.retention = retention.RetentionWorker(settings, self.pool, self.metrics.ingest)
        self.workers = [*workers, self.retention]
        self._on_catalog_change = on_catalog_change
        self.intake = MqttIntake(settings, self.router)
        self.catalog = catalog.CatalogListener(
            db.conninfo(settings, "catalog"), self._catalog_changed, self.stop_event
        )
        self.observer = Observer(self.metrics, self.intake, self.notifier, self.oldest_unacked_age)
        self.pipeline: Stage = (
            stage(self)
            if stage is not None
            else Pipeline(
                settings,
                intake=self.intake,
                catalog=self.catalog,
                writer=BatchWriter(self.pool, self.hook),
                router=self.router,
                metrics=self.metrics.ingest,
                stop=self.stop_event,
                on_committed=self.observer.batch_committed,
            )
        )
        self.election = Election(settings, self.stop_event)
        self.http = HealthServer(
            settings.http_host,
            settings.http_port,
            readiness=self.readiness,
            metrics=self.metrics,
            role=lambda: self.election.role,
        )
        self._fatal: str | None = None
        self._stalled = False  # what the main loop last logged

    @property
    def fatal(self) -> str | None:
        """Why the service stopped on its own (a thread died), or None."""
        return self._fatal or self.pipeline.fatal

    @property
    def db_ok(self) -> bool:
        return self.pipeline.db_ok

    @property
    def disk_full(self) -> bool:
        return self.pipeline.disk_full

    @property
    def totals(self) -> Counter[str]:
        """What was committed since start: messages, rows, duplicates, rejected."""
        return self.observer.totals

    # --- lifecycle

    def start(self) -> None:
        if self.settings.mqtt_shared_group is not None:
            # Mosquitto hands a shared subscription out message by message: readings of one
            # device reach several instances and commit out of device-time order.
            log.warning(
                "shared_subscription_order_not_guaranteed",
                group=self.settings.mqtt_shared_group,
                why="on a round-robin broker rule events can differ from one instance's;"
                " late readings are counted in iothub_readings_late_total",
                fix="a broker that routes the shared subscription by topic, or partitions",
            )
            if self.router.keeps_aliases:
                # A Sparkplug birth reaches one instance; the data after it may reach another,
                # whose alias store never saw it (docs/sources.md, Sparkplug B).
                log.warning(
                    "sparkplug_shared_subscription",
                    group=self.settings.mqtt_shared_group,
                    why="births and the data that uses them can reach different instances: "
                    "their data is unknown_alias there",
                    fix="one instance (or an active/standby pair) for the Sparkplug sources",
                )
        self.pool.open(wait=False)
        self.catalog.start()
        if not self.http.started:  # run() serves it from standby on
            self.http.start()
        # The pipeline first: with worker processes it returns once they can take messages,
        # so that the connection does not fill the pending window with nowhere to send it.
        self.pipeline.start()
        self.intake.start()
        for worker in self.workers:
            worker.start()
        log.info(
            "service_started",
            http_port=self.http.port,
            topics=list(self.settings.mqtt_topics),
            sources=[source.name for source in self.router.sources],
            batch_size=self.settings.batch_size,
            batch_interval=self.settings.batch_interval,
            workers=self.settings.workers,
        )

    def wait_ready(self, timeout: float = STARTUP_TIMEOUT) -> bool:
        """True once the catalogue is loaded and the broker connected."""
        deadline = time.monotonic() + timeout
        if not self.catalog.wait_ready(timeout):
            return False
        if not self.pipeline.wait_ready(max(0.0, deadline - time.monotonic())):
            return False
        # In slices: a subscription the broker refused or downgraded ends the wait at once.
        while not self.intake.ever_connected.wait(min(MAIN_TICK, timeout)):
            if self.intake.fatal is not None or time.monotonic() >= deadline:
                return False
        return True

    def readiness(self) -> dict[str, bool]:
        if self.election.role == "standby":
            # Nothing else runs yet: a standby is healthy while it can wait on the lock.
            return {"database": self.election.db_connected}
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
        return self.pipeline.stalled()

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
        flushed = self.pipeline.wait_flushed(deadline - time.monotonic())
        if not flushed:
            log.error(
                "shutdown_timeout",
                pending=self.intake.pending,
                why="not committed in time; the broker will deliver these again",
            )
        self.intake.stop()
        # Off the broker first, then the lock: a standby that connects now meets no one.
        self.election.release()
        self.metrics.active.set(0)
        for worker in reversed(self.workers):  # started first, stopped last
            worker.stop(max(0.5, deadline - time.monotonic()))
        self.http.stop()
        self.pool.close(timeout=max(0.5, deadline - time.monotonic()))
        self.catalog.thread.join(max(0.5, deadline - time.monotonic()))
        log.info("service_stopped", flushed=flushed, totals=dict(self.totals))
        return flushed

    def run(self) -> int:
        """Wait for the election lock, start, serve until stopped, stop. Returns the exit code."""
        if self.settings.standby and not self._standby():
            return exitcodes.OK
        if not self.settings.standby:
            # No election: this instance is the active one from the start, with no lock to lose.
            self.election.role = "active"
            self.metrics.active.set(1)
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
            if self.settings.standby:
                self.election.overdue()
            self._check_threads()
            self._check_writer_progress()
            now = time.monotonic()
            self.observer.update_gauges(self.readiness()["database"])
            if now >= next_stats:
                self.observer.log_stats(self.db_ok)
                next_stats = now + self.settings.stats_interval
            if watchdog and now >= next_pet:
                # Pet only while the writer makes progress: a hung writer gets us restarted.
                if now - self.pipeline.heartbeat < WRITER_STALL:
                    self.notifier.watchdog()
                next_pet = now + watchdog
        flushed = self.shutdown()
        self.observer.log_stats(self.db_ok)
        if self.intake.fatal is not None:
            return exitcodes.CONFIG_ERROR
        if self.election.lost_why is not None:
            return exitcodes.CONNECTION_FAILED
        if self.fatal:
            return exitcodes.CRASH
        return exitcodes.OK if flushed else exitcodes.FAILURE

    def _standby(self) -> bool:
        """Serve /healthz as a standby until this instance holds the lock (True) or is asked
        to stop (False)."""
        self.http.start()
        self.metrics.active.set(0)
        # A standby is a started unit: systemd must neither time its start out nor restart it.
        self.notifier.ready()
        self.notifier.status(f"standby: waiting for the lock of {self.settings.mqtt_client_id}")
        watchdog = self.notifier.watchdog_interval()
        next_pet = time.monotonic()

        def tick() -> None:
            nonlocal next_pet
            if watchdog and time.monotonic() >= next_pet:
                self.notifier.watchdog()
                next_pet = time.monotonic() + watchdog

        if not self.election.acquire(on_wait=tick):
            self.http.stop()
            log.info("service_stopped", flushed=True, totals={}, role="standby")
            return False
        self.metrics.active.set(1)
        self.notifier.status("active: ingesting")
        self.election.guard(self)
        return True

    # --- the election's watcher (`election.LockWatcher`), called on the election thread

    def lock_unconfirmed(self, why: str) -> None:  # noqa: ARG002 (the election logs it)
        """A standby may get the lock now: hold acknowledgements and broker connects. The
        broker connection itself stays: while it lives, no other instance has the session."""
        self.intake.hold()
        self.metrics.active.set(0)
        self.notifier.status("active, lock unconfirmed: acknowledgements held")

    def lock_regained(self) -> int:
        """The lock is ours again: send what waited, in arrival order, and go on."""
        sent = self.intake.resume()
        self.metrics.active.set(1)
        self.notifier.status("active: ingesting")
        return sent

    def lock_lost(self, why: str) -> None:
        """The lock is gone, so a standby may take the session over: acknowledge nothing more,
        leave the broker, stop. What is committed meanwhile comes back as duplicates."""
        self.metrics.active.set(0)
        self._fatal = f"election lock lost: {why}"
        self.intake.fence()
        self.request_stop(self._fatal)

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
                    since_commit_s=round(time.monotonic() - self.pipeline.last_commit, 1),
                )
            else:
                log.info("writer_progressing")

    def _check_threads(self) -> None:
        if self.intake.fatal is not None and not self.stop_event.is_set():
            # A later connection's SUBACK: same refusal, after draining what was received.
            log.error("mqtt_qos_refused", why=self.intake.fatal, fix="let the broker grant QoS 1")
            self.request_stop("broker subscription not at QoS 1")
        dead = []
        if (
            not self.intake.thread_alive
            and self.intake.ever_connected.is_set()
            and not self.intake.fenced
        ):
            dead.append("mqtt")
        if not self.pipeline.thread.is_alive():
            dead.append("iothub-writer")
        if not self.catalog.thread.is_alive():
            dead.append("iothub-catalog")
        if not self.election.alive:
            dead.append("iothub-election")
        dead += [w.name for w in self.workers if not w.alive]
        if dead:
            self._fatal = f"thread(s) died: {', '.join(dead)}"
            log.error("thread_died", threads=dead)
            self.request_stop(self._fatal)

    def _catalog_changed(self, snapshot: catalog.Snapshot, tables: frozenset[str]) -> None:
        if self._on_catalog_change is not None:
            self._on_catalog_change(snapshot, tables)

    # --- observation

    def oldest_unacked_age(self) -> float:
        return self.pipeline.oldest_unacked_age()
