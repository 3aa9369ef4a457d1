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
from bisect import bisect_right
from collections import Counter, defaultdict
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from operator import attrgetter
from typing import Any

import psycopg
import structlog
from psycopg.types.json import Jsonb
from psycopg_pool import ConnectionPool

from config.settings import Settings
from ingestor.catalog import Snapshot
from ingestor.hooks import HookResult, StoredReading
from rules_engine.actions.outbox import OutboxWorker
from rules_engine.evaluate import step as evaluator
from rules_engine.metrics import RuleMetrics
from rules_engine.model import actions as actions_model
from rules_engine.model import rule_json, templates
from rules_engine.model.conditions import InvalidRule
from rules_engine.no_data import NoDataWorker
from rules_engine.workers import EngineThread
from schema import db, locks
from schema import sql as queries_mod

log = structlog.get_logger(__name__)
queries = queries_mod.load("rules_engine")

RELOAD_TABLES = frozenset({"*", "rules", "devices", "metrics", "device_metrics"})
PRELOAD_TIMEOUT = 30.0  # seconds to get a connection for loading the rules at start
CATALOG_POLL = 0.1  # seconds between checks for a stop while the preloader awaits the catalogue
NO_INTAKE = datetime.min.replace(tzinfo=UTC)  # intake_since() of an engine run without one


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

    def __init__(self, metrics: RuleMetrics | None = None) -> None:
        self._metrics = metrics
        if metrics is not None:
            for reason in rule_json.REASONS:
                metrics.rules_invalid.labels(reason=reason).set(0)
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
                compiled, condition = rule_json.compile_stored(
                    rule_id, name, condition_text, action_text, data_type
                )
                fp = fingerprint(condition, data_type)
            except InvalidRule as exc:
                # Whatever a stored rule holds, it costs that rule only, never the batch.
                invalid[exc.reason] += 1
                self._report(
                    rule_id,
                    name,
                    f"{condition_text}|{action_text}|{data_type}",
                    reason=exc.reason,
                    problem=str(exc),
                )
                continue
            except Exception as exc:  # a bug; still this rule's problem only
                invalid[rule_json.CRASHED] += 1
                self._report(
                    rule_id,
                    name,
                    f"{condition_text}|{action_text}|{data_type}",
                    reason=rule_json.CRASHED,
                    problem=repr(exc)[:300],
                )
                continue
            by_dm[dm_id].append(RuleEntry(compiled, dm_id, fp, serial, dev_name, metric))
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


_TS = attrgetter("ts")
# Log event names of rule_failed() by stage (stable: operations.md lists them).
_FAILURE_EVENTS = {
    "evaluate": "rule_evaluation_failed",
    "no_data": "rule_no_data_failed",
    "render": "rule_render_failed",
}


_INITIAL = evaluator.RuleState.initial()


def _own_part(state: evaluator.RuleState) -> evaluator.RuleState:
    """A rule's state without the newest reading, which its device_metric's cursor holds."""
    if state.last_ts is None and state.last_value is None:
        return state
    return evaluator.RuleState(
        state.status, state.pending_since, None, None, state.last_triggered, state.nodes
    )


def _parse_state(rule_id: int, dm: int, text: str | None) -> evaluator.RuleState | None:
    try:
        raw = rule_json.parse(text)
        if raw is not None and not isinstance(raw, dict):
            raise ValueError(f"a rule state must be a JSON object, got {type(raw).__name__}")
        return _own_part(evaluator.RuleState.from_json(raw))
    except (ValueError, TypeError) as exc:  # RuleJsonError is a ValueError
        log.warning("rule_state_reset", rule_id=rule_id, device_metric_id=dm, why=str(exc))
        return None


def _parse_value(dm: int, text: str | None) -> evaluator.Value | None:
    """A cursor's last value; None (no previous value: `delta` waits for the next reading)
    when it is not a scalar within bounds."""
    try:
        value = rule_json.parse(text)
    except rule_json.RuleJsonError as exc:
        why = str(exc)
    else:
        if value is None or isinstance(value, bool | int | float | str):
            return value
        why = f"not a single value: {type(value).__name__}"
    log.warning("rule_cursor_value_reset", device_metric_id=dm, why=why)
    return None


