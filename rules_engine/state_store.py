"""What the rules of a device_metric remember, and where it is kept: `DmStates` (the newest
evaluated reading and each rule's own state), `StateStore` (the lock/load/save SQL of
`rule_states` and `rule_cursors`), and `StateCache` (the states kept in memory between
batches, read again only when another writer moved them)."""

from __future__ import annotations

import json
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Final

import psycopg
import structlog

from rules_engine.evaluate.state import RuleState, Value
from rules_engine.evaluate.step import Observation
from rules_engine.model import rule_json
from rules_engine.rule_cache import RuleEntry
from schema import locks, sql

log = structlog.get_logger(__name__)
queries = sql.load("rules_engine")


INITIAL: Final = RuleState.initial()


def own_part(state: RuleState) -> RuleState:
    """A rule's state without the newest reading, which its device_metric's cursor holds."""
    if state.last_ts is None and state.last_value is None:
        return state
    return RuleState(
        state.status, state.pending_since, None, None, state.last_triggered, state.nodes
    )


def _parse_state(rule_id: int, dm: int, text: str | None) -> RuleState | None:
    try:
        raw = rule_json.parse(text)
        if raw is not None and not isinstance(raw, dict):
            raise ValueError(f"a rule state must be a JSON object, got {type(raw).__name__}")
        return own_part(RuleState.from_json(raw))
    except (ValueError, TypeError) as exc:  # RuleJsonError is a ValueError
        log.warning("rule_state_reset", rule_id=rule_id, device_metric_id=dm, why=str(exc))
        return None


def _parse_value(dm: int, text: str | None) -> Value | None:
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
    last_value: Value | None = None
    rules: dict[int, tuple[str, RuleState]] = field(default_factory=dict)
    # When the service last received a reading of it, on its own clock: silence is judged on
    # this, never on device time (a device clock running behind would look silent early).
    last_received: datetime | None = None

    def state_for(self, entry: RuleEntry) -> RuleState:
        stored = self.rules.get(entry.rule.rule_id)
        own = stored[1] if stored is not None and stored[0] == entry.fingerprint else INITIAL
        # Built directly, not with dataclasses.replace: this runs per rule on every batch.
        return RuleState(
            own.status,
            own.pending_since,
            self.last_ts,
            self.last_value,
            own.last_triggered,
            own.nodes,
        )

    def advanced(self, newest: Observation, received: datetime) -> DmStates:
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

    Used by the writer thread only (the batch hook); the no-data timer reads the store."""

    def __init__(self, store: StateStore) -> None:
        self._store = store
        self._by_dm: dict[int, DmStates] = {}

    def get(self, dm: int) -> DmStates:
        return self._by_dm[dm]

    def refresh(self, conn: psycopg.Connection, device_metric_ids: Sequence[int]) -> None:
        """Under the device_metrics' advisory locks: make the kept states current."""
        versions = self._store.cursor_versions(conn, device_metric_ids)
        stale = []
        for dm in device_metric_ids:
            known = self._by_dm.get(dm)
            if known is None or known.version is None or known.version != versions.get(dm):
                stale.append(dm)
        if stale:
            self._by_dm.update(self._store.load_states(conn, stale))

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


class StateStore:
    """Runs the SQL of rule states and cursors: the per-device_metric advisory locks, and the
    loads and saves of `rule_states` and `rule_cursors`. Callers pass the connection of their
    transaction (the batch's, or the no-data timer's) and get values back."""

    def lock(self, conn: psycopg.Connection, device_metric_ids: Sequence[int]) -> None:
        conn.execute(
            queries["lock_device_metrics"],
            {"lock_class": locks.RULE_STATE_CLASS, "ids": list(device_metric_ids)},
        )

    def load_states(
        self, conn: psycopg.Connection, device_metric_ids: Sequence[int]
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

    def save_cursors(self, conn: psycopg.Connection, after: dict[int, DmStates]) -> int | None:
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

    def save_states(
        self, conn: psycopg.Connection, changed: Sequence[tuple[RuleEntry, RuleState]]
    ) -> None:
        """One COPY and one upsert for the states that moved in a batch (all of them, when
        every rule holds a rate window or a pending run)."""
        if not changed:
            return
        with conn.cursor() as cur:
            cur.execute(queries["create_states_staging"])
            with cur.copy(queries["copy_states"]) as copy:
                for entry, state in changed:
                    own = own_part(state)
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

    def save_state(self, conn: psycopg.Connection, entry: RuleEntry, state: RuleState) -> None:
        self.save_states(conn, [(entry, state)])

    def live_rules(self, conn: psycopg.Connection, rule_ids: Sequence[int]) -> set[int]:
        """Which of these rules still exist and are active, locked against deletion until
        commit (their foreign keys cannot fail the batch)."""
        return {row[0] for row in conn.execute(queries["live_rules"], {"ids": list(rule_ids)})}

    def cursor_versions(
        self, conn: psycopg.Connection, device_metric_ids: Sequence[int]
    ) -> dict[int, int]:
        """Under the device_metrics' advisory locks: the versions of their cursors, the rows
        locked until commit."""
        return dict(
            conn.execute(queries["cursor_versions"], {"ids": list(device_metric_ids)}).fetchall()
        )
