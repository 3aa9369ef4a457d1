"""The active, valid rules by device_metric, compiled once and kept in memory.

Reloaded when marked stale (the catalogue listener reports a change to rules, devices, metrics or
bindings): an edit takes effect on the next batch, without a restart. A rule whose condition
changed gets a new fingerprint, and so starts from a fresh state; unchanged rules keep theirs.
An invalid rule is logged with its id and problem, once per version, and skipped.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Any

import psycopg
import structlog

from rules_engine.evaluate.compile import CompiledRule, compile_stored
from rules_engine.metrics import RuleMetrics
from rules_engine.model import rule_json
from rules_engine.model.conditions import InvalidRule
from schema import sql

log = structlog.get_logger(__name__)
queries = sql.load("rules_engine")


@dataclass(frozen=True)
class RuleEntry:
    rule: CompiledRule
    device_metric_id: int
    fingerprint: str
    serial_id: str
    device_name: str
    metric: str


def fingerprint(condition: Any, data_type: str) -> str:
    text = json.dumps(condition, sort_keys=True, separators=(",", ":")) + "|" + data_type
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class RuleCache:
    """The active, valid rules by device_metric; reloaded when marked stale."""

    def __init__(self, metrics: RuleMetrics | None = None) -> None:
        self._metrics = metrics
        self._lock = threading.Lock()
        self._stale = True
        self._by_dm: dict[int, tuple[RuleEntry, ...]] = {}
        self._reported: set[tuple[int, str]] = set()
        self._still_invalid: set[tuple[int, str]] = set()  # filled by each load
        self.invalid: Counter[str] = Counter()  # active rules skipped by the last load, by reason
        self.generation = 0  # counts loads: what depends on the rule set can tell it changed

    def mark_stale(self) -> None:
        self._stale = True

    def current(self, conn: psycopg.Connection) -> dict[int, tuple[RuleEntry, ...]]:
        if self._stale:
            with self._lock:
                if self._stale:
                    # Cleared before loading: a change notified during the load marks it again.
                    self._stale = False
                    try:
                        self._by_dm = self._load(conn)
                        self.generation += 1
                    except BaseException:
                        self._stale = True  # a failed load must be tried again, not trusted
                        raise
        return self._by_dm

    def _load(self, conn: psycopg.Connection) -> dict[int, tuple[RuleEntry, ...]]:
        by_dm: dict[int, list[RuleEntry]] = defaultdict(list)
        invalid: Counter[str] = Counter()
        self._still_invalid = set()
        for (
            rule_id,
            name,
            condition_text,
            action_text,
            dm_id,
            data_type,
            serial,
            dev_name,
            metric,
        ) in conn.execute(queries["load_rules"]):
            try:
                compiled, condition = compile_stored(
                    rule_id, name, condition_text, action_text, data_type
                )
                fp = fingerprint(condition, data_type)
            except InvalidRule as exc:
                # Whatever a stored rule holds, it costs that rule only, never the batch.
                reason, problem = exc.reason, str(exc)
            except Exception as exc:  # a bug; still this rule's problem only
                reason, problem = rule_json.CRASHED, repr(exc)[:300]
            else:
                by_dm[dm_id].append(RuleEntry(compiled, dm_id, fp, serial, dev_name, metric))
                continue
            invalid[reason] += 1
            version_of = f"{condition_text}|{action_text}|{data_type}"
            self._report(rule_id, name, version_of, reason=reason, problem=problem)
        self.invalid = invalid
        # Remembered only while the rule stays invalid in that version: edits do not pile up.
        self._reported &= self._still_invalid
        if self._metrics is not None:
            for reason in rule_json.REASONS:
                self._metrics.rules_invalid.labels(reason=reason).set(invalid[reason])
        log.info(
            "rules_loaded",
            rules=sum(len(v) for v in by_dm.values()),
            invalid=sum(invalid.values()),
            device_metrics=len(by_dm),
        )
        return {dm: tuple(entries) for dm, entries in by_dm.items()}

    def _report(
        self,
        rule_id: int,
        name: str,
        version_of: str,
        *,
        reason: str,
        problem: str,
    ) -> None:
        """Log an invalid rule once per version of it (each reload would repeat it)."""
        version = hashlib.sha256(version_of.encode()).hexdigest()[:16]
        self._still_invalid.add((rule_id, version))
        if (rule_id, version) in self._reported:
            return
        self._reported.add((rule_id, version))
        log.error("rule_invalid", rule_id=rule_id, rule_name=name, reason=reason, problem=problem)
