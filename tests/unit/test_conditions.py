"""Parsing rule conditions: the original project's forms, the additions, and precise errors."""

from __future__ import annotations

from datetime import time
from typing import Any

import pytest

from rules_engine.model import conditions
from rules_engine.model.conditions import DataType, InvalidRule, parse_condition

ORIGINAL_FORMS: list[tuple[dict[str, Any], DataType]] = [
    ({"type": "threshold", "operator": ">", "value": 27.5, "duration_minutes": 10}, "numeric"),
    (
        {"type": "boolean", "operator": "==", "value": True, "time_restriction": "22:00-06:00"},
        "boolean",
    ),
    ({"type": "string_match", "operator": "!=", "value": "OK"}, "str"),
    ({"type": "rate", "count": 5, "duration_minutes": 1}, "numeric"),
    (
        {
            "type": "composite",
            "operator": "AND",
            "conditions": [
                {"type": "threshold", "operator": ">", "value": 27.5},
                {"type": "rate", "count": 5, "duration_minutes": 1},
            ],
        },
        "numeric",
    ),
]


@pytest.mark.parametrize(("raw", "data_type"), ORIGINAL_FORMS)
def test_original_forms_are_accepted_unchanged(raw: dict[str, Any], data_type: DataType) -> None:
    """Every condition form of the original project parses, and nothing in it is lost or altered."""
    parsed = parse_condition(raw, data_type)
    assert parsed.type == raw["type"]
    assert parsed.model_dump(mode="json", exclude_unset=True) == raw


def test_threshold_fields_keep_their_meaning() -> None:
    """The original threshold's operator, value and duration are read as written."""
    parsed = parse_condition(ORIGINAL_FORMS[0][0], "numeric")
    assert isinstance(parsed, conditions.Threshold)
    assert (parsed.operator, parsed.value, parsed.hold_minutes) == (">", 27.5, 10)


def test_rate_duration_is_its_window_not_a_hold_time() -> None:
    """For rate, duration_minutes is the sliding window; the rule does not also wait that long."""
    parsed = parse_condition({"type": "rate", "count": 5, "duration_minutes": 1}, "str")
    assert isinstance(parsed, conditions.Rate)
    assert (parsed.count, parsed.duration_minutes, parsed.hold_minutes) == (5, 1, 0)


def test_time_restriction_may_wrap_midnight() -> None:
    """22:00-06:00 holds 22:00, 23:30 and 05:59 but not 06:00 or 21:59 (start in, end out)."""
    parsed = parse_condition(ORIGINAL_FORMS[1][0], "boolean")
    window = parsed.window
    assert window is not None
    assert str(window) == "22:00-06:00"
    moments = [time(23, 30), time(5, 59), time(6, 0), time(21, 59), time(22, 0)]
    assert [window.contains(moment) for moment in moments] == [True, True, False, False, True]


ADDITIONS: list[tuple[dict[str, Any], DataType]] = [
    ({"type": "range", "operator": "outside", "min": 18, "max": 24}, "numeric"),
    (
        {"type": "range", "operator": "inside", "min": 40, "max": 60, "clear_value": [35, 65]},
        "numeric",
    ),
    ({"type": "threshold", "operator": "<=", "value": 5, "clear_value": 8}, "numeric"),
    ({"type": "delta", "operator": ">", "value": 2}, "numeric"),
    ({"type": "delta", "operator": ">=", "value": 0.5, "absolute": True}, "numeric"),
    ({"type": "no_data", "minutes": 15}, "str"),
    ({"type": "no_data", "minutes": 15, "time_restriction": "08:00-18:00"}, "boolean"),
    ({"type": "string_match", "operator": "in", "value": ["ALARM", "FAULT"]}, "str"),
    ({"type": "string_match", "operator": "contains", "value": "ERR"}, "str"),
    ({"type": "threshold", "operator": ">", "value": 27.5, "cooldown_minutes": 30}, "numeric"),
    (
        {
            "type": "threshold",
            "operator": ">",
            "value": 27.5,
            "clear": {"type": "threshold", "operator": "<", "value": 26, "duration_minutes": 5},
        },
        "numeric",
    ),
    (
        {
            "type": "composite",
            "operator": "OR",
            "conditions": [
                {"type": "boolean", "operator": "==", "value": True, "duration_minutes": 30},
                {"type": "rate", "count": 10, "duration_minutes": 5},
                {
                    "type": "composite",
                    "operator": "AND",
                    "conditions": [
                        {"type": "boolean", "operator": "==", "value": True},
                        {"type": "rate", "count": 2, "duration_minutes": 1},
                    ],
                    "time_restriction": "22:00-06:00",
                },
            ],
            "cooldown_minutes": 60,
        },
        "boolean",
    ),
]