@dataclass
class DmStates:
    """What the rules of one device_metric remember: the newest evaluated reading (its
    rule_cursors row, as of `version`) and each rule's own state (rule_states rows), by rule id,
    with the fingerprint it was made under. A rule without an entry is in the initial state."""

    version: int | None = None  # None: no cursor row, nothing evaluated yet
    last_ts: datetime | None = None
    last_value: evaluator.Value | None = None
    rules: dict[int, tuple[str, evaluator.RuleState]] = field(default_factory=dict)
    # When the service last received a reading of it, on its own clock: silence is judged on
    # this, never on device time (a device clock running behind would look silent early).
    last_received: datetime | None = None

    def state_for(self, entry: RuleEntry) -> evaluator.RuleState:
        stored = self.rules.get(entry.rule.rule_id)
        own = stored[1] if stored is not None and stored[0] == entry.fingerprint else _INITIAL
        # Built directly, not with dataclasses.replace: this runs per rule on every batch.
        return evaluator.RuleState(
            own.status,
            own.pending_since,
            self.last_ts,
            self.last_value,
            own.last_triggered,
            own.nodes,
        )

    def advanced(self, newest: evaluator.Observation, received: datetime) -> DmStates:
        """A copy moved to a newer reading, for the rules to update (this one stays as it was,
        in case the batch's writes fail)."""
        return DmStates(self.version, newest.ts, newest.value, dict(self.rules), received)

    def heard(self, received: datetime) -> DmStates:
        """A copy that only records a receipt (every reading of the batch was late)."""
        return DmStates(self.version, self.last_ts, self.last_value, dict(self.rules), received)


class StateCache:
    """Rule states kept in memory between batches, so that a batch reads them from the database
    only when someone else may have changed them: another instance, the no-data timer, an
    operator. Each of those writes bumps the device_metric's cursor version (see migration
    0004); a version other than the one this process wrote last means "read again".

    Used by the writer thread only (the batch hook); the no-data timer reads the database."""

    def __init__(self) -> None:
        self._by_dm: dict[int, DmStates] = {}

    def get(self, dm: int) -> DmStates:
        return self._by_dm[dm]

    def refresh(self, conn: psycopg.Connection, device_metric_ids: Sequence[int]) -> None:
        """Under the device_metrics' advisory locks: make the kept states current."""
        versions: dict[int, int] = dict(
            conn.execute(queries["cursor_versions"], {"ids": list(device_metric_ids)}).fetchall()
        )
        stale = []
        for dm in device_metric_ids:
            known = self._by_dm.get(dm)
            if known is None or known.version is None or known.version != versions.get(dm):
                stale.append(dm)
        if stale:
            self._by_dm.update(RuleEngine.load_states(conn, stale))

    def clear(self) -> None:
        self._by_dm.clear()

    def update(self, after: dict[int, DmStates], version: int | None) -> None:
        for dm, known in after.items():
            known.version = version
            self._by_dm[dm] = known

    def prune(self, keep: Collection[int]) -> None:
        """Forget device_metrics that have no rules any more."""
        for dm in [dm for dm in self._by_dm if dm not in keep]:
            del self._by_dm[dm]


