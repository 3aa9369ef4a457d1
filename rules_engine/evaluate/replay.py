"""A backtest: a rule fed stored readings in order, with the no_data timer simulated at each
reading's time, so that a replay and a live run agree."""

from __future__ import annotations

from collections.abc import Iterable
from zoneinfo import ZoneInfo

from rules_engine.evaluate.compile import CompiledRule
from rules_engine.evaluate.state import RuleState
from rules_engine.evaluate.step import Observation, Transition, check_no_data, step
from rules_engine.model import conditions


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
