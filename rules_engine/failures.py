"""A rule that fails (a bug, or a value it cannot take) costs that rule its effects for one batch
or timer pass, never the telemetry or the other rules': counted, and logged once per rule
version and stage."""

from __future__ import annotations

from typing import Final

import structlog

from rules_engine.metrics import RuleMetrics
from rules_engine.rule_cache import RuleEntry

log = structlog.get_logger(__name__)

# Log event names by stage (stable: operations.md lists them).
EVENTS: Final = {
    "evaluate": "rule_evaluation_failed",
    "no_data": "rule_no_data_failed",
    "render": "rule_render_failed",
}


class RuleFailures:
    """Counts failed rule evaluations; logs each with its traceback once per rule version and
    stage (a rule that fails on every batch must not flood the log)."""

    def __init__(self, metrics: RuleMetrics) -> None:
        self._metrics = metrics
        self._logged: set[tuple[str, int, str]] = set()

    def report(self, stage: str, entry: RuleEntry, exc: Exception, **context: object) -> None:
        self._metrics.rule_failures.labels(stage=stage).inc()
        key = (stage, entry.rule.rule_id, entry.fingerprint)
        if key in self._logged:
            return
        self._logged.add(key)
        log.error(
            EVENTS[stage],
            rule_id=entry.rule.rule_id,
            error=f"{type(exc).__name__}: {exc}"[:300],
            exc_info=exc,
            **context,
        )
