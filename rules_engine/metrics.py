"""The rule engine's Prometheus instruments: rule events, invalid and failing rules, and the
delivery of their actions through the outbox. The service composes them with the ingestion's
into one registry (each part owns its instruments, the service only serves them)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final

from prometheus_client import CollectorRegistry, Counter, Gauge

from rules_engine.model import rule_json

# Label values known in advance get a series at 0 from the start, so that `rate()` and alerts
# see the first occurrence instead of a series appearing out of nowhere.
EVENT_KINDS: Final = ("triggered", "resolved")


class RuleMetrics:
    """The rule and outbox instruments, registered in the registry they are given."""

    def __init__(
        self, registry: CollectorRegistry | None = None, *, event_kinds: Iterable[str] = EVENT_KINDS
    ) -> None:
        # What scrapes and tests read the instruments from; a fresh one when used alone.
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        r = self.registry
        self.events = Counter(
            "iothub_events_total", "Rule events written, by kind", ["kind"], registry=r
        )
        self.actions_delivered = Counter(
            "iothub_actions_delivered_total",
            "Rule action delivery attempts from the outbox, by action kind and outcome",
            ["kind", "outcome"],
            registry=r,
        )
        self.outbox_backlog = Gauge(
            "iothub_outbox_backlog", "Rule actions waiting in the outbox for delivery", registry=r
        )
        self.outbox_worker_stuck = Gauge(
            "iothub_outbox_worker_stuck",
            "1 while the outbox worker's current step has overrun its deadline by more than "
            "outbox_stuck_after, else 0",
            registry=r,
        )
        self.rules_invalid = Gauge(
            "iothub_rules_invalid",
            "Active rules skipped by the last load of the rules because they are invalid, "
            "by reason (rules_engine/model/rule_json.py)",
            ["reason"],
            registry=r,
        )
        self.rule_failures = Counter(
            "iothub_rule_failures_total",
            "Rule evaluations that failed and cost that rule its effects for one batch or "
            "timer pass, by stage (evaluate, no_data, render)",
            ["stage"],
            registry=r,
        )
        for kind in event_kinds:
            self.events.labels(kind=kind)
        for reason in rule_json.REASONS:
            self.rules_invalid.labels(reason=reason).set(0)