def not_ahead(
    rows: Sequence[StoredReading], now: datetime
) -> tuple[Sequence[evaluator.Observation], int]:
    """The readings to evaluate, none later than the service's clock, and how many were folded.

    A reading up to `future_tolerance` ahead is stored, but evaluated as of `now`: were it
    evaluated at its own time, the cursor would move past the clock and every on-time reading
    after it would count as late. Several ahead in one batch are one moment, so only the newest
    of them is evaluated; the others are counted late. `rows` are sorted by time."""
    if rows[-1].ts <= now:
        return rows, 0
    ahead = bisect_right(rows, now, key=_TS)
    newest = rows[-1]
    return [*rows[:ahead], evaluator.Reading(now, newest.value)], len(rows) - ahead - 1


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
                    **actions_model.mqtt_topic(action.topic, ctx),
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

    def __init__(self, settings: Settings, metrics: RuleMetrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.tz = settings.tz
        self.cache = RuleCache(metrics)
        self.states = StateCache()
        self._states_generation = -1
        self._failures_logged: set[tuple[str, int, str]] = set()
        self.catalog_seen = threading.Event()  # the catalogue listener has loaded once
        # Seconds the ingestion is behind (the service sets it): beyond no_data_max_backlog the
        # no-data timer gives no verdict, since readings still waiting are not a silence.
        self.backlog_age: Callable[[], float] = lambda: 0.0
        # Since when the intake has been connected to the broker (None: it is not), set by the
        # service; silence is not judged from before it. Without an intake: no such bound.
        self.intake_since: Callable[[], datetime | None] = lambda: NO_INTAKE
        self.clock: Callable[[], datetime] = utcnow  # the service's clock (receipt times)

    def rule_failed(self, stage: str, entry: RuleEntry, exc: Exception, **context: object) -> None:
        """Count a rule's failed evaluation; log it with its traceback once per rule version
        and stage (a rule that fails on every batch must not flood the log)."""
        self.metrics.rule_failures.labels(stage=stage).inc()
        key = (stage, entry.rule.rule_id, entry.fingerprint)
        if key in self._failures_logged:
            return
        self._failures_logged.add(key)
        log.error(
            _FAILURE_EVENTS[stage],
            rule_id=entry.rule.rule_id,
            error=f"{type(exc).__name__}: {exc}"[:300],
            exc_info=exc,
            **context,
        )

    def on_catalog_change(self, snapshot: Snapshot, tables: frozenset[str]) -> None:
        if tables & RELOAD_TABLES:
            self.cache.mark_stale()
        self.catalog_seen.set()

    def workers(self, pool: ConnectionPool) -> list[Any]:
        actions_pool = db.make_pool(self.settings, "actions", size=3)
        return [
            PoolKeeper(actions_pool),
            RulePreloader(self, actions_pool),
            NoDataWorker(self, actions_pool),
            OutboxWorker(self.settings, actions_pool, self.metrics),
        ]

    # --- the hook

    def on_inserted(self, conn: psycopg.Connection, rows: Sequence[StoredReading]) -> HookResult:
        rules = self.cache.current(conn)
        if self.cache.generation != self._states_generation:
            self.states.prune(rules.keys())
            self._states_generation = self.cache.generation
        by_dm: dict[int, list[StoredReading]] = defaultdict(list)
        for r in rows:
            if r.device_metric_id in rules:
                by_dm[r.device_metric_id].append(r)
        if not by_dm:
            return HookResult()
        relevant = sorted(by_dm)
        self.lock(conn, relevant)
        self.states.refresh(conn, relevant)
        late = 0
        # One clock reading per batch: when these readings were received, and the bound no
        # reading's time may pass when it is evaluated (see not_ahead).
        now = self.clock()
        transitions: list[tuple[RuleEntry, evaluator.Transition]] = []
        changed: list[tuple[RuleEntry, evaluator.RuleState]] = []
        after: dict[int, DmStates] = {}
        # Evaluation is pure Python; the database sees one statement per kind of write for the
        # whole batch, and rule_states rows only where a state machine moved.
        for dm in relevant:
            dm_rows = by_dm[dm]
            dm_rows.sort(key=_TS)  # the writer sorts already: then this costs one pass
            known = self.states.get(dm)
            cut = 0 if known.last_ts is None else bisect_right(dm_rows, known.last_ts, key=_TS)
            late += cut  # not newer than the last evaluated reading: stored, state unmoved
            if cut == len(dm_rows):
                after[dm] = known.heard(now)  # late readings still show the device talking
                continue
            in_time, folded = not_ahead(dm_rows[cut:], now)
            late += folded
            fresh = evaluator.Series(in_time, dm_rows[0].data_type)
            moved = known.advanced(fresh[-1], now)
            for entry in rules[dm]:
                try:
                    outcome = self._evaluate(entry, known, fresh)
                except Exception as exc:
                    # A rule that fails (a bug, or a value it cannot take) loses its own effects
                    # for this batch, never the telemetry or the other rules'.
                    self.rule_failed("evaluate", entry, exc, device_metric_id=dm)
                    continue
                state, fired = outcome
                transitions.extend((entry, t) for t in fired)
                if state is not None:
                    changed.append((entry, state))
                    moved.rules[entry.rule.rule_id] = (entry.fingerprint, state)
            after[dm] = moved
        transitions, changed = self.live_only(conn, transitions, changed, after)
        self.write_events(conn, transitions)
        # States before cursors: a write to rule_states bumps its cursors' versions (trigger),
        # and the cursor write below must be the last word on them in this transaction.
        self.save_states(conn, changed)
        version = self.save_cursors(conn, after)
        # Kept for the next batch; if this transaction does not commit, the database still
        # holds the old versions, and the next batch reads these device_metrics again.
        self.states.update(after, version)
        events: Counter[str] = Counter(t.kind for _entry, t in transitions)
        return HookResult(events=dict(events), late=late)

    def on_failed(self) -> None:
        """The batch transaction did not commit, or may not have: forget the states kept in
        memory. Versions alone do not cover it: after a crash or a failover the database may
        hand out again a version this process wrote in a transaction that was lost."""
        self.states.clear()

    def _evaluate(
        self, entry: RuleEntry, known: DmStates, readings: evaluator.Series
    ) -> tuple[evaluator.RuleState | None, list[evaluator.Transition]]:
        """Feed the new readings to one rule; returns its new state to store (None: unchanged)
        and the transitions to write as events."""
        fired: list[evaluator.Transition] = []
        stored = known.rules.get(entry.rule.rule_id)
        state = known.state_for(entry)
        same_rule = stored is None or stored[0] == entry.fingerprint
        if same_rule and evaluator.settles(entry.rule, state, readings):
            return None, fired  # the common case: nothing to evaluate reading by reading
        if stored is not None and stored[0] != entry.fingerprint and stored[1].status == "firing":
            # An edited rule starts afresh; an alarm it had open is closed, not left hanging.
            first = readings[0]
            fired.append(
                evaluator.Transition(
                    "resolved", first.ts, first.value, "rule changed; its state starts afresh"
                )
            )
        # validated: the ingestor checked each value against its metric's data_type.
        # Silence is the no-data timer's to judge, on the service's clock (see no_data.py).
        after, transitions, _late = evaluator.step_many(
            entry.rule, state, readings, self.tz, validated=True, device_time_silence=False
        )
        fired.extend(transitions)
        own = _own_part(after)
        if stored is None:
            unchanged = own == _INITIAL
        else:
            unchanged = stored[0] == entry.fingerprint and stored[1] == own
        return (None if unchanged else own), fired

    # --- reads and writes of the batch (lock, load_states, save_state and write_event are
    # shared with the no-data worker)

    def live_only(
        self,
        conn: psycopg.Connection,
        transitions: list[tuple[RuleEntry, evaluator.Transition]],
        changed: list[tuple[RuleEntry, evaluator.RuleState]],
        after: dict[int, DmStates],
    ) -> tuple[
        list[tuple[RuleEntry, evaluator.Transition]], list[tuple[RuleEntry, evaluator.RuleState]]
    ]:
        """Drop what would be written for rules deleted or deactivated since the cache was
        loaded (the notification that reloads it may still be on its way), and lock the others
        against deletion until commit, so that their foreign keys cannot fail the batch."""
        ids = sorted(
            {e.rule.rule_id for e, _t in transitions} | {e.rule.rule_id for e, _ in changed}
        )
        if not ids:
            return transitions, changed
        live = {row[0] for row in conn.execute(queries["live_rules"], {"ids": ids})}
        if len(live) == len(ids):
            return transitions, changed
        self.cache.mark_stale()
        for entry, _state in changed:
            rule_id, dm = entry.rule.rule_id, entry.device_metric_id
            if rule_id not in live:
                # Its state is not written: remember what the database still holds (a rule
                # deactivated now may be activated again, and finds its state as it left it).
                before = self.states.get(dm).rules.get(rule_id)
                if before is None:
                    after[dm].rules.pop(rule_id, None)
                else:
                    after[dm].rules[rule_id] = before
        return (
            [(e, t) for e, t in transitions if e.rule.rule_id in live],
            [(e, s) for e, s in changed if e.rule.rule_id in live],
        )

    @staticmethod
    def lock(conn: psycopg.Connection, device_metric_ids: Sequence[int]) -> None:
        conn.execute(
            queries["lock_device_metrics"],
            {"lock_class": locks.RULE_STATE_CLASS, "ids": list(device_metric_ids)},
        )

    @staticmethod
    def load_states(
        conn: psycopg.Connection, device_metric_ids: Sequence[int]
    ) -> dict[int, DmStates]:
        """What the rules of these device_metrics remember, read from the database."""
        ids = list(device_metric_ids)
        found = {dm: DmStates() for dm in ids}
        cursors = conn.execute(queries["load_cursors"], {"ids": ids})
        for dm, version, last_ts, value_text, last_received in cursors:
            last_value = _parse_value(dm, value_text)
            found[dm] = DmStates(version, last_ts, last_value, last_received=last_received)
        for rule_id, dm, fp, raw in conn.execute(queries["load_states"], {"ids": ids}):
            state = _parse_state(rule_id, dm, raw)
            if state is not None:
                found[dm].rules[rule_id] = (fp, state)
        return found

    @staticmethod
    def save_cursors(conn: psycopg.Connection, after: dict[int, DmStates]) -> int | None:
        """Move the cursors of these device_metrics to their newest evaluated readings, all
        with one new version; returns it (None: nothing to write)."""
        if not after:
            return None
        row = conn.execute(queries["next_cursor_version"]).fetchone()
        assert row is not None
        version = int(row[0])
        ids, stamps, values, received = [], [], [], []
        for dm, known in after.items():
            ids.append(dm)
            stamps.append(known.last_ts)
            values.append(json.dumps(known.last_value))
            received.append(known.last_received)
        conn.execute(
            queries["save_cursors"],
            {"version": version, "ids": ids, "ts": stamps, "values": values, "received": received},
        )
        return version

    @staticmethod
    def save_states(
        conn: psycopg.Connection, changed: Sequence[tuple[RuleEntry, evaluator.RuleState]]
    ) -> None:
        """One COPY and one upsert for the states that moved in a batch (all of them, when
        every rule holds a rate window or a pending run)."""
        if not changed:
            return
        with conn.cursor() as cur:
            cur.execute(queries["create_states_staging"])
            with cur.copy(queries["copy_states"]) as copy:
                for entry, state in changed:
                    own = _own_part(state)
                    copy.write_row(
                        (
                            entry.rule.rule_id,
                            entry.device_metric_id,
                            entry.fingerprint,
                            own.status,
                            json.dumps(own.to_json(), separators=(",", ":")),
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

    def _message(self, entry: RuleEntry, transition: evaluator.Transition) -> str | None:
        """The event's rendered message; None when it cannot be rendered (a bug: the event is
        still written, with a plain message and no delivery, and the batch's other events are
        not touched)."""
        try:
            template = actions_model.message_template(entry.rule.action)
            return templates.render(
                template, render_context(entry, transition.value, transition.ts)
            )
        except Exception as exc:
            self.rule_failed("render", entry, exc, kind=transition.kind)
            return None

    def _deliveries(
        self, entry: RuleEntry, event_id: int, transition: evaluator.Transition, message: str
    ) -> list[tuple[str, dict[str, Any]]]:
        """The event's outbox targets; none when they cannot be rendered (logged, counted)."""
        try:
            return outbox_rows(
                entry,
                event_id,
                transition.kind,
                transition,
                message,
                smtp_to=self.settings.smtp_to,
            )
        except Exception as exc:
            self.rule_failed("render", entry, exc, kind=transition.kind)
            return []

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
        event_params = []
        messages: list[str | None] = []
        for entry, transition in transitions:
            message = self._message(entry, transition)
            messages.append(message)
            if message is None:
                message = f"{entry.rule.name}: {transition.kind} (message could not be rendered)"
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
                if message is not None
                for kind, target in self._deliveries(entry, event_id, transition, message)
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


class RulePreloader(EngineThread):
    """Loads the rule cache while the service starts (the broker connection, the rest of the
    start-up), so that compiling thousands of rules is not the first batch's work, and an
    invalid rule is reported at start. It waits for the catalogue listener's first load: that
    marks the cache stale (changes before LISTEN could be missed), and a load after it is kept
    until a notification says otherwise. One attempt: on failure the first batch loads them."""

    name = "iothub-rules-preload"

    @property
    def alive(self) -> bool:
        return True  # done after one attempt, by design

    def _run(self) -> None:
        while not self._engine.catalog_seen.wait(CATALOG_POLL):
            if self._stop.is_set():
                return
        try:
            with self._pool.connection(timeout=PRELOAD_TIMEOUT) as conn:
                self._engine.cache.current(conn)
        except Exception as exc:
            log.warning("rules_preload_failed", error=" ".join(str(exc).split())[:300])


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
