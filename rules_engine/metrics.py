"""The rule engine's Prometheus instruments: events, invalid and failing rules, the outbox."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

# Known label values get a series at 0 from the start, for `rate()` and alerts.
EVENT_KINDS = ("triggered", "resolved")


class RuleMetrics:
    """The rule engine's and the outbox's instruments, in the registry given (a fresh one of
    their own if none)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        r = self.registry

        # --- rules and actions
        self.events = Counter(
            "iothub_events_total", "Rule events written, by kind", ["kind"], registry=r
        )
        self.actions_delivered = Counter(
            "iothub_actions_delivered_total",
            "Rule action delivery attempts from the outbox, by action kind and outcome",
            ["kind", "outcome"],
            registry=r,
        )

        # --- outbox
        self.outbox_backlog = Gauge(
            "iothub_outbox_backlog", "Rule actions waiting in the outbox for delivery", registry=r
        )
        self.outbox_worker_stuck = Gauge(
            "iothub_outbox_worker_stuck",
            "1 while the outbox worker's current step has overrun its deadline by more than "
            "outbox_stuck_after, else 0",
            registry=r,
        )
        # --- rules (label values are set by the rule engine, which owns the reasons)
        self.rules_invalid = Gauge(
            "iothub_rules_invalid",
            "Active rules skipped by the last load of the rules because they are invalid, "
            "by reason (rules_engine/rule_json.py)",
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

        for kind in EVENT_KINDS:
            self.events.labels(kind=kind)
