"""What the daemon shows of itself: its metrics (one registry, each part's instruments), the
hook that feeds them after each committed batch, the gauges and the periodic stats line."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import structlog
from prometheus_client import CollectorRegistry, Gauge, exposition
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from ingestor import batch as batch_mod
from ingestor.metrics import IngestMetrics
from ingestor.writer import WriteResult
from iothub.daemon.systemd import SystemdNotifier
from rules_engine.metrics import RuleMetrics

if TYPE_CHECKING:  # the annotation only: a worker process uses this module, but no MQTT client
    from ingestor.intake import MqttIntake

log = structlog.get_logger(__name__)

# Every name here is a plain Prometheus name, so the body is the same in text format 0.0.4 and
# 1.0.0; announcing 0.0.4 keeps older Prometheus servers and other scrapers happy.
CONTENT_TYPE = exposition.CONTENT_TYPE_PLAIN_0_0_4

REJECTION_LOGS_PER_INTERVAL = 50  # reading_rejected lines per stats interval, then a count
LOGGED_TOPIC_CHARS = 200  # characters of a topic in a reading_rejected line (topics reach 64 KiB)

Sample = tuple[str, dict[str, str], float]
Family = tuple[str, str, str, list[Sample]]
"""A metric family as plain values (name, help, type, samples): what a worker process sends."""


def snapshot(registry: CollectorRegistry) -> list[Family]:
    """Every family of the registry, as plain values that pickle."""
    return [
        (f.name, f.documentation, f.type, [(s.name, dict(s.labels), s.value) for s in f.samples])
        for f in registry.collect()
    ]


# Gauges that count what each process holds: the service holds their sum.
SUMMED_GAUGES = frozenset({"iothub_queue_depth"})


def _combine(sample_name: str, kind: str, old: float, new: float) -> float:
    """Two processes' values of one sample: counters and histograms add up, and the gauges
    of SUMMED_GAUGES; another gauge is the worst (highest) of them, which is what every other
    gauge a worker sets means (disk full: 1); a creation time is the earliest."""
    if sample_name.endswith("_created"):
        return min(old, new)
    if kind == "gauge" and sample_name not in SUMMED_GAUGES:
        return max(old, new)
    return old + new


class _Summed(Collector):
    """The families of this process's registry with the workers' snapshots added in."""

    def __init__(self, own: CollectorRegistry, others: list[list[Family]]) -> None:
        self._own = own
        self._others = others

    def collect(self) -> list[Metric]:
        heads: dict[str, tuple[str, str]] = {}
        values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
        for families in [snapshot(self._own), *self._others]:
            for name, doc, kind, samples in families:
                heads.setdefault(name, (doc, kind))
                into = values.setdefault(name, {})
                for sample_name, sample_labels, value in samples:
                    key = (sample_name, tuple(sorted(sample_labels.items())))
                    old = into.get(key)
                    into[key] = value if old is None else _combine(sample_name, kind, old, value)
        out = []
        for name, (doc, kind) in heads.items():
            family = Metric(name, doc, kind)
            for (sample_name, labels), value in values[name].items():
                family.add_sample(sample_name, dict(labels), value)
            out.append(family)
        return out


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
        # The latest snapshot of each worker process, by index (empty with one process).
        self.remote: dict[int, list[Family]] = {}

    def view(self) -> CollectorRegistry:
        """The service's metrics as one registry: this process's, with the worker processes'
        summed in (their latest snapshots); this process's own registry when there are none."""
        if not self.remote:
            return self.registry
        summed = CollectorRegistry(auto_describe=False)
        summed.register(_Summed(self.registry, list(self.remote.values())))
        return summed

    def remote_sum(self, sample_name: str) -> float:
        """The sum of one sample over the worker processes' latest snapshots (0 with none)."""
        return sum(
            value
            for families in list(self.remote.values())  # a copy: the results thread writes it
            for _name, _doc, _kind, samples in families
            for name, _labels, value in samples
            if name == sample_name
        )

    def render(self) -> bytes:
        """`view()` in the Prometheus text exposition format (see CONTENT_TYPE)."""
        return exposition.generate_latest(self.view())


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
    since: float = field(default_factory=time.monotonic)


