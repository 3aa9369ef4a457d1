"""step_many() is step() over a sequence, whatever shortcut it takes."""

from __future__ import annotations

import random
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from rules_engine.evaluate import batch as evaluate_batch
from rules_engine.evaluate import step as evaluator
from rules_engine.evaluate.compile import compile_rule
from rules_engine.evaluate.state import RuleState

TZ = ZoneInfo("Europe/Berlin")
T0 = datetime(2026, 1, 27, 21, 0, tzinfo=UTC)
NOTIFY = {"type": "notify", "channel": "email", "message": "x"}

RULES: list[tuple[str, dict[str, object]]] = [
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


def values(data_type: str, rng: random.Random, calm: bool = False) -> object:
    if data_type == "numeric":
        if calm:  # long runs on one side of most bounds: where step_many skips whole batches
            return rng.choice([22.5, 23, 23.5, 24])
        return rng.choice([18, 20.5, 22, 24, 25, 25.5, 26, 27.5, 30])
    if data_type == "boolean":
        return rng.random() < 0.4
    return rng.choice(["OK", "OK", "WARN", "FAULT"])


@pytest.mark.parametrize(("data_type", "condition"), RULES)
def test_step_many_equals_step_by_step(data_type: str, condition: dict[str, object]) -> None:
    """For random sequences with late readings mixed in, and batches split at random points,
    step_many gives the same states, transitions and late readings as step() one by one,
    whether it is given a plain list or a Series (whose ranges let it skip whole batches)."""
    rule = compile_rule(1, "r", condition, NOTIFY, data_type)  # type: ignore[arg-type]
    rng = random.Random(hash(str(condition)) & 0xFFFF)
    for trial in range(300):
        readings = []
        moment = T0
        calm = trial % 2 == 1
        for _ in range(rng.randint(1, 40)):
            moment += timedelta(minutes=rng.choice([0.5, 1, 1, 2, 7]))
            ts = moment - timedelta(minutes=3) if rng.random() < (0.02 if calm else 0.1) else moment
            value = values(data_type, rng, calm)
            readings.append(evaluator.Reading(ts, value))  # type: ignore[arg-type]
        expected_state = RuleState.initial()
        expected: list[evaluator.Transition] = []
        expected_late = []
        for reading in readings:
            result = evaluator.step(rule, expected_state, reading, TZ)
            expected.extend(result.transitions)
            if result.late:
                expected_late.append(reading)
            expected_state = result.state
        state = RuleState.initial()
        got: list[evaluator.Transition] = []
        got_late = []
        cut = rng.randint(0, len(readings))
        for part in (readings[:cut], readings[cut:]):
            given: Sequence[evaluator.Observation] = (
                evaluate_batch.Series(part, data_type)  # type: ignore[arg-type]
                if trial % 3
                else part
            )
            state, transitions, late = evaluate_batch.step_many(
                rule, state, given, TZ, validated=bool(cut % 2)
            )
            got.extend(transitions)
            got_late.extend(late)
        assert (state, got, got_late) == (expected_state, expected, expected_late)


# Conditions that can settle a batch: no hysteresis (a clear condition goes reading by reading).
SETTLING = [
    rule
    for rule in RULES
    if rule[1]["type"] in ("threshold", "range", "delta") and "clear_value" not in rule[1]
]


@pytest.mark.parametrize(("data_type", "condition"), SETTLING)
def test_series_ranges_skip_batches(
    data_type: str, condition: dict[str, object], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The shortcut is taken (on calm batches, where no reading can move the state), and where
    it is taken the result is still step()'s: the equivalence test above covers those runs."""
    rule = compile_rule(1, "r", condition, NOTIFY, data_type)  # type: ignore[arg-type]
    assert evaluate_batch._flips_only(rule, RuleState.initial())
    verdicts: list[bool | None] = []
    settled = evaluate_batch._settled

    def spy(*args: object) -> bool | None:
        verdict = settled(*args)  # type: ignore[arg-type]
        verdicts.append(verdict)
        return verdict

    monkeypatch.setattr(evaluate_batch, "_settled", spy)
    rng = random.Random(7)
    state = RuleState.initial()
    moment = T0
    expected_state = state
    for _batch in range(50):
        batch = []
        for _ in range(rng.randint(1, 20)):
            moment += timedelta(minutes=rng.choice([1, 2]))
            batch.append(evaluator.Reading(moment, rng.choice([23, 23.25, 23.5])))
        for reading in batch:
            expected_state = evaluator.step(rule, expected_state, reading, TZ).state
        state, _transitions, late = evaluate_batch.step_many(
            rule,
            state,
            evaluate_batch.Series(batch, data_type),  # type: ignore[arg-type]
            TZ,
            validated=True,
        )
        assert late == []
        assert state == expected_state
    assert verdicts.count(True) >= 40
