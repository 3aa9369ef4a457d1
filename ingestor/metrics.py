"""The ingestion's Prometheus instruments: intake, batches, readings, rejections, pending
messages, retention and the database's state.

The rule engine owns its own (rules_engine/metrics.py); the daemon composes both into one
registry (iothub/daemon/observe.py)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from ingestor.reasons import Reason

# Batches are a COPY plus rule evaluation in one transaction: about a millisecond when small and
# warm, seconds when the database is struggling. Beyond 10 s the exact value no longer matters.
BATCH_SECONDS_BUCKETS = (  # seconds
    *(0.001, 0.0025, 0.005),
    *(0.01, 0.025, 0.05),
    *(0.1, 0.25, 0.5),
    *(1.0, 2.5, 5.0, 10.0),
)

# Label values known in advance get a series at 0 from the start, so that `rate()` and alerts
# see the first occurrence instead of a series appearing out of nowhere: the codes of
# docs/mqtt.md, from ingestor/reasons.py.
REJECTION_REASONS = tuple(str(reason) for reason in Reason)
# The tables ingestor/retention.py prunes.
RETENTION_TABLES = ("rejected_messages", "rejected_payloads", "action_attempts", "action_outbox")


class IngestMetrics:
    """The ingestion's instruments, in the registry given (a fresh one of their own if none).

    A registry per instance (not prometheus_client's global one) lets tests and the demo run
    several services in one process without "Duplicated timeseries" errors.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        r = self.registry

        # --- intake
        self.messages_received = Counter(
            "iothub_messages_received_total",
            "MQTT messages taken from the broker and committed (counted when their batch commits)",
            registry=r,
        )
        self.readings_stored = Counter(
            "iothub_readings_stored_total", "Readings committed as new telemetry rows", registry=r
        )
        self.duplicates = Counter(
            "iothub_readings_duplicate_total",
            "Readings already stored (redelivered by the broker), dropped by the unique key",
            registry=r,
        )
        self.rejected = Counter(
            "iothub_readings_rejected_total",
            "Readings rejected instead of stored in telemetries, by reason code (recorded in "
            "rejected_messages up to max_rejections_per_message per message)",
            ["reason"],
            registry=r,
        )
        self.rejections_not_recorded = Counter(
            "iothub_rejections_not_recorded_total",
            "Rejected readings beyond max_rejections_per_message of their message: counted in "
            "rejected_payloads.not_recorded, without a rejected_messages row",
            registry=r,
        )
        self.late = Counter(
            "iothub_readings_late_total",
            "Readings older than the last one evaluated: stored, but not moving rule state",
            registry=r,
        )

        # --- batches
        self.batches = Counter(
            "iothub_batches_total", "Batch transactions, by outcome", ["outcome"], registry=r
        )
        self.batch_seconds = Histogram(
            "iothub_batch_seconds",
            "Time to write one batch: load, insert, evaluate rules, commit",
            buckets=BATCH_SECONDS_BUCKETS,
            registry=r,
        )

        # --- state
        self.queue_depth = Gauge(
            "iothub_queue_depth", "Messages received and waiting to be written", registry=r
        )
        self.pending = Gauge(
            "iothub_pending_messages",
            "Messages received and not yet acknowledged (bounded by max_pending_messages)",
            registry=r,
        )
        self.pending_bytes = Gauge(
            "iothub_pending_bytes",
            "Payload and topic bytes of the messages received and not yet acknowledged "
            "(bounded by max_pending_bytes)",
            registry=r,
        )
        self.sessions_lost = Gauge(
            "iothub_mqtt_sessions_lost",
            "Reconnects since start on which the broker had no session for us (queued "
            "messages of that session are gone)",
            registry=r,
        )
        self.stale_acks = Gauge(
            "iothub_stale_acks",
            "Acknowledgements skipped since start because their connection was gone "
            "(the broker redelivers those messages)",
            registry=r,
        )
        self.oldest_unacked_seconds = Gauge(
            "iothub_oldest_unacked_seconds",
            "Age of the oldest message received but not yet acknowledged to the broker",
            registry=r,
        )
        self.mqtt_connected = Gauge(
            "iothub_mqtt_connected", "1 while connected to the MQTT broker, else 0", registry=r
        )
        self.db_disk_full = Gauge(
            "iothub_db_disk_full",
            "1 while the database refuses the writer's batches for lack of disk space "
            "(SQLSTATE 53100), else 0",
            registry=r,
        )
        self.retention_deleted = Counter(
            "iothub_retention_deleted_total",
            "Rows deleted by retention (rejected_retention, outbox_retention, "
            "attempts_retention), by table",
            ["table"],
            registry=r,
        )
        self.db_connected = Gauge(
            "iothub_db_connected", "1 while the database is reachable, else 0", registry=r
        )
        self.table_bytes = Gauge(
            "iothub_table_bytes",
            "Size on disk of each pruned side table with its indexes and TOAST "
            "(pg_total_relation_size), measured by the retention thread every few minutes",
            ["table"],
            registry=r,
        )
        # The same sizes for the stats line; replaced whole, so a reader never sees half.
        self.table_sizes: dict[str, int] = {}

        for reason in REJECTION_REASONS:
            self.rejected.labels(reason=reason)
        for table in RETENTION_TABLES:
            self.retention_deleted.labels(table=table)

    def record_table_sizes(self, sizes: dict[str, int]) -> None:
        for table, size in sizes.items():
            self.table_bytes.labels(table=table).set(size)
        self.table_sizes = dict(sizes)
