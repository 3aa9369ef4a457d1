"""What the daemon shows of itself: its metrics (one registry, each part's instruments), the
hook that feeds them after each committed batch, the gauges and the periodic stats line."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import structlog
from prometheus_client import CollectorRegistry, Gauge, exposition

from ingestor import batch as batch_mod
from ingestor.intake import MqttIntake
from ingestor.metrics import IngestMetrics
from ingestor.writer import WriteResult
from iothub.daemon.systemd import SystemdNotifier
from rules_engine.metrics import RuleMetrics

log = structlog.get_logger(__name__)

# Every name here is a plain Prometheus name, so the body is the same in text format 0.0.4 and
# 1.0.0; announcing 0.0.4 keeps older Prometheus servers and other scrapers happy.
CONTENT_TYPE = exposition.CONTENT_TYPE_PLAIN_0_0_4

REJECTION_LOGS_PER_INTERVAL = 50  # reading_rejected lines per stats interval, then a count
LOGGED_TOPIC_CHARS = 200  # characters of a topic in a reading_rejected line (topics reach 64 KiB)


class ServiceMetrics:
    """All instruments of one service instance, in a registry of their own, served on /metrics
    by `iothub.daemon.http.HealthServer`.

    A registry per instance (not prometheus_client's global one) lets tests and the demo run
    several services in one process without "Duplicated timeseries" errors.
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.ingest = IngestMetrics(self.registry)
        self.rules = RuleMetrics(self.registry)
        self.active = Gauge(
            "iothub_active",
            "1 while this instance is the active one of its client id, 0 while standby or fenced",
            registry=self.registry,
        )

    def render(self) -> bytes:
        """The registry in the Prometheus text exposition format (see CONTENT_TYPE)."""
        return exposition.generate_latest(self.registry)


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


class Observer:
    """Counts what the pipeline commits (metrics, stats, totals, a bounded number of
    reading_rejected lines) and reports the service's state (gauges, the stats line)."""

    def __init__(
        self,
        metrics: ServiceMetrics,
        intake: MqttIntake,
        notifier: SystemdNotifier,
        oldest_unacked_age: Callable[[], float],
    ) -> None:
        self.metrics = metrics
        self.intake = intake
        self.notifier = notifier
        self.oldest_unacked_age = oldest_unacked_age
        self.stats = Stats()
        self.totals: Counter[str] = Counter()

    def batch_committed(self, prepared: batch_mod.Batch, result: WriteResult) -> None:
        """The pipeline's hook after each commit (on the writer thread)."""
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
        # Counted here, after the commit, not by the rule engine inside the transaction: a
        # batch that rolls back wrote no events.
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

    def update_gauges(self, db_connected: bool) -> None:
        m = self.metrics.ingest
        m.queue_depth.set(self.intake.queue_depth)
        m.pending.set(self.intake.pending)
        m.pending_bytes.set(self.intake.pending_bytes)
        m.sessions_lost.set(self.intake.session_lost)
        m.stale_acks.set(self.intake.stale_acks)
        m.oldest_unacked_seconds.set(self.oldest_unacked_age())
        m.mqtt_connected.set(1 if self.intake.connected else 0)
        m.db_connected.set(1 if db_connected else 0)

    def log_stats(self, db_ok: bool) -> None:
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
            db_ok=db_ok,
            table_bytes=self.metrics.ingest.table_sizes,  # as last measured by retention
        )
        self.notifier.status(
            f"{s.messages / elapsed:.0f} msg/s, {s.rows / elapsed:.0f} rows/s, "
            f"pending {self.intake.pending}, rejected {sum(s.rejected.values())}"
        )
        self.stats = Stats()