@dataclass(frozen=True)
class Committed:
    """What one committed batch adds to the stats line and the totals; plain values, so that a
    worker process can send it to the receiving process."""

    messages: int
    rows: int
    duplicates: int
    rejected: dict[str, int]
    events: dict[str, int]
    late: int


class BatchCounter:
    """Counts a committed batch into the metrics and logs a bounded number of its rejected
    readings (`reading_rejected`, REJECTION_LOGS_PER_INTERVAL per stats interval)."""

    def __init__(self, metrics: ServiceMetrics) -> None:
        self.metrics = metrics
        self.rejection_logs = 0  # reading_rejected lines in this stats interval

    def new_interval(self) -> None:
        self.rejection_logs = 0

    def committed(self, prepared: batch_mod.Batch, result: WriteResult) -> Committed:
        m = self.metrics.ingest
        # A message several workers own is in each of their batches; its primary counts it.
        n_msgs = prepared.counted_messages
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
        self._log_rejections(prepared)
        log.debug(
            "batch_committed",
            messages=n_msgs,
            rows=result.inserted,
            duplicates=result.duplicates,
            rejected=sum(rejected.values()),
            ms=round(result.seconds * 1000, 1),
        )
        return Committed(
            messages=n_msgs,
            rows=result.inserted,
            duplicates=result.duplicates,
            rejected=dict(rejected),
            events=dict(result.hook.events),
            late=result.hook.late,
        )

    def _log_rejections(self, prepared: batch_mod.Batch) -> None:
        for message in prepared.rejected.values():
            if self.rejection_logs >= REJECTION_LOGS_PER_INTERVAL:
                return
            topic = prepared.messages[message.source].topic[:LOGGED_TOPIC_CHARS]
            for r in message.recorded:
                if self.rejection_logs >= REJECTION_LOGS_PER_INTERVAL:
                    return
                self.rejection_logs += 1
                log.info(
                    "reading_rejected",
                    reason=str(r.reason),
                    detail=r.detail,
                    topic=topic,
                    serial_id=r.serial_id,
                    metric=r.metric,
                )


class Observer:
    """Counts what the pipeline commits (metrics, stats, totals, a bounded number of
    reading_rejected lines) and reports the service's state (gauges, the stats line).

    With worker processes, the workers count their batches into their own metrics and send
    each batch's `Committed` here (`add`); the stats line and the totals are the sums."""

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
        self.counter = BatchCounter(metrics)
        self.stats = Stats()
        self.totals: Counter[str] = Counter()

    def batch_committed(self, prepared: batch_mod.Batch, result: WriteResult) -> None:
        """The pipeline's hook after each commit (on the writer thread)."""
        self.add(self.counter.committed(prepared, result))

    def add(self, done: Committed) -> None:
        """A committed batch into the stats line and the totals (metrics are counted apart)."""
        s = self.stats
        s.messages += done.messages
        s.rows += done.rows
        s.duplicates += done.duplicates
        s.batches += 1
        s.rejected.update(done.rejected)
        s.events.update(done.events)
        s.late += done.late
        self.totals.update(
            messages=done.messages,
            rows=done.rows,
            duplicates=done.duplicates,
            rejected=sum(done.rejected.values()),
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
        suppressed = max(0, sum(s.rejected.values()) - self.counter.rejection_logs)
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
            # With workers, messages wait in the receiving process and in each worker's queue
            # (the workers' part as of their last snapshot, at most half a second old).
            queue_depth=self.intake.queue_depth
            + int(self.metrics.remote_sum("iothub_queue_depth")),
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
        self.counter.new_interval()
