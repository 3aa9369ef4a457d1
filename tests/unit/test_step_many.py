"""step_many() is step() over a sequence, whatever shortcut it takes."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from rules_engine import evaluator

TZ = ZoneInfo("Europe/Berlin")
T0 = datetime(2026, 1, 27, 21, 0, tzinfo=UTC)
NOTIFY = {"type": "notify", "channel": "email", "message": "x"}

RULES = [
    ("numeric", {"type": "threshold", "operator": ">", "value": 25}),
    ("numeric", {"type": "threshold", "operator": "<=", "value": 22, "duration_minutes": 3}),
    ("numeric", {"type": "threshold", "operator": ">", "value": 25, "clear_value": 23}),
    ("numeric", {"type": "threshold", "operator": ">", "value": 25, "cooldown_minutes": 5}),
    ("numeric", {"type": "range", "operator": "outside", "min": 21, "max": 26}),
    (
        "numeric",
        {"type": "threshold", "operator": ">", "value": 24, "time_restriction": "22:00-06:00"},
    ),
    ("numeric", {"type": "rate", "count": 3, "duration_minutes": 2}),
    ("numeric", {"type": "delta", "operator": ">", "value": 2, "absolute": True}),
    (
        "numeric",
        {
            "type": "delta",
            "operator": ">",
            "value": 1,
            "duration_minutes": 2,
            "cooldown_minutes": 3,
        },
    ),
    (
        "numeric",
        {
            "type": "composite",
            "operator": "OR",
            "conditions": [
                {"type": "threshold", "operator": ">", "value": 27},
                {"type": "threshold", "operator": "<", "value": 20},
            ],
        },
    ),
    ("boolean", {"type": "boolean", "operator": "==", "value": True}),
    ("str", {"type": "string_match", "operator": "in", "value": ["FAULT", "WARN"]}),
]


def values(data_type: str, rng: random.Random) -> object:
    if data_type == "numeric":
        return rng.choice([18, 20.5, 22, 24, 25, 25.5, 26, 27.5, 30])
    if data_type == "boolean":
        return rng.random() < 0.4
    return rng.choice(["OK", "OK", "WARN", "FAULT"])


@pytest.mark.parametrize(("data_type", "condition"), RULES)
def test_step_many_equals_step_by_step(data_type: str, condition: dict[str, object]) -> None:
    """For random sequences with late readings mixed in, and batches split at random points,
    step_many gives the same states, transitions and late readings as step() one by one."""
    rule = evaluator.compile_rule(1, "r", condition, NOTIFY, data_type)  # type: ignore[arg-type]
    rng = random.Random(hash(str(condition)) & 0xFFFF)
    for _trial in range(200):
        readings = []
        moment = T0
        for _ in range(rng.randint(1, 40)):
            moment += timedelta(minutes=rng.choice([0.5, 1, 1, 2, 7]))
            ts = moment - timedelta(minutes=3) if rng.random() < 0.1 else moment
            readings.append(evaluator.Reading(ts, values(data_type, rng)))  # type: ignore[arg-type]
        expected_state = evaluator.RuleState.initial()
        expected: list[evaluator.Transition] = []
        expected_late = []
        for reading in readings:
            result = evaluator.step(rule, expected_state, reading, TZ)
            expected.extend(result.transitions)
            if result.late:
                expected_late.append(reading)
            expected_state = result.state
        state = evaluator.RuleState.initial()
        got: list[evaluator.Transition] = []
        got_late = []
        cut = rng.randint(0, len(readings))
        for part in (readings[:cut], readings[cut:]):
            state, transitions, late = evaluator.step_many(
                rule, state, part, TZ, validated=bool(cut % 2)
            )
            got.extend(transitions)
            got_late.extend(late)
        assert (state, got, got_late) == (expected_state, expected, expected_late)
