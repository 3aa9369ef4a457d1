"""Randomized hostile rule JSON: loading and compiling raise InvalidRule or nothing; a rule that
compiles evaluates, fires its timer and renders its messages without raising.

IOTHUB_HYPOTHESIS_EXAMPLES sets the examples per test (150; thousands for a long search)."""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rules_engine.evaluate import batch as evaluate_batch
from rules_engine.evaluate import step as evaluator
from rules_engine.evaluate.compile import CompiledRule, compile_stored
from rules_engine.evaluate.state import RuleState
from rules_engine.events import outbox_rows, render_context
from rules_engine.model import actions as actions_model
from rules_engine.model import rule_json
from rules_engine.model.conditions import DATA_TYPES, InvalidRule
from rules_engine.model.templates import render
from rules_engine.rule_cache import RuleEntry

TZ = ZoneInfo("Europe/Berlin")
T0 = datetime(2026, 1, 27, 12, 0, tzinfo=UTC)
FIELDS = (
    "type",
    "operator",
    "value",
    "min",
    "max",
    "count",
    "minutes",
    "duration_minutes",
    "cooldown_minutes",
    "time_restriction",
    "clear_value",
    "clear",
    "conditions",
    "absolute",
    "channel",
    "message",
    "topic",
    "payload",
    "webhook",
    "notification",
    "url",
    "enabled",
    "headers",
    "qos",
    "retain",
)
TYPES = (
    "threshold",
    "range",
    "boolean",
    "string_match",
    "rate",
    "delta",
    "no_data",
    "composite",
    "notify",
    "mqtt",
    "webhook",
)
OPERATORS = (">", ">=", "<", "<=", "==", "!=", "in", "contains", "inside", "outside", "AND", "OR")
SETTINGS = settings(
    max_examples=int(os.environ.get("IOTHUB_HYPOTHESIS_EXAMPLES", "150")),
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=-(10**60), max_value=10**60),
    st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from(
        [0, -1, 1e308, -1e308, 5e-324, 10**30, "", "{value}", "{value:>999999999}", "22:00-06:00"]
    ),
    st.sampled_from(TYPES),
    st.sampled_from(OPERATORS),
    st.text(max_size=30),
)
json_values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=6),
        st.dictionaries(st.one_of(st.sampled_from(FIELDS), st.text(max_size=8)), inner, max_size=6),
    ),
    max_leaves=40,
)


@st.composite
def rule_like(draw: st.DrawFn) -> Any:
    """A dict that looks like a condition or action, with any values in its fields."""
    fields = draw(st.lists(st.sampled_from(FIELDS), max_size=8, unique=True))
    document: dict[str, Any] = {"type": draw(st.sampled_from(TYPES))}
    for name in fields:
        document[name] = draw(json_values | rule_like_leaf)
    return document


rule_like_leaf = st.builds(
    lambda t, op, v: {"type": t, "operator": op, "value": v},
    st.sampled_from(TYPES),
    st.sampled_from(OPERATORS),
    scalars,
)


@st.composite
def hostile_text(draw: st.DrawFn) -> str:
    """JSON text: rule-like documents, arbitrary JSON, deep nesting, long lists and strings,
    and text that is not JSON at all."""
    kind = draw(st.integers(0, 6))
    if kind == 0:
        depth = draw(st.integers(0, 5000))
        inner = draw(st.sampled_from(["", "1", '"x"', "{}"]))
        bracket = draw(st.sampled_from([("[", "]"), ('{"a":', "}")]))
        deep = bracket[0] * depth + inner + bracket[1] * depth
        if bracket[0] == "[" or inner:
            return '{"type": "threshold", "operator": ">", "value": ' + deep + "}"
        return '{"type": "composite", "operator": "AND", "conditions": [' + deep + "]}"
    if kind == 1:
        size = draw(st.sampled_from([999, 1000, 1001, 5000]))
        values = [f"S{i}" for i in range(size)]
        return json.dumps({"type": "string_match", "operator": "in", "value": values})
    if kind == 2:
        size = draw(st.sampled_from([4096, 4097, 70_000]))
        return json.dumps({"type": "notify", "channel": "email", "message": "{value}" * size})
    if kind == 3:
        return draw(st.text(max_size=200))
    if kind == 4:
        return json.dumps(draw(json_values))
    if kind == 5:
        nest = draw(st.integers(0, 40))
        leaf = draw(rule_like())
        for _ in range(nest):
            leaf = {"type": "composite", "operator": "OR", "conditions": [leaf]}
        return json.dumps(leaf)
    return json.dumps(draw(rule_like()))


def readings_for(data_type: str, values: list[Any]) -> list[evaluator.Reading]:
    kinds = {"numeric": (int, float), "boolean": (bool,), "str": (str,)}[data_type]
    fitting = [
        v
        for v in values
        if isinstance(v, kinds) and not (data_type == "numeric" and isinstance(v, bool))
    ]
    return [evaluator.Reading(T0 + timedelta(minutes=i), v) for i, v in enumerate(fitting)]


