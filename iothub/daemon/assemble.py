"""The daemon put together: one pool for ingestion, the rule engine as the batch hook, its
workers and rule cache, and the metrics they share.

`IngestService` alone stores telemetry (`iothub run --no-rules`); what the rule engine adds is
plugged in here, so the service knows nothing of rules.

With `workers` > 1 this process only receives (`iothub.daemon.fanout`); each worker process
builds its own pool and rule engine for the batches (`iothub.daemon.ingest_worker`). The rule
engine's background workers (outbox, no-data timer) and retention run once, here.
"""

from __future__ import annotations

from collections.abc import Callable

from config.settings import Settings
from ingestor.writer import connection_setup
from iothub.daemon.fanout import Fanout
from iothub.daemon.observe import ServiceMetrics
from iothub.daemon.service import IngestService, Stage
from iothub.daemon.systemd import SystemdNotifier
from rules_engine import background, engine
from schema import db


def build(
    settings: Settings, notifier: SystemdNotifier | None = None, *, rules_on: bool = True
) -> IngestService:
    """The service with the rule engine plugged in (its hook, workers and rule cache); with
    `rules_on` False, telemetry only."""
    fan_out = fanout(rules_on) if settings.workers > 1 else None
    if not rules_on:
        return IngestService(settings, notifier=notifier, stage=fan_out)
    metrics = ServiceMetrics()
    pool = db.make_pool(settings, "ingest", configure=connection_setup(settings))
    rules = engine.RuleEngine(settings, metrics.rules)
    service = IngestService(
        settings,
        # With worker processes the batches (and the hook) are theirs; this one's rule engine
        # serves the no-data timer and the outbox.
        hook=rules if fan_out is None else None,
        stage=fan_out,
        workers=background.workers(rules),
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


def fanout(rules_on: bool) -> Callable[[IngestService], Stage]:
    """The stage of a service with worker processes: the hand-off from its intake."""

    def make(service: IngestService) -> Stage:
        return Fanout(
            service.settings,
            intake=service.intake,
            router=service.router,
            observer=service.observer,
            metrics=service.metrics,
            stop=service.stop_event,
            rules_on=rules_on,
        )

    return make
