"""Where a condition is evaluated: each (rule, device_metric) is a state machine
OK -> PENDING -> FIRING -> OK, advanced one reading at a time by pure functions (`step`), and a
no_data rule also by the timer (`check_no_data`). docs/rules.md describes the semantics; this
module is their single implementation."""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Final, Literal, Protocol
from zoneinfo import ZoneInfo

from rules_engine.evaluate.compile import CompiledRule
from rules_engine.evaluate.state import NodeState, RuleState, Status, Value
from rules_engine.model import conditions
from rules_engine.model.conditions import Condition
from schema import types
from schema.types import DataType

# Built once: a union written in isinstance() is built again on every call (per reading here).
_NOT_NUMERIC = bool | str
ROOT_PATH: Final = ""  # node-state key of the top-level condition
CLEAR_PATH: Final = "clear"  # node-state key of the clear condition

COMPARE: Final[Mapping[str, Callable[[Any, Any], bool]]] = {
    ">": operator.gt,
    ">=": operator.ge,
    "<": operator.lt,
    "<=": operator.le,
    "==": operator.eq,
    "!=": operator.ne,
}


@dataclass(frozen=True)
class Reading:
    ts: datetime  # timezone-aware device time
    value: Value


class Observation(Protocol):
    """What evaluation reads of a reading: a `Reading`, or the ingestor's stored row as it is
    (building a `Reading` per row and rule was a measurable part of the ingestion hot path)."""

    @property
    def ts(self) -> datetime: ...

    @property
    def value(self) -> Value: ...


@dataclass(frozen=True)
class Transition:
    kind: Literal["triggered", "resolved"]
    ts: datetime  # device time of the reading (no_data: when the silence passed the limit)
    value: Value | None
    reason: str  # short human text, e.g. "value 28.1 > 27.5 for 10 min"


@dataclass(frozen=True)
class StepResult:
    state: RuleState
    transitions: tuple[Transition, ...]
    late: bool  # reading was not newer than the last evaluated one: state unchanged


# ---------------------------------------------------------------------------------------------
# Evaluation of one reading against a condition tree


def _text(value: Value | None) -> str:
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return conditions.show(value)
    return conditions.format_number(value)


def require_aware(moment: datetime, what: str) -> None:
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ValueError(f"{what} must be timezone-aware, got {moment.isoformat()}")


def check_value(data_type: DataType, value: object) -> None:
    if not types.fits(data_type, value):
        # The ingestor validates values against data_type, so this is a caller's bug.
        raise TypeError(f"a {data_type} rule got the reading value {conditions.show(value)}")


def _in_window(cond: Condition, moment: datetime, tz: ZoneInfo) -> bool:
    window = cond.window
    return window is None or window.contains(moment.astimezone(tz).time())


def _minutes(amount: float) -> timedelta:
    return timedelta(minutes=amount)


STATELESS = (
    conditions.Threshold,
    conditions.Range,
    conditions.BooleanCondition,
    conditions.StringMatch,
)


def stateless_predicate(cond: Condition, value: Value) -> bool:
    """What a condition that needs no history says about one value."""
    numeric = not isinstance(value, _NOT_NUMERIC)
    if isinstance(cond, conditions.Threshold):
        return numeric and COMPARE[cond.operator](value, cond.value)
    if isinstance(cond, conditions.Range):
        inside = numeric and cond.min <= value <= cond.max  # type: ignore[operator]
        return inside if cond.operator == "inside" else not inside
    if isinstance(cond, conditions.BooleanCondition):
        return COMPARE[cond.operator](value, cond.value)
    if isinstance(cond, conditions.StringMatch):
        if cond.operator == "in":
            return value in cond.value
        if cond.operator == "contains":
            return isinstance(cond.value, str) and cond.value in str(value)
        return COMPARE[cond.operator](value, cond.value)
    raise TypeError(f"{type(cond).__name__} is not a stateless condition")


def delta_predicate(
    cond: conditions.Delta,
    previous_ts: datetime | None,
    previous_value: Value | None,
    reading: Observation,
) -> bool:
    """Change per minute since the previous evaluated reading, against the bound."""
    value = reading.value
    if previous_ts is None or isinstance(previous_value, _NOT_NUMERIC) or previous_value is None:
        return False
    if isinstance(value, _NOT_NUMERIC):
        return False
    elapsed = (reading.ts - previous_ts).total_seconds() / 60
    if elapsed <= 0:
        return False
    per_minute = (value - previous_value) / elapsed
    if cond.absolute:
        per_minute = abs(per_minute)
    return COMPARE[cond.operator](per_minute, cond.value)