@pytest.mark.parametrize(("raw", "data_type"), ADDITIONS)
def test_additions_are_accepted(raw: dict[str, Any], data_type: DataType) -> None:
    """range, delta, no_data, in/contains, cooldown, clear and clear_value all parse as written."""
    parsed = parse_condition(raw, data_type)
    assert parsed.model_dump(mode="json", exclude_unset=True) == raw


def test_clear_value_becomes_the_negated_comparison() -> None:
    """`> 27.5` with clear_value 26 resolves on `<= 26`; without clear_value there is no clear."""
    parsed = parse_condition(
        {"type": "threshold", "operator": ">", "value": 27.5, "clear_value": 26}, "numeric"
    )
    clear = conditions.clear_condition_of(parsed)
    assert isinstance(clear, conditions.Threshold)
    assert (clear.operator, clear.value) == ("<=", 26)
    plain = parse_condition({"type": "threshold", "operator": ">", "value": 27.5}, "numeric")
    assert conditions.clear_condition_of(plain) is None


def test_range_clear_value_is_the_opposite_range() -> None:
    """An `outside [18, 24]` range with clear_value [19, 23] resolves once back inside [19, 23]."""
    parsed = parse_condition(
        {"type": "range", "operator": "outside", "min": 18, "max": 24, "clear_value": [19, 23]},
        "numeric",
    )
    clear = conditions.clear_condition_of(parsed)
    assert isinstance(clear, conditions.Range)
    assert (clear.operator, clear.min, clear.max) == ("inside", 19, 23)


def test_describe_reads_like_the_rule() -> None:
    """describe() renders a condition with its modifiers for reasons and `rules check`."""
    parsed = parse_condition(ORIGINAL_FORMS[0][0], "numeric")
    assert conditions.describe(parsed) == "value > 27.5 for 10 min"
    night = parse_condition(ORIGINAL_FORMS[1][0], "boolean")
    assert conditions.describe(night) == "value == true during 22:00-06:00"


