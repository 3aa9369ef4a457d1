"""Where rules run: inside the ingestion transaction, on the rows it actually inserted.

For each device_metric with active rules: take its advisory lock (ascending order, so two
service instances never deadlock), load the rule states, feed the new readings in device-time
order through the state machines (`evaluator.step`), write an event per transition and, for a
triggered event, a row per action into the outbox; save the states. All of it commits with the
telemetry, so a crash either keeps readings, state and events together or loses none of them to
a redelivery.

Rules are cached in memory and reloaded when the catalogue listener reports a change to rules,
devices, metrics or bindings: an edit takes effect on the next batch, without a restart. A rule
whose condition changed starts from a fresh state (its fingerprint differs); unchanged rules keep
theirs. An invalid rule is logged with its id and problem, once per version, and skipped.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import psycopg
import structlog
from psycopg.types.json import Jsonb
from psycopg_pool import ConnectionPool

from config.settings import Settings
from ingestor.catalog import Snapshot
from ingestor.hooks import HookResult, StoredReading
from iothub import db
from iothub.metrics import Metrics
from rules_engine import actions_model, evaluator, templates
from rules_engine.conditions import InvalidRule
from rules_engine.no_data import NoDataWorker
from rules_engine.outbox import OutboxWorker
from schema import queries as queries_mod

log = structlog.get_logger(__name__)
queries = queries_mod.load("rules_engine")

LOCK_CLASS = 0x1074  # first key of pg_advisory_xact_lock(int, int): "iothub rule state"
RELOAD_TABLES = frozenset({"*", "rules", "devices", "metrics", "device_metrics"})


@dataclass(frozen=True)
class RuleEntry:
    rule: evaluator.CompiledRule
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

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._stale = True
        self._by_dm: dict[int, tuple[RuleEntry, ...]] = {}
        self._reported: set[tuple[int, str]] = set()

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
                    except BaseException:
                        self._stale = True  # a failed load must be tried again, not trusted
                        raise
        return self._by_dm

    def _load(self, conn: psycopg.Connection) -> dict[int, tuple[RuleEntry, ...]]:
        by_dm: dict[int, list[RuleEntry]] = defaultdict(list)
        invalid = 0
        for (
            rule_id,
            name,
            condition,
            action,
            dm_id,
            data_type,
            serial,
            dev_name,
            metric,
        ) in conn.execute(queries["load_rules"]):
            try:
                fp = fingerprint(condition, data_type)
            except (ValueError, RecursionError):
                fp = f"unprintable-{rule_id}"
            try:
                compiled = evaluator.compile_rule(rule_id, name, condition, action, data_type)
            except (InvalidRule, ValueError, TypeError, OverflowError, RecursionError) as exc:
                # Whatever a stored rule holds, it costs that rule only, never the batch.
                invalid += 1
                if (rule_id, fp) not in self._reported:
                    self._reported.add((rule_id, fp))
                    log.error("rule_invalid", rule_id=rule_id, rule_name=name, problem=str(exc))
                continue
            by_dm[dm_id].append(RuleEntry(compiled, dm_id, fp, serial, dev_name, metric))
        log.info(
            "rules_loaded",
            rules=sum(len(v) for v in by_dm.values()),
            invalid=invalid,
            device_metrics=len(by_dm),
        )
        return {dm: tuple(entries) for dm, entries in by_dm.items()}


def render_context(entry: RuleEntry, value: object, ts: datetime) -> dict[str, object]:
    return {
        "device_name": entry.device_name,
        "serial_id": entry.serial_id,
        "metric": entry.metric,
        "value": value,
        "ts": ts.isoformat(),
        "rule_name": entry.rule.name,
    }


def outbox_rows(
    entry: RuleEntry,
    event_id: int,
    kind: str,
    transition: evaluator.Transition,
    message: str,
    *,
    smtp_to: str | None = None,
) -> list[tuple[str, dict[str, Any]]]:
    """What to deliver for an event: (kind, rendered target) per action. Only triggered events
    carry actions: the original action forms describe an alarm, not its end."""
    if kind != "triggered":
        return []
    action = entry.rule.action
    ctx = render_context(entry, transition.value, transition.ts)
    if isinstance(action, actions_model.NotifyAction):
        target: dict[str, Any] = {
            "channel": action.channel,
            "message": message,
            "subject": f"{entry.rule.name}: {kind}",
        }
        if action.channel == "email" and smtp_to:
            # The original action form names no address: email goes to the configured one.
            target["to"] = smtp_to
        return [("notify", target)]
    if isinstance(action, actions_model.MqttAction):
        return [
            (
                "mqtt",
                {
                    "topic": templates.render(action.topic, ctx),
                    "payload": templates.render_json(action.payload, ctx),
                    "qos": action.qos,
                    "retain": action.retain,
                },
            )
        ]
    rows: list[tuple[str, dict[str, Any]]] = []
    notification = (
        templates.render_json(action.notification.model_dump(exclude_none=True), ctx)
        if action.notification is not None
        else None
    )
    if action.webhook is not None and action.webhook.enabled:
        rows.append(
            (
                "webhook",
                {
                    "url": action.webhook.url,
                    "headers": action.webhook.headers,
                    "body": {
                        "event_id": event_id,
                        "kind": kind,
                        "rule_id": entry.rule.rule_id,
                        "rule_name": entry.rule.name,
                        "serial_id": entry.serial_id,
                        "device_name": entry.device_name,
                        "metric": entry.metric,
                        "value": transition.value,
                        "ts": transition.ts.isoformat(),
                        "message": message,
                        "notification": notification,
                    },
                },
            )
        )
    elif action.notification is not None:
        # A disabled (or absent) webhook still leaves its notification to be told.
        rows.append(
            (
                "notify",
                {
                    "channel": action.notification.channel or "log",
                    "message": message,
                    "subject": f"{entry.rule.name}: {kind}",
                },
            )
        )
    return rows


class RuleEngine:
    """The batch hook of the ingestion transaction, plus the rule engine's workers."""

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.tz = settings.tz
        self.cache = RuleCache()
        # Seconds the ingestion is behind (the service sets it): the no-data timer must not take
        # readings still waiting in the queue for a silence.
        self.backlog_age: Callable[[], float] = lambda: 0.0

    def on_catalog_change(self, snapshot: Snapshot, tables: frozenset[str]) -> None:
        if tables & RELOAD_TABLES:
            self.cache.mark_stale()

    def workers(self, pool: ConnectionPool) -> list[Any]:
        actions_pool = db.make_pool(self.settings, "actions", size=3)
        return [
            PoolKeeper(actions_pool),
            NoDataWorker(self, actions_pool),
            OutboxWorker(self.settings, actions_pool, self.metrics),
        ]

    # --- the hook

    def on_inserted(self, conn: psycopg.Connection, rows: Sequence[StoredReading]) -> HookResult:
        rules = self.cache.current(conn)
        relevant = sorted({r.device_metric_id for r in rows} & rules.keys())
        if not relevant:
            return HookResult()
        by_dm: dict[int, list[StoredReading]] = defaultdict(list)
        for r in rows:
            if r.device_metric_id in rules:
                by_dm[r.device_metric_id].append(r)
        self.lock(conn, relevant)
        rules = self.live_only(conn, rules, relevant)
        states = self.load_states(conn, relevant)
        late_keys: set[tuple[int, datetime]] = set()
        transitions: list[tuple[RuleEntry, evaluator.Transition]] = []
        changed: list[tuple[RuleEntry, evaluator.RuleState]] = []
        # Evaluation is pure Python; the database sees one statement per event and one batched
        # upsert for all states, not a round trip per rule and device_metric.
        for dm in relevant:
            # Converted once per device_metric, shared by its rules.
            readings = [
                evaluator.Reading(r.ts, r.value) for r in sorted(by_dm[dm], key=lambda r: r.ts)
            ]
            for entry in rules[dm]:
                try:
                    outcome = self._evaluate(entry, states, readings, late_keys)
                except Exception as exc:
                    # A rule that fails (a bug, or a value it cannot take) loses its own effects
                    # for this batch, never the telemetry or the other rules'.
                    log.exception(
                        "rule_evaluation_failed",
                        rule_id=entry.rule.rule_id,
                        device_metric_id=dm,
                        error=f"{type(exc).__name__}: {exc}",
                    )
                    continue
                state, fired = outcome
                transitions.extend((entry, t) for t in fired)
                if state is not None:
                    changed.append((entry, state))
        self.write_events(conn, transitions)
        events: Counter[str] = Counter(t.kind for _entry, t in transitions)
        self.save_states(conn, changed)
        return HookResult(events=dict(events), late=len(late_keys))

    def _evaluate(
        self,
        entry: RuleEntry,
        states: dict[tuple[int, int], tuple[str, Any]],
        readings: Sequence[evaluator.Reading],
        late_keys: set[tuple[int, datetime]],
    ) -> tuple[evaluator.RuleState | None, list[evaluator.Transition]]:
        """Feed the readings to one rule; returns its new state (None: unchanged) and the
        transitions to write as events."""
        fired: list[evaluator.Transition] = []
        state = self.state_for(entry, states)
        before: evaluator.RuleState | None = state
        stored = states.get((entry.rule.rule_id, entry.device_metric_id))
        if stored is not None and stored[0] != entry.fingerprint and readings:
            before = None  # the new fingerprint must be saved even if nothing else changes
            if isinstance(stored[1], dict) and stored[1].get("status") == "firing":
                # An edited rule starts afresh; an alarm it had open is closed, not left hanging.
                first = readings[0]
                fired.append(
                    evaluator.Transition(
                        "resolved", first.ts, first.value, "rule changed; its state starts afresh"
                    )
                )
        # validated: the ingestor checked each value against its metric's data_type.
        state, transitions, late = evaluator.step_many(
            entry.rule, state, readings, self.tz, validated=True
        )
        fired.extend(transitions)
        late_keys.update((entry.device_metric_id, r.ts) for r in late)
        return (state if state != before else None), fired

    # --- pieces the no-data worker shares

    def live_only(
        self,
        conn: psycopg.Connection,
        rules: dict[int, tuple[RuleEntry, ...]],
        device_metric_ids: Sequence[int],
    ) -> dict[int, tuple[RuleEntry, ...]]:
        """The cached rules of these device_metrics minus any deleted or deactivated since the
        cache was loaded (the notification that reloads it may still be on its way)."""
        ids = [e.rule.rule_id for dm in device_metric_ids for e in rules[dm]]
        live = {row[0] for row in conn.execute(queries["live_rules"], {"ids": ids})}
        if len(live) == len(ids):
            return rules
        self.cache.mark_stale()
        return {
            dm: tuple(e for e in rules[dm] if e.rule.rule_id in live) for dm in device_metric_ids
        }

    @staticmethod
    def lock(conn: psycopg.Connection, device_metric_ids: Sequence[int]) -> None:
        conn.execute(
            queries["lock_device_metrics"],
            {"lock_class": LOCK_CLASS, "ids": list(device_metric_ids)},
        )

    @staticmethod
    def load_states(
        conn: psycopg.Connection, device_metric_ids: Sequence[int]
    ) -> dict[tuple[int, int], tuple[str, Any]]:
        return {
            (rule_id, dm): (fp, state)
            for rule_id, dm, fp, state in conn.execute(
                queries["load_states"], {"ids": list(device_metric_ids)}
            )
        }

    @staticmethod
    def state_for(
        entry: RuleEntry, states: dict[tuple[int, int], tuple[str, Any]]
    ) -> evaluator.RuleState:
        stored = states.get((entry.rule.rule_id, entry.device_metric_id))
        if stored is None or stored[0] != entry.fingerprint:
            return evaluator.RuleState.initial()
        try:
            return evaluator.RuleState.from_json(stored[1])
        except ValueError as exc:
            log.warning(
                "rule_state_reset",
                rule_id=entry.rule.rule_id,
                device_metric_id=entry.device_metric_id,
                why=str(exc),
            )
            return evaluator.RuleState.initial()

    @staticmethod
    def save_states(
        conn: psycopg.Connection, changed: Sequence[tuple[RuleEntry, evaluator.RuleState]]
    ) -> None:
        """One COPY and one upsert for all states of a batch (every state changes each batch:
        it holds last_ts, so this is thousands of rows with rules on every device_metric)."""
        if not changed:
            return
        with conn.cursor() as cur:
            cur.execute(queries["create_states_staging"])
            with cur.copy(queries["copy_states"]) as copy:
                for entry, state in changed:
                    copy.write_row(
                        (
                            entry.rule.rule_id,
                            entry.device_metric_id,
                            entry.fingerprint,
                            state.status,
                            json.dumps(state.to_json(), separators=(",", ":")),
                            state.last_ts,
                        )
                    )
            cur.execute(queries["upsert_states"])
            # Emptied at commit anyway; the no-data pass may save again in this transaction.
            cur.execute(queries["truncate_states_staging"])

    @classmethod
    def save_state(
        cls, conn: psycopg.Connection, entry: RuleEntry, state: evaluator.RuleState
    ) -> None:
        cls.save_states(conn, [(entry, state)])

    def write_event(
        self, conn: psycopg.Connection, entry: RuleEntry, transition: evaluator.Transition
    ) -> None:
        self.write_events(conn, [(entry, transition)])

    def write_events(
        self,
        conn: psycopg.Connection,
        transitions: Sequence[tuple[RuleEntry, evaluator.Transition]],
    ) -> None:
        """Insert the events and their outbox rows: two pipelined statements in all, however
        many events (a storm of transitions must not cost a round trip each)."""
        if not transitions:
            return
        messages = []
        event_params = []
        for entry, transition in transitions:
            template = actions_model.message_template(entry.rule.action)
            message = templates.render(
                template, render_context(entry, transition.value, transition.ts)
            )
            messages.append(message)
            context = {
                "value": transition.value,
                "ts": transition.ts.isoformat(),
                "message": message,
                "reason": transition.reason,
                "serial_id": entry.serial_id,
                "metric": entry.metric,
            }
            event_params.append(
                {
                    "ts": transition.ts,
                    "rule_id": entry.rule.rule_id,
                    "kind": transition.kind,
                    "device_metric_id": entry.device_metric_id,
                    "context": Jsonb(context),
                }
            )
        with conn.cursor() as cur:
            cur.executemany(queries["insert_event"], event_params, returning=True)
            event_ids = []
            while True:
                row = cur.fetchone()
                assert row is not None
                event_ids.append(int(row[0]))
                if not cur.nextset():
                    break
            outbox_params = [
                {
                    "event_id": event_id,
                    "rule_id": entry.rule.rule_id,
                    "kind": kind,
                    "target": Jsonb(target),
                }
                for event_id, (entry, transition), message in zip(
                    event_ids, transitions, messages, strict=True
                )
                for kind, target in outbox_rows(
                    entry,
                    event_id,
                    transition.kind,
                    transition,
                    message,
                    smtp_to=self.settings.smtp_to,
                )
            ]
            if outbox_params:
                cur.executemany(queries["insert_outbox"], outbox_params)
        for entry, transition in transitions:
            log.info(
                "rule_" + transition.kind,
                rule_id=entry.rule.rule_id,
                rule_name=entry.rule.name,
                serial_id=entry.serial_id,
                metric=entry.metric,
                value=transition.value,
                ts=transition.ts.isoformat(),
                reason=transition.reason,
            )


class PoolKeeper:
    """Opens the rule engine's own pool first and closes it last (workers share it)."""

    name = "iothub-actions-pool"

    def __init__(self, pool: ConnectionPool) -> None:
        self.pool = pool

    def start(self) -> None:
        self.pool.open(wait=False)

    def stop(self, timeout: float) -> None:
        # Workers stop in reverse order of the list, so this runs after every user of the pool.
        self.pool.close(timeout=timeout)

    @property
    def alive(self) -> bool:
        return True


def utcnow() -> datetime:
    return datetime.now(UTC)
