"""Rule evaluation: each (rule, device_metric) is a state machine OK -> PENDING -> FIRING -> OK,
advanced one reading at a time by pure functions. The caller keeps the state in the database, in
the same transaction as the readings, so a restart neither forgets a pending duration nor fires
twice. docs/rules.md describes the semantics; this module is their single implementation."""

from __future__ import annotations

import dataclasses
import itertools
import operator
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Final, Literal, Protocol
from zoneinfo import ZoneInfo

from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationError,
)

from rules_engine.model import actions as actions_model
from rules_engine.model import conditions
from rules_engine.model.actions import Action
from rules_engine.model.conditions import Condition
from schema import types
from schema.types import DataType

Status = Literal["ok", "pending", "firing"]
Value = float | bool | str

STATE_VERSION: Final = 1  # bump when RuleState.to_json changes shape; from_json refuses newer

ROOT_PATH: Final = ""  # node-state key of the top-level condition
CLEAR_PATH: Final = "clear"  # node-state key of the clear condition

_COMPARE: Final[Mapping[str, Callable[[Any, Any], bool]]] = {
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
class CompiledRule:
    rule_id: int
    name: str
    data_type: DataType
    condition: Condition
    action: Action
    # Derived once: the condition that resolves a FIRING rule (None: "no longer holds").
    clear_condition: Condition | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "clear_condition", conditions.clear_condition_of(self.condition))


def compile_rule(
    rule_id: int, name: str, raw_condition: object, raw_action: object, data_type: DataType
) -> CompiledRule:
    """Parse and check a rule row; raises InvalidRule naming the rule and every problem."""
    problems: list[str] = []
    condition: Condition | None = None
    action: Action | None = None
    try:
        condition = conditions.parse_condition(raw_condition, data_type, rule_id=rule_id)
    except conditions.InvalidRule as exc:
        problems.extend(exc.problems)
    try:
        action = actions_model.parse_action(raw_action, rule_id=rule_id)
    except conditions.InvalidRule as exc:
        problems.extend(exc.problems)
    if condition is None or action is None:
        raise conditions.InvalidRule(rule_id=rule_id, problems=problems)
    return CompiledRule(rule_id, name, data_type, condition, action)


# ---------------------------------------------------------------------------------------------
# State


@dataclass(frozen=True)
class NodeState:
    """What one sub-condition remembers between readings."""

    since: datetime | None = None  # first reading of the current run where it held (duration)
    window: tuple[datetime, ...] = ()  # rate: times of the recent readings, oldest first

    @property
    def empty(self) -> bool:
        return self.since is None and not self.window


class _NodeJson(BaseModel):
    model_config = ConfigDict(extra="forbid")
    since: AwareDatetime | None = None
    window: list[AwareDatetime] = []