def _exercise(compiled: CompiledRule, values: list[Any]) -> None:
    """Evaluate, time out and render a compiled rule the way the engine does."""
    entry = RuleEntry(compiled, 1, "fp", "SN-1", "Device", "temperature")
    state = RuleState.initial()
    readings = readings_for(compiled.data_type, values)
    state, transitions, _late = evaluate_batch.step_many(compiled, state, readings, TZ)
    RuleState.from_json(state.to_json())
    timer = evaluator.check_no_data(compiled, state, T0 + timedelta(days=30), TZ)
    for transition in [*transitions, *timer.transitions]:
        message = render(
            actions_model.message_template(compiled.action),
            render_context(entry, transition.value, transition.ts),
        )
        outbox_rows(entry, 1, transition.kind, transition, message, smtp_to="ops@example.com")


values_strategy = st.lists(
    st.one_of(
        st.floats(allow_nan=False, allow_infinity=False, width=32),
        st.integers(-(10**6), 10**6),
        st.booleans(),
        st.text(max_size=20),
    ),
    max_size=20,
)


@SETTINGS
@given(
    condition=hostile_text(),
    action=hostile_text(),
    data_type=st.sampled_from(DATA_TYPES),
    values=values_strategy,
)
def test_hostile_rule_json_is_invalid_or_runs(
    condition: str, action: str, data_type: str, values: list[Any]
) -> None:
    """Nothing but InvalidRule escapes loading and compiling; nothing escapes evaluating."""
    try:
        compiled, _decoded = compile_stored(7, "r", condition, action, data_type)
    except InvalidRule as exc:
        assert exc.reason in rule_json.REASONS
        assert exc.problems
        return
    _exercise(compiled, values)


@SETTINGS
@given(
    condition=st.one_of(rule_like(), json_values),
    data_type=st.sampled_from(DATA_TYPES),
    values=values_strategy,
)
def test_rule_like_conditions_compile_or_are_invalid(
    condition: Any, data_type: str, values: list[Any]
) -> None:
    """Condition-shaped documents with any field values: InvalidRule or a rule that runs."""
    action = json.dumps({"type": "notify", "channel": "log", "message": "{value} {ts}"})
    try:
        compiled, _decoded = compile_stored(7, "r", json.dumps(condition), action, data_type)
    except InvalidRule as exc:
        assert exc.problems
        return
    _exercise(compiled, values)


def test_depth_is_measured_without_recursion() -> None:
    """Depth is counted over brackets outside strings, so a million levels cost one pass."""
    assert rule_json.depth("[" * 1_000_000 + "]" * 1_000_000) == 1_000_000
    assert rule_json.depth('{"a": "[[[[", "b": [1, [2]]}') == 3
    assert rule_json.depth(r'["\"[[[", {}]') == 2


def test_bounds_are_exact() -> None:
    """The documented bounds hold at their edges, each refused with its reason."""
    at_limit = "[" * rule_json.MAX_DEPTH + "]" * rule_json.MAX_DEPTH
    assert rule_json.parse(at_limit) is not None
    cases = {
        "[" * (rule_json.MAX_DEPTH + 1) + "]" * (rule_json.MAX_DEPTH + 1): rule_json.TOO_DEEP,
        json.dumps(list(range(rule_json.MAX_ITEMS + 1))): rule_json.TOO_MANY_ITEMS,
        json.dumps("x" * (rule_json.MAX_STRING_CHARS + 1)): rule_json.STRING_TOO_LONG,
        " " * (rule_json.MAX_TEXT_CHARS + 1): rule_json.TOO_LARGE,
        "1" * 5000: rule_json.TOO_LARGE,
        '{"value": NaN}': rule_json.BAD_JSON,
        '"\\ud800"': rule_json.BAD_JSON,
        "{": rule_json.BAD_JSON,
    }
    for text, reason in cases.items():
        try:
            rule_json.parse(text)
        except rule_json.RuleJsonError as exc:
            assert exc.reason == reason, text[:40]
        else:
            raise AssertionError(f"accepted: {text[:40]}")
    assert rule_json.parse(json.dumps(list(range(rule_json.MAX_ITEMS)))) is not None


@pytest.mark.parametrize("literal", ["1e999", "-1e999", "1E400", "123456789e400"])
def test_a_number_beyond_a_double_makes_only_its_rule_invalid(literal: str) -> None:
    """A JSON number a double cannot hold (float() makes it inf) is refused when the rule is
    decoded: an action payload holding it would otherwise be written as `Infinity`, which jsonb
    refuses, failing the whole batch's rule effects outside the rule's own guard."""
    with pytest.raises(rule_json.RuleJsonError) as refused:
        rule_json.parse('{"type": "mqtt", "topic": "alerts/x", "payload": {"x": ' + literal + "}}")
    assert refused.value.reason == rule_json.TOO_LARGE
