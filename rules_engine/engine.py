"""Where rules run: inside the ingestion transaction, on the rows it actually inserted.

For each device_metric with active rules: take its advisory lock (ascending order, so two
service instances never deadlock), make its rule states current, feed the new readings in
device-time order through the state machines (rules_engine/evaluate/), write an event per
transition and, for a triggered event, a row per action into the outbox; save the states. All of
it commits with the telemetry, so a crash either keeps readings, state and events together or
loses none of them to a redelivery.

The parts: the rules (rule_cache.py), their states (state_store.py), the rows written
(events.py). The workers that run beside the batches (preload.py, no_data.py, actions/outbox.py)
are put together in background.py: this module is also every worker process's batch hook, and
it does not import what delivers the actions.
"""

from __future__ import annotations

import threading
from bisect import bisect_right
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from operator import attrgetter

import psycopg

from config.settings import Settings
from ingestor.catalog import Snapshot
from ingestor.hooks import BatchReading, HookResult
from rules_engine.evaluate import batch
from rules_engine.evaluate.state import RuleState
from rules_engine.evaluate.step import Observation, Reading, Transition
from rules_engine.events import EventWriter
from rules_engine.failures import RuleFailures
from rules_engine.metrics import RuleMetrics
from rules_engine.rule_cache import RuleCache, RuleEntry
from rules_engine.state_store import INITIAL, DmStates, StateCache, StateStore, own_part

RELOAD_TABLES = frozenset({"*", "rules", "devices", "metrics", "device_metrics"})
NO_INTAKE = datetime.min.replace(tzinfo=UTC)  # intake_since() of an engine run without one

_TS = attrgetter("ts")


def utcnow() -> datetime:
    return datetime.now(UTC)


def not_ahead(rows: Sequence[BatchReading], now: datetime) -> tuple[Sequence[Observation], int]:
    """The readings to evaluate, none later than the service's clock, and how many were folded.

    A reading up to `future_tolerance` ahead is stored, but evaluated as of `now`: were it
    evaluated at its own time, the cursor would move past the clock and every on-time reading
    after it would count as late. Several ahead in one batch are one moment, so only the newest
    of them is evaluated; the others are counted late. `rows` are sorted by time."""
    if rows[-1].ts <= now:
        return rows, 0
    ahead = bisect_right(rows, now, key=_TS)
    newest = rows[-1]
    return [*rows[:ahead], Reading(now, newest.value)], len(rows) - ahead - 1