class _Evaluation:
    """One reading's pass over a condition tree. Mutable inside, never seen outside `step`."""

    def __init__(self, reading: Observation, state: RuleState, tz: ZoneInfo) -> None:
        self.reading = reading
        self.tz = tz
        self.previous = (state.last_ts, state.last_value)
        self.old = dict(state.nodes)
        self.new: dict[str, NodeState] = {}

    def _remember(self, path: str, **changes: Any) -> None:
        self.new[path] = dataclasses.replace(self.new.get(path, NodeState()), **changes)

    def node(self, cond: Condition, path: str) -> bool:
        """A nested condition with its own time_restriction and duration_minutes applied."""
        holds = self.predicate(cond, path) and _in_window(cond, self.reading.ts, self.tz)
        hold = cond.hold_minutes
        if hold and holds:
            since = self.old.get(path, NodeState()).since or self.reading.ts
            self._remember(path, since=since)
            return self.reading.ts - since >= _minutes(hold)
        return holds

    def predicate(self, cond: Condition, path: str) -> bool:
        """What the condition says about this reading, without its own modifiers."""
        if isinstance(cond, STATELESS):
            return stateless_predicate(cond, self.reading.value)
        if isinstance(cond, conditions.Rate):
            return self._rate(cond, path)
        if isinstance(cond, conditions.Delta):
            return self._delta(cond)
        if isinstance(cond, conditions.Composite):
            # Every sub-condition is evaluated (no short-circuit) so that rate windows and
            # durations further right stay current whatever the left ones say.
            results = [
                self.node(sub, f"{path}/{index}") for index, sub in enumerate(cond.conditions)
            ]
            return all(results) if cond.operator == "AND" else any(results)
        return False  # no_data says nothing about a reading; it is handled by its own path

    def _rate(self, cond: conditions.Rate, path: str) -> bool:
        now = self.reading.ts
        start = now - _minutes(cond.duration_minutes)
        # The window is half-open, (now - window, now]: a device that reports every 15 s sends
        # 4 readings a minute, not 5, and must not match "count 5 in 1 minute".
        kept = tuple(ts for ts in self.old.get(path, NodeState()).window if ts > start)
        window = (*kept, now)[-cond.count :]
        self._remember(path, window=window)
        return len(window) >= cond.count

    def _delta(self, cond: conditions.Delta) -> bool:
        previous_ts, previous_value = self.previous
        return delta_predicate(cond, previous_ts, previous_value, self.reading)

    def node_states(self) -> tuple[tuple[str, NodeState], ...]:
        kept = ((path, node) for path, node in self.new.items() if not node.empty)
        return tuple(sorted(kept, key=lambda item: item[0]))


# ---------------------------------------------------------------------------------------------
# The state machine


def _triggered_reason(cond: Condition, value: Value) -> str:
    hold = f" for {conditions.format_number(cond.hold_minutes)} min" if cond.hold_minutes else ""
    if isinstance(cond, conditions.Threshold):
        return f"value {_text(value)} {cond.operator} {conditions.format_number(cond.value)}{hold}"
    return f"{conditions.describe_core(cond)}{hold} (value {_text(value)})"


def _resolved_reason(rule: CompiledRule, value: Value) -> str:
    clear, cond = rule.clear_condition, rule.condition
    if isinstance(clear, conditions.Threshold) and clear is not cond.clear:  # from clear_value
        bound = conditions.format_number(clear.value)
        return f"value {_text(value)} {clear.operator} clear_value {bound}"
    if clear is not None:
        return f"clear condition {conditions.describe(clear)} holds (value {_text(value)})"
    if isinstance(cond, conditions.Threshold):
        bound = conditions.format_number(cond.value)
        return f"value {_text(value)} no longer {cond.operator} {bound}"
    return f"{conditions.describe_core(cond)} no longer holds (value {_text(value)})"


def _cooled_down(cond: Condition, state: RuleState, moment: datetime) -> bool:
    if not cond.cooldown_minutes or state.last_triggered is None:
        return True
    return moment - state.last_triggered >= _minutes(cond.cooldown_minutes)


def step(
    rule: CompiledRule,
    state: RuleState,
    reading: Observation,
    tz: ZoneInfo,
    *,
    device_time_silence: bool = True,
) -> StepResult:
    """Advance the state by one reading (the next one in device-time order).

    `device_time_silence`: a no_data rule records a gap in device time longer than its limit as
    a triggered/resolved pair (a replay). The service passes False: there the timer judges
    silence on the service's clock, and a device clock that jumps is not a silence."""
    require_aware(reading.ts, "reading.ts")
    check_value(rule.data_type, reading.value)
    if state.last_ts is not None and reading.ts <= state.last_ts:
        return StepResult(state, (), late=True)
    if isinstance(rule.condition, conditions.NoData):
        return _step_no_data(rule.condition, state, reading, tz, gaps=device_time_silence)

    cond = rule.condition
    evaluation = _Evaluation(reading, state, tz)
    holds = evaluation.predicate(cond, ROOT_PATH)
    # The clear condition is evaluated on every reading, not only while FIRING, so that its own
    # duration and rate window are built from the same readings as the condition's.
    clear = rule.clear_condition
    cleared = evaluation.node(clear, CLEAR_PATH) if clear is not None else not holds
    nodes = evaluation.node_states()

    def seen(
        status: Status, pending_since: datetime | None, last_triggered: datetime | None
    ) -> RuleState:
        # Built directly: dataclasses.replace() was half the cost of a step, and step() runs
        # for every reading of every rule inside the ingestion transaction.
        return RuleState(status, pending_since, reading.ts, reading.value, last_triggered, nodes)

    if state.status == "firing":
        if not cleared:
            return StepResult(
                seen("firing", state.pending_since, state.last_triggered), (), late=False
            )
        resolved = Transition(
            "resolved", reading.ts, reading.value, _resolved_reason(rule, reading.value)
        )
        return StepResult(
            seen("ok", state.pending_since, state.last_triggered), (resolved,), late=False
        )

    # OK or PENDING. Outside the time_restriction a rule cannot start or continue a PENDING
    # run, though a FIRING one still resolves (above) when its clear condition holds.
    if not (holds and _in_window(cond, reading.ts, tz)):
        return StepResult(seen("ok", None, state.last_triggered), (), False)
    since = state.pending_since if state.status == "pending" and state.pending_since else reading.ts
    held_long_enough = reading.ts - since >= _minutes(cond.hold_minutes)
    if held_long_enough and _cooled_down(cond, state, reading.ts):
        triggered = Transition(
            "triggered", reading.ts, reading.value, _triggered_reason(cond, reading.value)
        )
        return StepResult(seen("firing", None, reading.ts), (triggered,), late=False)
    return StepResult(seen("pending", since, state.last_triggered), (), False)


