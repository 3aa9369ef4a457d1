"""The batch fast path: one device_metric's readings of a batch as a `Series` whose value and
rate ranges all its rules share, `settles` (no reading of it can move a state) and `step_many`
(step() over the readings, run only where a reading can change the state)."""

from __future__ import annotations

import itertools
import operator
from collections.abc import Iterator, Sequence
from typing import Any, Final
from zoneinfo import ZoneInfo

from rules_engine.evaluate import step as stepping
from rules_engine.evaluate.compile import CompiledRule
from rules_engine.evaluate.state import RuleState
from rules_engine.evaluate.step import Observation, Transition
from rules_engine.model import conditions
from rules_engine.model.conditions import Condition
from schema.types import DataType


def _flips_only(rule: CompiledRule, state: RuleState) -> bool:
    """Whether this rule's condition needs no history of its own beyond the last reading
    (threshold, range, boolean, string_match, delta at the top, no hysteresis): then a reading
    where the predicate agrees with the status (false while OK, true while FIRING) only moves
    last_ts, whatever the duration, cooldown or time window say."""
    return (
        isinstance(rule.condition, (*stepping.STATELESS, conditions.Delta))
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
        as step.delta_predicate does; None when a pair has no rate (not numbers, not increasing)."""
        if absolute not in self._rates:
            self._rates[absolute] = self._compute_rates(absolute)
        return self._rates[absolute]

    def _compute_rates(self, absolute: bool) -> tuple[float, float] | None:
        readings = self._readings
        if len(readings) < 2 or self.value_range() is None or not self.increasing():
            return None
        # Increasing times: every elapsed is positive, as stepping.delta_predicate requires.
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
    compare = stepping.COMPARE[op]
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
        if stepping.delta_predicate(cond, state.last_ts, state.last_value, first) != want:
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
            result = stepping.step(
                rule, state, reading, tz, device_time_silence=device_time_silence
            )
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
                stepping.require_aware(reading.ts, "reading.ts")
                stepping.check_value(rule.data_type, reading.value)
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
            stepping.require_aware(reading.ts, "reading.ts")
            stepping.check_value(rule.data_type, reading.value)
        if last_ts is not None and reading.ts <= last_ts:
            late.append(reading)
            continue
        holds = (
            stepping.delta_predicate(delta, last_ts, last_value, reading)
            if delta is not None
            else stepping.stateless_predicate(cond, reading.value)
        )
        if status == "pending" or holds != (status == "firing"):
            before = RuleState(status, pending_since, last_ts, last_value, last_triggered, ())
            result = stepping.step(rule, before, reading, tz)
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