class RuleEngine:
    """The batch hook of the ingestion transaction, and what its workers share with it
    (`rules_engine.workers.RuleHost`; they are built by `rules_engine.background`)."""

    def __init__(self, settings: Settings, metrics: RuleMetrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.tz = settings.tz
        self.cache = RuleCache(metrics)
        self.store = StateStore()
        self.states = StateCache(self.store)
        self.failures = RuleFailures(metrics)
        self.events = EventWriter(self.failures, settings.smtp_to)
        self._states_generation = -1
        self.catalog_seen = threading.Event()  # the catalogue listener has loaded once
        # Seconds the ingestion is behind (the service sets it): beyond no_data_max_backlog the
        # no-data timer gives no verdict, since readings still waiting are not a silence.
        self.backlog_age: Callable[[], float] = lambda: 0.0
        # Since when the intake has been connected to the broker (None: it is not), set by the
        # service; silence is not judged from before it. Without an intake: no such bound.
        self.intake_since: Callable[[], datetime | None] = lambda: NO_INTAKE
        self.clock: Callable[[], datetime] = utcnow  # the service's clock (receipt times)

    def on_catalog_change(self, _snapshot: Snapshot, tables: frozenset[str]) -> None:
        if tables & RELOAD_TABLES:
            self.cache.mark_stale()
        self.catalog_seen.set()

    # --- the hook

    def on_inserted(self, conn: psycopg.Connection, rows: Sequence[BatchReading]) -> HookResult:
        rules = self.cache.current(conn)
        if self.cache.generation != self._states_generation:
            self.states.prune(rules.keys())
            self._states_generation = self.cache.generation
        by_dm: dict[int, list[BatchReading]] = defaultdict(list)
        for r in rows:
            if r.device_metric_id in rules:
                by_dm[r.device_metric_id].append(r)
        if not by_dm:
            return HookResult()
        relevant = sorted(by_dm)
        self.store.lock(conn, relevant)
        self.states.refresh(conn, relevant)
        late = 0
        # One clock reading per batch: when these readings were received, and the bound no
        # reading's time may pass when it is evaluated (see not_ahead).
        now = self.clock()
        transitions: list[tuple[RuleEntry, Transition]] = []
        changed: list[tuple[RuleEntry, RuleState]] = []
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
            fresh = batch.Series(in_time, dm_rows[0].data_type)
            moved = known.advanced(fresh[-1], now)
            for entry in rules[dm]:
                try:
                    outcome = self._evaluate(entry, known, fresh)
                except Exception as exc:
                    # A rule that fails (a bug, or a value it cannot take) loses its own effects
                    # for this batch, never the telemetry or the other rules'.
                    self.failures.report("evaluate", entry, exc, device_metric_id=dm)
                    continue
                state, fired = outcome
                transitions.extend((entry, t) for t in fired)
                if state is not None:
                    changed.append((entry, state))
                    moved.rules[entry.rule.rule_id] = (entry.fingerprint, state)
            after[dm] = moved
        transitions, changed = self.live_only(conn, transitions, changed, after)
        self.events.write_events(conn, transitions)
        # States before cursors: a write to rule_states bumps its cursors' versions (trigger),
        # and the cursor write below must be the last word on them in this transaction.
        self.store.save_states(conn, changed)
        version = self.store.save_cursors(conn, after)
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
        self, entry: RuleEntry, known: DmStates, readings: batch.Series
    ) -> tuple[RuleState | None, list[Transition]]:
        """Feed the new readings to one rule; returns its new state to store (None: unchanged)
        and the transitions to write as events."""
        fired: list[Transition] = []
        stored = known.rules.get(entry.rule.rule_id)
        state = known.state_for(entry)
        same_rule = stored is None or stored[0] == entry.fingerprint
        if same_rule and batch.settles(entry.rule, state, readings):
            return None, fired  # the common case: nothing to evaluate reading by reading
        if stored is not None and stored[0] != entry.fingerprint and stored[1].status == "firing":
            # An edited rule starts afresh; an alarm it had open is closed, not left hanging.
            first = readings[0]
            fired.append(
                Transition(
                    "resolved", first.ts, first.value, "rule changed; its state starts afresh"
                )
            )
        # validated: the ingestor checked each value against its metric's data_type.
        # Silence is the no-data timer's to judge, on the service's clock (see no_data.py).
        after, transitions, _late = batch.step_many(
            entry.rule, state, readings, self.tz, validated=True, device_time_silence=False
        )
        fired.extend(transitions)
        own = own_part(after)
        if stored is None:
            unchanged = own == INITIAL
        else:
            unchanged = stored[0] == entry.fingerprint and stored[1] == own
        return (None if unchanged else own), fired

    def live_only(
        self,
        conn: psycopg.Connection,
        transitions: list[tuple[RuleEntry, Transition]],
        changed: list[tuple[RuleEntry, RuleState]],
        after: dict[int, DmStates],
    ) -> tuple[list[tuple[RuleEntry, Transition]], list[tuple[RuleEntry, RuleState]]]:
        """Drop what would be written for rules deleted or deactivated since the cache was
        loaded (the notification that reloads it may still be on its way), and lock the others
        against deletion until commit, so that their foreign keys cannot fail the batch."""
        ids = sorted(
            {e.rule.rule_id for e, _t in transitions} | {e.rule.rule_id for e, _ in changed}
        )
        if not ids:
            return transitions, changed
        live = self.store.live_rules(conn, ids)
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