ERRORS: list[tuple[object, DataType, str]] = [
    (
        {"type": "threshold", "operator": ">", "value": "abc"},
        "numeric",
        "rule 7: condition.value: a numeric threshold needs a number, got 'abc'",
    ),
    (
        {"type": "threshold", "operator": ">", "value": True},
        "numeric",
        "rule 7: condition.value: a numeric threshold needs a number, got true",
    ),
    (
        {"type": "threshold", "operator": ">", "value": 27.5},
        "str",
        "rule 7: condition.type: a threshold condition needs a numeric metric, "
        "but this metric's data_type is 'str'",
    ),
    (
        {"type": "string_match", "operator": "==", "value": "OK"},
        "numeric",
        "rule 7: condition.type: a string_match condition needs a str metric, "
        "but this metric's data_type is 'numeric'",
    ),
    (
        {"type": "boolean", "operator": "==", "value": True},
        "numeric",
        "rule 7: condition.type: a boolean condition needs a boolean metric, "
        "but this metric's data_type is 'numeric'",
    ),
    (
        {"type": "boolean", "operator": "==", "value": "true"},
        "boolean",
        "rule 7: condition.value: a boolean condition needs true or false, got 'true'",
    ),
    (
        {"type": "boolean", "operator": "==", "value": True, "time_restriction": "22:00-6"},
        "boolean",
        "rule 7: condition.time_restriction: needs the form HH:MM-HH:MM (e.g. 22:00-06:00), "
        "got '22:00-6'",
    ),
    (
        {"type": "boolean", "operator": "==", "value": True, "time_restriction": "24:00-06:00"},
        "boolean",
        "rule 7: condition.time_restriction: an hour is above 23 or a minute above 59 "
        "in '24:00-06:00'",
    ),
    (
        {"type": "boolean", "operator": "==", "value": True, "time_restriction": "08:00-08:00"},
        "boolean",
        "rule 7: condition.time_restriction: the window starts and ends at the same time: "
        "'08:00-08:00'",
    ),
    (
        {"type": "threshold", "operator": "=>", "value": 1},
        "numeric",
        "rule 7: condition.operator: unknown operator '=>'; "
        "expected '>', '>=', '<', '<=', '==' or '!='",
    ),
    (
        {"type": "composite", "operator": "AND", "conditions": []},
        "numeric",
        "rule 7: condition.conditions: a composite needs at least one condition",
    ),
    (
        {"type": "composite", "operator": "XOR", "conditions": [{"type": "no_data", "minutes": 5}]},
        "numeric",
        "rule 7: condition.operator: unknown operator 'XOR'; expected 'AND' or 'OR'",
    ),
    (
        {"type": "composite", "operator": "OR", "conditions": [{"type": "no_data", "minutes": 5}]},
        "numeric",
        "rule 7: condition.conditions[0].type: no_data is checked on a timer and cannot be nested",
    ),
    (
        {
            "type": "composite",
            "operator": "OR",
            "conditions": [
                {"type": "threshold", "operator": ">", "value": 1},
                {"type": "threshold", "operator": ">", "value": "x"},
            ],
        },
        "numeric",
        "rule 7: condition.conditions[1].value: a numeric threshold needs a number, got 'x'",
    ),
    (
        {
            "type": "composite",
            "operator": "OR",
            "conditions": [
                {"type": "threshold", "operator": ">", "value": 1, "cooldown_minutes": 5},
            ],
        },
        "numeric",
        "rule 7: condition.conditions[0].cooldown_minutes: applies to the whole rule; "
        "put it on the top-level condition",
    ),
    (
        {"type": "thermostat", "operator": ">", "value": 1},
        "numeric",
        "rule 7: condition: unknown condition type 'thermostat'; expected one of threshold, "
        "range, boolean, string_match, rate, delta, no_data, composite",
    ),
    (
        {"operator": ">", "value": 1},
        "numeric",
        "rule 7: condition: needs a 'type', one of threshold, range, boolean, string_match, "
        "rate, delta, no_data, composite",
    ),
    (
        {"type": "threshold", "operator": ">", "value": 1, "duraton_minutes": 10},
        "numeric",
        "rule 7: condition.duraton_minutes: unknown field for a threshold condition (allowed: "
        "type, duration_minutes, time_restriction, cooldown_minutes, clear, operator, value, "
        "clear_value)",
    ),
    (
        {"type": "threshold", "operator": ">", "value": 1, "duration_minutes": -5},
        "numeric",
        "rule 7: condition.duration_minutes: duration_minutes needs a number of minutes >= 0, "
        "got -5",
    ),
    (
        {"type": "threshold", "operator": ">", "value": 27.5, "clear_value": 30},
        "numeric",
        "rule 7: condition.clear_value: must be <= value 27.5 for operator >, got 30",
    ),
    (
        {"type": "threshold", "operator": "==", "value": 1, "clear_value": 0},
        "numeric",
        "rule 7: condition.clear_value: only works with > >= < <=, not ==",
    ),
    (
        {
            "type": "threshold",
            "operator": ">",
            "value": 27.5,
            "clear_value": 26,
            "clear": {"type": "threshold", "operator": "<", "value": 26},
        },
        "numeric",
        "rule 7: condition: give either clear or clear_value, not both",
    ),
    (
        {
            "type": "threshold",
            "operator": ">",
            "value": 27.5,
            "clear": {"type": "string_match", "operator": "==", "value": "OK"},
        },
        "numeric",
        "rule 7: condition.clear.type: a string_match condition needs a str metric, "
        "but this metric's data_type is 'numeric'",
    ),
    (
        {"type": "range", "operator": "outside", "min": 24, "max": 18},
        "numeric",
        "rule 7: condition.min: 24 is greater than max 18",
    ),
    (
        {"type": "range", "operator": "outside", "min": 18, "max": 24, "clear_value": [10, 20]},
        "numeric",
        "rule 7: condition.clear_value: for outside, [10, 20] must lie within [18, 24]",
    ),
    (
        {"type": "range", "min": 18, "max": 24},
        "numeric",
        "rule 7: condition.operator: is required",
    ),
    (
        {"type": "string_match", "operator": "in", "value": "OK"},
        "str",
        "rule 7: condition.value: 'in' needs a non-empty list of strings, got 'OK'",
    ),
    (
        {"type": "string_match", "operator": "==", "value": ["OK"]},
        "str",
        "rule 7: condition.value: '==' needs a string, got [\"OK\"]",
    ),
    (
        {"type": "string_match", "operator": "==", "value": 3},
        "str",
        "rule 7: condition.value: string_match needs a string (or a list of strings for 'in'), "
        "got 3",
    ),
    (
        {"type": "rate", "count": 0, "duration_minutes": 1},
        "numeric",
        "rule 7: condition.count: rate count must be between 1 and 1000, got 0",
    ),
    (
        {"type": "rate", "count": 5},
        "numeric",
        "rule 7: condition.duration_minutes: is required",
    ),
    (
        {"type": "rate", "count": 5, "duration_minutes": 0},
        "numeric",
        "rule 7: condition.duration_minutes: rate window duration_minutes needs a number of "
        "minutes > 0, got 0",
    ),
    (
        {"type": "delta", "operator": "==", "value": 1},
        "numeric",
        "rule 7: condition.operator: unknown operator '=='; expected '>', '>=', '<' or '<='",
    ),
    (
        {"type": "delta", "operator": ">", "value": -1, "absolute": True},
        "numeric",
        "rule 7: condition.value: with absolute, the bound must be >= 0, got -1",
    ),
    (
        {"type": "no_data", "minutes": 15, "duration_minutes": 5},
        "numeric",
        "rule 7: condition.duration_minutes: no_data takes its time in minutes only",
    ),
    (
        "threshold > 27.5",
        "numeric",
        "rule 7: condition: must be a JSON object, got 'threshold > 27.5'",
    ),
    (
        {"type": "composite", "operator": "AND", "conditions": [5]},
        "numeric",
        "rule 7: condition.conditions[0]: must be a JSON object, got 5",
    ),
]


