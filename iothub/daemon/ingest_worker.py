"""One worker process of `iothub run --workers N` (N > 1): the pipeline for the devices it owns.

The receiving process (`iothub.daemon.fanout`) holds the MQTT connection and hands each message
to the worker that owns its device. Here the messages go through the same pipeline as in one
process (`ingestor.pipeline`: prepare, write in one transaction, rules in it), with a pool, a
catalogue listener and a rule engine of this process's own. After each commit the worker
reports the messages' sequence numbers; the receiving process acknowledges them on its
connection, in arrival order.

It reports its health and a snapshot of its metrics every REPORT_INTERVAL, so that the service
shows one /healthz, one /metrics and one stats line.

Stopping: SIGTERM and SIGINT are ignored here (systemd signals the whole unit, a terminal the
whole process group): the receiving process decides when to stop and sends ("end",); the worker
then writes, commits and reports what it holds, says ("bye", ...) and exits. If the receiving
process dies, the pipe closes and the worker exits at once (`worker_orphaned`): nothing it
commits could be acknowledged any more, and the broker redelivers it all to the next start.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Final

import structlog

from config import sources as config_sources
from config.settings import Settings
from ingestor import batch as batch_mod
from ingestor import catalog, sources
from ingestor.handoff import Link, PipeIntake
from ingestor.hooks import BatchHook, NoHook
from ingestor.pipeline import Pipeline
from ingestor.writer import BatchWriter, WriteResult, connection_setup
from iothub import exitcodes, logs
from iothub.daemon import heap
from iothub.daemon.observe import BatchCounter, ServiceMetrics, snapshot
from rules_engine.engine import RuleEngine
from rules_engine.preload import RulePreloader
from schema import db

log = structlog.get_logger(__name__)

REPORT_INTERVAL: Final = 0.5  # seconds between health and metrics reports
# A worker's writer needs one connection; the second serves the rule preloader at start.
WORKER_POOL_SIZE: Final = 2


@dataclass(frozen=True)
class WorkerSpec:
    settings: Settings
    index: int
    rules_on: bool
    parent_pid: int


def main(spec: WorkerSpec, inbox: Connection, outbox: Connection) -> None:
    """The process's entry point (multiprocessing, spawn)."""
    # The receiving process orders the stop; a signal to the whole unit must not cut it short.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logs.configure(spec.settings.log_level, spec.settings.log_format)
    structlog.contextvars.bind_contextvars(worker=spec.index)
    heap.freeze_startup_objects()  # the imports are done: see iothub.daemon.heap
    try:
        code = IngestWorker(spec, inbox, outbox).run()
    except Exception:
        log.exception("worker_crashed")
        code = exitcodes.CRASH
    sys.exit(code)


class IngestWorker:
    def __init__(self, spec: WorkerSpec, inbox: Connection, outbox: Connection) -> None:
        settings = spec.settings
        self.spec = spec
        self.stop = threading.Event()
        self.link = Link(outbox)
        self.metrics = ServiceMetrics()
        self.counter = BatchCounter(self.metrics)
        self.pool = db.make_pool(
            settings,
            f"ingest-{spec.index}",
            size=WORKER_POOL_SIZE,
            configure=connection_setup(settings),
        )
        router = sources.router_for(
            settings.mqtt_topics, config_sources.parse_sources(settings.sources)
        )
        hook: BatchHook = NoHook()
        self.preloader: RulePreloader | None = None
        self.engine: RuleEngine | None = None
        if spec.rules_on:
            self.engine = RuleEngine(settings, self.metrics.rules)
            hook = self.engine
            self.preloader = RulePreloader(self.engine, self.pool)
        self.intake = PipeIntake(
            inbox,
            self.link,
            on_end=self.stop.set,
            on_orphaned=orphaned,
            worker=spec.index,
            workers=settings.workers,
        )
        self.catalog = catalog.CatalogListener(
            db.conninfo(settings, f"catalog-{spec.index}"), self._catalog_changed, self.stop
        )
        self.pipeline = Pipeline(
            settings,
            intake=self.intake,
            catalog=self.catalog,
            writer=BatchWriter(self.pool, hook),
            router=router,
            metrics=self.metrics.ingest,
            stop=self.stop,
            on_committed=self._committed,
        )
        self._fatal: str | None = None

    def _catalog_changed(self, snapshot: catalog.Snapshot, tables: frozenset[str]) -> None:
        if self.engine is not None:
            self.engine.on_catalog_change(snapshot, tables)

    def _committed(self, prepared: batch_mod.Batch, result: WriteResult) -> None:
        """After each commit, before the acknowledgement (on the writer thread)."""
        self.link.send(("stats", self.counter.committed(prepared, result)))

    def run(self) -> int:
        self.pool.open(wait=False)
        self.catalog.start()
        self.intake.start()
        if self.preloader is not None:
            self.preloader.start()
        self.pipeline.start()
        log.info("worker_started", index=self.spec.index, pid=os.getpid())
        next_interval = time.monotonic() + self.spec.settings.stats_interval
        while self.pipeline.thread.is_alive():
            self.pipeline.thread.join(REPORT_INTERVAL)
            self._check()
            self._report()
            if time.monotonic() >= next_interval:
                self.counter.new_interval()  # a fresh budget of reading_rejected lines
                next_interval = time.monotonic() + self.spec.settings.stats_interval
        flushed = self.pipeline.wait_flushed(0.0)
        fatal = self._fatal or self.pipeline.fatal
        self._report()
        self.link.send(("bye", {"flushed": flushed, "fatal": fatal}))
        if self.preloader is not None:
            self.preloader.stop(1.0)
        self.pool.close(timeout=5.0)
        self.catalog.thread.join(2.0)
        log.info("worker_stopped", index=self.spec.index, flushed=flushed)
        if fatal:
            return exitcodes.CRASH
        return exitcodes.OK if flushed else exitcodes.FAILURE

    def _check(self) -> None:
        if os.getppid() != self.spec.parent_pid:
            orphaned()
        if not self.catalog.thread.is_alive() and not self.stop.is_set():
            self._fatal = "thread(s) died: iothub-catalog"
            log.error("thread_died", threads=["iothub-catalog"])
            self.stop.set()
            self.intake.close_intake()

    def _report(self) -> None:
        p = self.pipeline
        # Handed over and not yet in a batch: summed with the receiving process's queue.
        self.metrics.ingest.queue_depth.set(self.intake.queue_depth)
        self.link.send(
            (
                "health",
                {
                    "db_ok": p.db_ok,
                    "disk_full": p.disk_full,
                    "stalled": p.stalled(),
                    "heartbeat": p.heartbeat,
                    "last_commit": p.last_commit,
                    "catalog_ready": self.catalog.wait_ready(0),
                    "catalog_connected": self.catalog.connected,
                    "fatal": self._fatal or p.fatal,
                    "metrics": snapshot(self.metrics.registry),
                },
            )
        )


def orphaned() -> None:
    """The receiving process is gone: nothing this process commits can be acknowledged now."""
    log.error("worker_orphaned", why="the receiving process ended; the broker redelivers")
    os._exit(exitcodes.FAILURE)
