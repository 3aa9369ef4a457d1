"""The daemon put together: one pool for ingestion, the rule engine as the batch hook, its
workers and rule cache, and the metrics they share.

`IngestService` alone stores telemetry (`iothub run --no-rules`); what the rule engine adds is
plugged in here, so the service knows nothing of rules.
"""

from __future__ import annotations

from config.settings import Settings
from ingestor.writer import connection_setup
from iothub.daemon.observe import ServiceMetrics
from iothub.daemon.service import IngestService
from iothub.daemon.systemd import SystemdNotifier
from rules_engine import engine
from schema import db


def build(
    settings: Settings, notifier: SystemdNotifier | None = None, *, rules_on: bool = True
) -> IngestService:
    """The service with the rule engine plugged in (its hook, workers and rule cache); with
    `rules_on` False, telemetry only."""
    if not rules_on:
        return IngestService(settings, notifier=notifier)
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
    # The no-data timer judges silence against how far the ingestion is behind, and only
    # from when the intake has been connected.
    rules.backlog_age = service.oldest_unacked_age
    rules.intake_since = service.intake.connected_since
    return service