@pytest.mark.parametrize(("raw", "data_type", "message"), ERRORS)
def test_invalid_conditions_are_reported_precisely(
    raw: object, data_type: DataType, message: str
) -> None:
    """A malformed or ill-fitting condition names the rule, the JSON path and what is wrong."""
    with pytest.raises(InvalidRule) as caught:
        parse_condition(raw, data_type, rule_id=7)
    assert str(caught.value) == message
    assert caught.value.rule_id == 7


def test_every_problem_is_listed() -> None:
    """Several mistakes in one condition are all reported, not only the first."""
    raw = {"type": "threshold", "operator": "=>", "value": "abc"}
    with pytest.raises(InvalidRule) as caught:
        parse_condition(raw, "numeric", rule_id=3)
    assert caught.value.problems == (
        "condition.operator: unknown operator '=>'; expected '>', '>=', '<', '<=', '==' or '!='",
        "condition.value: a numeric threshold needs a number, got 'abc'",
    )


def test_without_a_rule_id_the_message_has_no_prefix() -> None:
    """InvalidRule without a rule id is just the problem, for callers that add their own context."""
    with pytest.raises(InvalidRule) as caught:
        parse_condition({"type": "rate", "count": 5, "duration_minutes": 1, "x": 1}, "numeric")
    assert caught.value.rule_id is None
    assert str(caught.value).startswith("condition.x: unknown field for a rate condition")


def test_invalid_rule_default_message_is_its_docstring() -> None:
    """A bare InvalidRule says what it is about."""
    assert str(InvalidRule()) == "A rule's condition or action is invalid."


def test_composites_nest_only_so_deep() -> None:
    """A composite nested deeper than MAX_COMPOSITE_DEPTH is refused (bounded evaluation)."""
    raw: dict[str, Any] = {"type": "threshold", "operator": ">", "value": 1}
    for _ in range(conditions.MAX_COMPOSITE_DEPTH + 1):
        raw = {"type": "composite", "operator": "AND", "conditions": [raw]}
    with pytest.raises(InvalidRule, match="composites nest at most 4 deep"):
        parse_condition(raw, "numeric", rule_id=1)


def test_a_rule_is_bounded_as_a_whole() -> None:
    """Composites within their own limits can still multiply: a rule holds at most
    MAX_RULE_CONDITIONS conditions, and its rate windows keep at most MAX_RULE_RATE_COUNT
    readings together (each is evaluated on every reading and kept in the state)."""
    leaf = {"type": "threshold", "operator": ">", "value": 1}
    wide = {"type": "composite", "operator": "OR", "conditions": [leaf] * 20}
    nested = {"type": "composite", "operator": "OR", "conditions": [wide] * 4}  # 85 conditions
    with pytest.raises(InvalidRule, match="at most 64 conditions in one rule"):
        parse_condition(nested, "numeric")
    rate = {"type": "rate", "count": 1000, "duration_minutes": 1}
    rates = {"type": "composite", "operator": "AND", "conditions": [rate, rate]}
    with pytest.raises(InvalidRule, match="keep at most 1000 readings together"):
        parse_condition(rates, "numeric")
    parse_condition({"type": "composite", "operator": "OR", "conditions": [wide] * 3}, "numeric")