class _StateJson(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version: StrictInt = STATE_VERSION
    status: Status
    pending_since: AwareDatetime | None = None
    last_ts: AwareDatetime | None = None
    last_value: StrictBool | StrictInt | StrictFloat | StrictStr | None = None
    last_triggered: AwareDatetime | None = None
    nodes: dict[str, _NodeJson] = {}


def _iso(moment: datetime | None) -> str | None:
    return None if moment is None else moment.isoformat()


@dataclass(frozen=True)
class RuleState:
    """Everything a restart must remember about one (rule, device_metric)."""

    status: Status = "ok"
    pending_since: datetime | None = None  # first reading of the current PENDING run
    last_ts: datetime | None = None  # device time of the last evaluated reading
    last_value: Value | None = None  # its value (delta needs it)
    last_triggered: datetime | None = None  # time of the last triggered event (cooldown)
    nodes: tuple[tuple[str, NodeState], ...] = ()  # per sub-condition, by path, sorted

    @classmethod
    def initial(cls) -> RuleState:
        return cls()

    def node(self, path: str) -> NodeState:
        return dict(self.nodes).get(path, NodeState())

    def to_json(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "status": self.status,
            "pending_since": _iso(self.pending_since),
            "last_ts": _iso(self.last_ts),
            "last_value": self.last_value,
            "last_triggered": _iso(self.last_triggered),
            "nodes": {
                path: {"since": _iso(node.since), "window": [_iso(ts) for ts in node.window]}
                for path, node in self.nodes
            },
        }

    @classmethod
    def from_json(cls, raw: Mapping[str, Any] | None) -> RuleState:
        """Rebuild a state stored by to_json; None gives the initial state.

        Raises ValueError on a malformed or newer state (the caller may then start afresh)."""
        if raw is None:
            return cls.initial()
        try:
            parsed = _StateJson.model_validate(dict(raw))
        except (ValidationError, TypeError) as exc:
            raise ValueError(f"invalid rule state: {exc}") from None
        if parsed.version > STATE_VERSION:
            raise ValueError(f"rule state version {parsed.version} is newer than {STATE_VERSION}")
        return cls(
            status=parsed.status,
            pending_since=parsed.pending_since,
            last_ts=parsed.last_ts,
            last_value=parsed.last_value,
            last_triggered=parsed.last_triggered,
            nodes=tuple(
                (path, NodeState(node.since, tuple(node.window)))
                for path, node in sorted(parsed.nodes.items())
            ),
        )


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


def _require_aware(moment: datetime, what: str) -> None:
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ValueError(f"{what} must be timezone-aware, got {moment.isoformat()}")


def _check_value(data_type: DataType, value: object) -> None:
    if not types.fits(data_type, value):
        # The ingestor validates values against data_type, so this is a caller's bug.
        raise TypeError(f"a {data_type} rule got the reading value {conditions.show(value)}")


def _in_window(cond: Condition, moment: datetime, tz: ZoneInfo) -> bool:
    window = cond.window
    return window is None or window.contains(moment.astimezone(tz).time())


def _minutes(amount: float) -> timedelta:
    return timedelta(minutes=amount)


_STATELESS = (
    conditions.Threshold,
    conditions.Range,
    conditions.BooleanCondition,
    conditions.StringMatch,
)


def _stateless_predicate(cond: Condition, value: Value) -> bool:
    """What a condition that needs no history says about one value."""
    numeric = not isinstance(value, bool | str)
    if isinstance(cond, conditions.Threshold):
        return numeric and _COMPARE[cond.operator](value, cond.value)
    if isinstance(cond, conditions.Range):
        inside = numeric and cond.min <= value <= cond.max  # type: ignore[operator]
        return inside if cond.operator == "inside" else not inside
    if isinstance(cond, conditions.BooleanCondition):
        return _COMPARE[cond.operator](value, cond.value)
    if isinstance(cond, conditions.StringMatch):
        if cond.operator == "in":
            return value in cond.value
        if cond.operator == "contains":
            return isinstance(cond.value, str) and cond.value in str(value)
        return _COMPARE[cond.operator](value, cond.value)
    raise TypeError(f"{type(cond).__name__} is not a stateless condition")


def _delta_predicate(
    cond: conditions.Delta,
    previous_ts: datetime | None,
    previous_value: Value | None,
    reading: Observation,
) -> bool:
    """Change per minute since the previous evaluated reading, against the bound."""
    value = reading.value
    if previous_ts is None or isinstance(previous_value, bool | str) or previous_value is None:
        return False
    if isinstance(value, bool | str):
        return False
    elapsed = (reading.ts - previous_ts).total_seconds() / 60
    if elapsed <= 0:
        return False
    per_minute = (value - previous_value) / elapsed
    if cond.absolute:
        per_minute = abs(per_minute)
    return _COMPARE[cond.operator](per_minute, cond.value)


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
        if isinstance(cond, _STATELESS):
            return _stateless_predicate(cond, self.reading.value)
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
        return _delta_predicate(cond, previous_ts, previous_value, self.reading)

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
    _require_aware(reading.ts, "reading.ts")
    _check_value(rule.data_type, reading.value)
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


def _flips_only(rule: CompiledRule, state: RuleState) -> bool:
    """Whether this rule's condition needs no history of its own beyond the last reading
    (threshold, range, boolean, string_match, delta at the top, no hysteresis): then a reading
    where the predicate agrees with the status (false while OK, true while FIRING) only moves
    last_ts, whatever the duration, cooldown or time window say."""
    return (
        isinstance(rule.condition, (*_STATELESS, conditions.Delta))
        and rule.clear_condition is None
        and not state.nodes
    )


class Series(Sequence[Observation]):
    """One device_metric's readings of a batch, in device-time order, with what all its rules
    can share: the range of the values and of the changes per minute, each computed once.

    With them step_many() can tell in O(1) per rule that no reading of the batch can move a
    state (an OK threshold whose bound the batch never reaches), which is the common case."""

    def __init__(self, readings: Sequence[Observation], data_type: DataType) -> None:
        self._readings = readings
        self._numeric = data_type == "numeric"
        self._values: tuple[float, float] | None = None
        self._values_known = False
        self._rates: dict[bool, tuple[float, float] | None] = {}
        self._increasing: bool | None = None

    def __len__(self) -> int:
        return len(self._readings)

    def __getitem__(self, index: Any) -> Any:
        return self._readings[index]

    def __iter__(self) -> Iterator[Observation]:
        return iter(self._readings)

    def increasing(self) -> bool:
        """Whether device times strictly increase (then no reading is late to another)."""
        if self._increasing is None:
            stamps = [r.ts for r in self._readings]
            self._increasing = all(map(operator.lt, stamps, stamps[1:]))
        return self._increasing

    def value_range(self) -> tuple[float, float] | None:
        """(min, max) of the values; None when they are not all numbers."""
        if not self._values_known:
            self._values_known = True
            values = [r.value for r in self._readings]
            # A set of types, not a test per value: this runs for every batch of every binding.
            if self._numeric and values and set(map(type, values)) <= _NUMBER_TYPES:
                numbers: list[float] = values  # type: ignore[assignment]  # checked just above
                self._values = (min(numbers), max(numbers))
        return self._values

    def rate_range(self, absolute: bool) -> tuple[float, float] | None:
        """(min, max) of the change per minute between consecutive readings, computed exactly
        as _delta_predicate does; None when a pair has no rate (not numbers, not increasing)."""
        if absolute not in self._rates:
            self._rates[absolute] = self._compute_rates(absolute)
        return self._rates[absolute]

    def _compute_rates(self, absolute: bool) -> tuple[float, float] | None:
        readings = self._readings
        if len(readings) < 2 or self.value_range() is None or not self.increasing():
            return None
        # Increasing times: every elapsed is positive, as _delta_predicate requires.
        rates = [
            (b.value - a.value) / ((b.ts - a.ts).total_seconds() / 60)  # type: ignore[operator]
            for a, b in itertools.pairwise(readings)
        ]
        if absolute:
            rates = [abs(rate) for rate in rates]
        return min(rates), max(rates)


_NUMBER_TYPES: Final = frozenset({int, float})  # not bool: a boolean is no number here


_ORDERED: Final = frozenset({">", ">=", "<", "<="})


def _agree_all(op: str, bound: float, low: float, high: float, want: bool) -> bool:
    """Whether `x op bound` is `want` for every x in [low, high] (x taking both ends)."""
    compare = _COMPARE[op]
    upward = op in (">", ">=")
    if want:  # every value satisfies: the least favourable end does
        return bool(compare(low if upward else high, bound))
    return not compare(high if upward else low, bound)  # none does: the most favourable fails


def _settled(cond: Condition, state: RuleState, series: Series, first: Observation) -> bool | None:
    """Whether every reading of the series agrees with the state (the predicate false while OK,
    true while FIRING), so that none can move it; None when the series' ranges cannot tell."""
    want = state.status == "firing"
    if isinstance(cond, conditions.Threshold | conditions.Range):
        bounds = series.value_range()
        if bounds is None:
            return None
        low, high = bounds
        if isinstance(cond, conditions.Threshold):
            if cond.operator not in _ORDERED:
                return None
            return _agree_all(cond.operator, cond.value, low, high, want)
        all_inside = cond.min <= low and high <= cond.max
        none_inside = high < cond.min or low > cond.max
        if cond.operator == "inside":
            return all_inside if want else none_inside
        return none_inside if want else all_inside
    if isinstance(cond, conditions.Delta) and cond.operator in _ORDERED:
        # The first reading's change is from the state's last reading; the others' are between
        # readings of the series, the same for every delta rule of this device_metric.
        if _delta_predicate(cond, state.last_ts, state.last_value, first) != want:
            return False
        if len(series) == 1:
            return True
        rates = series.rate_range(cond.absolute)
        if rates is None:
            return None
        return _agree_all(cond.operator, cond.value, rates[0], rates[1], want)
    return None


def settles(rule: CompiledRule, state: RuleState, series: Series) -> bool:
    """Whether no reading of the series can move this state: step_many would only advance
    last_ts and last_value to the series' last reading, with no transitions and nothing late.
    O(1) per rule once the series' ranges are known; False when they cannot tell."""
    return bool(
        series
        and _flips_only(rule, state)
        and state.status != "pending"  # a PENDING run may reach its duration at any reading
        and (state.last_ts is None or series[0].ts > state.last_ts)
        and series.increasing()  # so no reading is late
        and _settled(rule.condition, state, series, series[0])
    )


def step_many(
    rule: CompiledRule,
    state: RuleState,
    readings: Sequence[Observation],
    tz: ZoneInfo,
    *,
    validated: bool = False,
    device_time_silence: bool = True,
) -> tuple[RuleState, list[Transition], list[Observation]]:
    """step() over readings in device-time order: the new state, the transitions, and the late
    readings. The same result as calling step() for each; for conditions without history of
    their own, step() runs only at readings that can change the state (the ingestion hot path
    evaluates every reading of every rule), and given a `Series` none runs at all when its
    ranges show that no reading can. `validated`: the caller has checked every reading's
    time zone and value type once, for all rules (the ingestor has). `device_time_silence`:
    as for step()."""
    transitions: list[Transition] = []
    late: list[Observation] = []
    if not _flips_only(rule, state):
        for reading in readings:
            result = step(rule, state, reading, tz, device_time_silence=device_time_silence)
            if result.late:
                late.append(reading)
            transitions.extend(result.transitions)
            state = result.state
        return state, transitions, late
    cond = rule.condition
    status, pending_since, last_triggered = state.status, state.pending_since, state.last_triggered
    last_ts, last_value = state.last_ts, state.last_value
    if isinstance(readings, Series):
        if not validated:
            for reading in readings:
                _require_aware(reading.ts, "reading.ts")
                _check_value(rule.data_type, reading.value)
        if settles(rule, state, readings):
            last = readings[-1]
            return (
                RuleState(status, pending_since, last.ts, last.value, last_triggered, ()),
                transitions,
                late,
            )
    delta = cond if isinstance(cond, conditions.Delta) else None
    for reading in readings:
        if not validated:
            _require_aware(reading.ts, "reading.ts")
            _check_value(rule.data_type, reading.value)
        if last_ts is not None and reading.ts <= last_ts:
            late.append(reading)
            continue
        holds = (
            _delta_predicate(delta, last_ts, last_value, reading)
            if delta is not None
            else _stateless_predicate(cond, reading.value)
        )
        if status == "pending" or holds != (status == "firing"):
            before = RuleState(status, pending_since, last_ts, last_value, last_triggered, ())
            result = step(rule, before, reading, tz)
            transitions.extend(result.transitions)
            status = result.state.status
            pending_since = result.state.pending_since
            last_triggered = result.state.last_triggered
        last_ts, last_value = reading.ts, reading.value
    return (
        RuleState(status, pending_since, last_ts, last_value, last_triggered, ()),
        transitions,
        late,
    )


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
    _require_aware(now, "now")
    if silent_since is not None:
        _require_aware(silent_since, "silent_since")
    cond = rule.condition
    if not isinstance(cond, conditions.NoData):
        return StepResult(state, (), late=False)
    limit = _silence_limit(cond, state, tz, silent_since)
    if limit is None or not limit < now:
        return StepResult(state, (), late=False)
    fired = dataclasses.replace(state, status="firing", last_triggered=limit)
    return StepResult(fired, (_no_data_triggered(cond, state, limit),), late=False)


def replay(
    rule: CompiledRule,
    readings: Iterable[Observation],
    tz: ZoneInfo,
    state: RuleState | None = None,
) -> tuple[RuleState, list[Transition]]:
    """Feed readings to step() in the order given (a backtest); for no_data rules the timer is
    simulated by check_no_data at each reading's time. Late readings are skipped as in step()."""
    current = state if state is not None else RuleState.initial()
    transitions: list[Transition] = []
    is_no_data = isinstance(rule.condition, conditions.NoData)
    for reading in readings:
        if is_no_data:
            timer = check_no_data(rule, current, reading.ts, tz)
            current = timer.state
            transitions.extend(timer.transitions)
        result = step(rule, current, reading, tz)
        current = result.state
        transitions.extend(result.transitions)
    return current, transitions


__all__ = [
    "CompiledRule",
    "NodeState",
    "Observation",
    "Reading",
    "RuleState",
    "Series",
    "StepResult",
    "Transition",
    "check_no_data",
    "compile_rule",
    "replay",
    "settles",
    "step",
    "step_many",
]
