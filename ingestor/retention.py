"""Retention of the side tables: rejected messages, finished actions, delivery attempts.

These tables only grow otherwise (docs/operations.md, "Retention"). A named thread deletes rows
older than their setting every `retention_interval`, `retention_batch_size` rows per statement,
each statement committed on its own: a backlog (the first pass after an upgrade, a flood of
rejections) is worked off in many short transactions instead of one that holds locks and WAL.
A failing pass (the database away, the disk full) is logged and retried with backoff; the
service's other threads do not depend on it.

The same thread measures the tables' sizes (pg_total_relation_size: a catalogue look-up, no
scan) at most every SIZE_INTERVAL, for the `iothub_table_bytes` gauges and the stats line. The
tables stay plain tables on TimescaleDB too, so the pruning is the same on both servers
(docs/timescaledb.md, "Side tables").
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass

import psycopg
import structlog
from psycopg_pool import ConnectionPool, PoolTimeout

from config.settings import Settings
from ingestor.backoff import Backoff
from ingestor.metrics import IngestMetrics
from ingestor.worker import WorkerThread
from schema import sql as queries_mod

log = structlog.get_logger(__name__)
queries = queries_mod.load("ingestor", "retention.sql")

THREAD_NAME = "iothub-retention"
FIRST_PASS_DELAY = 10.0  # seconds after start: let the service get going before pruning
POOL_WAIT = 10.0  # seconds to wait for a pooled connection
STATEMENTS_PER_PASS = 1000  # DELETEs per table and pass at most; the next pass goes on
BACKOFF_MAX = 300.0  # seconds between failed passes at most
SIZE_INTERVAL = 300.0  # seconds between two measurements of the tables' sizes at least


@dataclass(frozen=True)
class Target:
    """One table and how long its rows are kept."""

    table: str
    query: str
    keep: float  # seconds


def targets(settings: Settings) -> tuple[Target, ...]:
    # Order matters: the readings before their payloads, the attempts before their outbox rows
    # (so the outbox's cascade has little left to do).
    return (
        Target("rejected_messages", "prune_rejected_messages", settings.rejected_retention),
        Target("rejected_payloads", "prune_rejected_payloads", settings.rejected_retention),
        Target("action_attempts", "prune_action_attempts", settings.attempts_retention),
        Target("action_outbox", "prune_action_outbox", settings.outbox_retention),
    )


class RetentionWorker(WorkerThread):
    """The `iothub-retention` thread (`service.Worker`: start, stop, alive)."""

    name = THREAD_NAME

    def __init__(self, settings: Settings, pool: ConnectionPool, metrics: IngestMetrics) -> None:
        self._settings = settings
        self._pool = pool
        self._metrics = metrics
        self._targets = targets(settings)
        self._sized_at: float | None = None  # monotonic time of the last measurement
        super().__init__()

    def measure_sizes(self) -> dict[str, int]:
        """Every pruned table's size in bytes, recorded in the metrics. Raises on a database
        error (the caller backs off)."""
        tables = [target.table for target in self._targets]
        with self._pool.connection(timeout=POOL_WAIT) as conn:
            rows = conn.execute(queries["table_sizes"], {"tables": tables}).fetchall()
        sizes = {str(table): int(size) for table, size in rows if size is not None}
        self._metrics.record_table_sizes(sizes)
        self._sized_at = time.monotonic()
        return sizes

    def _sizes_due(self) -> bool:
        return self._sized_at is None or time.monotonic() - self._sized_at >= SIZE_INTERVAL

    def prune_once(self) -> Counter[str]:
        """One pass over every table; returns the rows deleted per table. Raises on a
        database error (the caller backs off)."""
        deleted: Counter[str] = Counter()
        limit = self._settings.retention_batch_size
        for target in self._targets:
            for _ in range(STATEMENTS_PER_PASS):
                if self._stop.is_set():
                    return deleted
                with self._pool.connection(timeout=POOL_WAIT) as conn:
                    cur = conn.execute(queries[target.query], {"keep": target.keep, "limit": limit})
                    count = cur.rowcount
                if count > 0:
                    deleted[target.table] += count
                    self._metrics.retention_deleted.labels(table=target.table).inc(count)
                if count < limit:
                    break
        return deleted

    def _run(self) -> None:
        backoff = Backoff(initial=5.0, maximum=BACKOFF_MAX)
        delay = min(FIRST_PASS_DELAY, self._settings.retention_interval)
        while not self._stop.wait(delay):
            started = time.monotonic()
            try:
                deleted = self.prune_once()
                if self._sizes_due():
                    self.measure_sizes()
            except (psycopg.Error, PoolTimeout) as exc:
                delay = backoff.next()
                log.warning(
                    "retention_failed",
                    error=" ".join(str(exc).split())[:300] or type(exc).__name__,
                    sqlstate=getattr(exc, "sqlstate", None),
                    retry_in=round(delay, 1),
                )
                continue
            except Exception:
                # A bug: keep the thread (and the service) alive, but say so loudly and slowly.
                delay = backoff.next()
                log.exception("retention_crashed", retry_in=round(delay, 1))
                continue
            if backoff.failing:
                log.info("retention_recovered")
            backoff.reset()
            delay = self._settings.retention_interval
            if deleted:
                log.info(
                    "retention_pruned",
                    deleted=dict(deleted),
                    ms=round((time.monotonic() - started) * 1000, 1),
                )