def _next_in_window(moment: datetime, cond: Condition, tz: ZoneInfo) -> datetime:
    """The first moment at or after `moment` inside the condition's time_restriction."""
    window = cond.window
    if window is None:
        return moment
    local = moment.astimezone(tz)
    if window.contains(local.time()):
        return moment
    start = datetime.combine(local.date(), window.start, tzinfo=tz)
    if start <= local:
        start = datetime.combine(local.date() + timedelta(days=1), window.start, tzinfo=tz)
    return start.astimezone(moment.tzinfo)


def _silence_limit(
    cond: conditions.NoData, state: RuleState, tz: ZoneInfo, since: datetime | None = None
) -> datetime | None:
    """When a no_data rule fires if nothing arrives before; None when it cannot fire. The
    silence counts from `since` (default: the last reading's time)."""
    if state.status == "firing" or state.last_ts is None:
        return None  # already firing, or nothing ever seen: no reference point for a silence
    moment = (since or state.last_ts) + _minutes(cond.minutes)
    if cond.cooldown_minutes and state.last_triggered is not None:
        moment = max(moment, state.last_triggered + _minutes(cond.cooldown_minutes))
    return _next_in_window(moment, cond, tz)


def _no_data_triggered(cond: conditions.NoData, state: RuleState, moment: datetime) -> Transition:
    last = state.last_ts.isoformat() if state.last_ts else "never"
    return Transition("triggered", moment, None, f"{conditions.describe_core(cond)} (last {last})")


def _step_no_data(
    cond: conditions.NoData, state: RuleState, reading: Observation, tz: ZoneInfo, *, gaps: bool
) -> StepResult:
    transitions: list[Transition] = []
    limit = _silence_limit(cond, state, tz) if gaps else None
    if limit is not None and limit < reading.ts:
        # The silence before this reading was long enough and no timer caught it (the service
        # was down, or this is a backtest): record it, so live runs and replays agree.
        transitions.append(_no_data_triggered(cond, state, limit))
        state = dataclasses.replace(state, status="firing", last_triggered=limit)
    if state.status == "firing":
        silence = conditions.format_number(
            round((reading.ts - (state.last_ts or reading.ts)).total_seconds() / 60, 1)
        )
        # The timer fires on the service's clock, the reading carries the device's: one running
        # behind must not make the alarm end before it began.
        resolved_at = max(reading.ts, state.last_triggered or reading.ts)
        transitions.append(
            Transition(
                "resolved", resolved_at, reading.value, f"reading after {silence} min of silence"
            )
        )
    after = dataclasses.replace(
        state, status="ok", pending_since=None, last_ts=reading.ts, last_value=reading.value
    )
    return StepResult(after, tuple(transitions), late=False)


def check_no_data(
    rule: CompiledRule,
    state: RuleState,
    now: datetime,
    tz: ZoneInfo,
    *,
    silent_since: datetime | None = None,
) -> StepResult:
    """The timer path: fire a no_data rule whose silence passed its limit before `now`.

    `silent_since` is when the silence began on the same clock as `now` (the service passes
    its last receipt of a reading, or its own reconnect if later); by default the last
    reading's time, which is right for a replay of stored readings. A no-op for other rules,
    for a rule already FIRING, and before the first reading."""
    require_aware(now, "now")
    if silent_since is not None:
        require_aware(silent_since, "silent_since")
    cond = rule.condition
    if not isinstance(cond, conditions.NoData):
        return StepResult(state, (), late=False)
    limit = _silence_limit(cond, state, tz, silent_since)
    if limit is None or not limit < now:
        return StepResult(state, (), late=False)
    fired = dataclasses.replace(state, status="firing", last_triggered=limit)
    return StepResult(fired, (_no_data_triggered(cond, state, limit),), late=False)
