"""Rule documents (`rules.condition`, `rules.action`, `rule_states.state`) as stored JSON text,
parsed with bounds before anything recursive touches them.

PostgreSQL accepts a jsonb nested thousands of levels deep, and every recursive decoder (psycopg's
jsonb loader, `json.loads`, pydantic, `json.dumps`) raises `RecursionError` on it, wherever that
happens to run. So the rule paths read these columns as text (`::text`) and come here: the
nesting depth is measured by a loop over the brackets outside strings, and only a document within
every bound below is decoded. Whatever a document holds then costs its own rule only.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Final, NoReturn, cast

from pydantic import JsonValue

from rules_engine.evaluate import step as evaluator
from rules_engine.model.conditions import InvalidRule
from schema.types import DataType

MAX_TEXT_CHARS: Final = 65_536  # characters of one stored document (condition, action, state)
MAX_DEPTH: Final = 32  # nested arrays and objects; a composite 4 deep with a clear needs ~12
MAX_ITEMS: Final = 1_000  # elements of one array, members of one object (an `in` list)
MAX_STRING_CHARS: Final = 4_096  # characters of one string (a key or a value, e.g. a message)
MAX_NODES: Final = 10_000  # values in one document, all levels together
MAX_NUMBER_CHARS: Final = 40  # characters of one number literal (int() of long ones is costly)

# Reasons (stable: logs, the `iothub_rules_invalid` metric, `iothub rules check`).
BAD_JSON: Final = "bad_json"
TOO_LARGE: Final = "json_too_large"
TOO_DEEP: Final = "json_too_deep"
TOO_MANY_ITEMS: Final = "json_too_many_items"
STRING_TOO_LONG: Final = "json_string_too_long"
INVALID: Final = "invalid"  # well-formed JSON that is not a valid condition or action
CRASHED: Final = "crashed"  # validation itself failed on it (a bug): the rule is skipped
REASONS: Final = (BAD_JSON, TOO_LARGE, TOO_DEEP, TOO_MANY_ITEMS, STRING_TOO_LONG, INVALID, CRASHED)

# A JSON string literal, possessive so that a long one costs one pass and no backtracking.
_STRING = re.compile(r'"(?:[^"\\]++|\\.)*+"', re.DOTALL)
_BRACKET = re.compile(r"[\[\]{}]")


class RuleJsonError(ValueError):
    """A stored rule document is not JSON within the accepted bounds."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


def _refuse(reason: str, detail: str) -> NoReturn:
    raise RuleJsonError(reason, detail)


def depth(text: str) -> int:
    """The deepest nesting of arrays and objects in `text`, without recursion (brackets inside
    string literals do not count; malformed text is measured as far as it goes)."""
    deepest = level = 0
    for found in _BRACKET.finditer(_STRING.sub('""', text)):
        if found.group() in "[{":
            level += 1
            deepest = max(deepest, level)
        else:
            level -= 1
    return deepest


def _constant(name: str) -> NoReturn:
    _refuse(BAD_JSON, f"{name} is not JSON (PostgreSQL's jsonb would refuse it too)")


def _number(kind: type[int] | type[float]) -> Callable[[str], int | float]:
    def parse(literal: str) -> int | float:
        if len(literal) > MAX_NUMBER_CHARS:
            _refuse(
                TOO_LARGE,
                f"a number of {len(literal)} characters (at most {MAX_NUMBER_CHARS} are read)",
            )
        return kind(literal)

    return parse


def _check_tree(document: JsonValue) -> None:
    """Sizes of the decoded document, walked with an explicit stack."""
    nodes = 0
    stack: list[JsonValue] = [document]
    while stack:
        value = stack.pop()
        nodes += 1
        if nodes > MAX_NODES:
            _refuse(TOO_LARGE, f"more than {MAX_NODES} values")
        if isinstance(value, str):
            _check_string(value)
        elif isinstance(value, list):
            if len(value) > MAX_ITEMS:
                _refuse(TOO_MANY_ITEMS, f"a list of {len(value)} items (at most {MAX_ITEMS})")
            stack.extend(value)
        elif isinstance(value, dict):
            if len(value) > MAX_ITEMS:
                _refuse(TOO_MANY_ITEMS, f"an object of {len(value)} keys (at most {MAX_ITEMS})")
            for key in value:
                _check_string(key)
            stack.extend(value.values())


def _check_string(value: str) -> None:
    if len(value) > MAX_STRING_CHARS:
        _refuse(
            STRING_TOO_LONG, f"a string of {len(value)} characters (at most {MAX_STRING_CHARS})"
        )
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        _refuse(BAD_JSON, "a string holds a lone surrogate (\\ud800-\\udfff), not text")


def parse(text: str | None) -> JsonValue:
    """Decode one stored document within the bounds; raises RuleJsonError(reason, detail)."""
    if text is None:
        return None
    if not isinstance(text, str):
        _refuse(BAD_JSON, f"expected JSON text, got {type(text).__name__}")
    if len(text) > MAX_TEXT_CHARS:
        _refuse(TOO_LARGE, f"{len(text)} characters (at most {MAX_TEXT_CHARS})")
    nesting = depth(text)
    if nesting > MAX_DEPTH:
        _refuse(TOO_DEEP, f"nested {nesting} levels deep (at most {MAX_DEPTH})")
    try:
        document: JsonValue = json.loads(
            text,
            parse_constant=_constant,
            parse_int=_number(int),
            parse_float=_number(float),
        )
    except RuleJsonError:
        raise
    except (ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError
        _refuse(BAD_JSON, f"not valid JSON: {exc}")
    _check_tree(document)
    return document


def parse_rule(
    rule_id: int | None, condition_text: str | None, action_text: str | None
) -> tuple[JsonValue, JsonValue]:
    """A rule's condition and action documents; raises InvalidRule naming both problems, with
    the reason of the first."""
    problems: list[str] = []
    reason = INVALID
    documents: list[JsonValue] = []
    for what, text in (("condition", condition_text), ("action", action_text)):
        try:
            documents.append(parse(text))
        except RuleJsonError as exc:
            if not problems:
                reason = exc.reason
            problems.append(f"{what}: {exc}")
            documents.append(None)
    if problems:
        raise InvalidRule(rule_id=rule_id, problems=problems, reason=reason)
    return documents[0], documents[1]


def compile_stored(
    rule_id: int,
    name: str,
    condition_text: str | None,
    action_text: str | None,
    data_type: DataType | str,
) -> tuple[evaluator.CompiledRule, JsonValue]:
    """A stored rule, compiled as the engine runs it, and its decoded condition (for the
    fingerprint). Raises InvalidRule, and only that, whatever the documents hold."""
    condition, action = parse_rule(rule_id, condition_text, action_text)
    try:
        compiled = evaluator.compile_rule(
            rule_id, name, condition, action, cast(DataType, data_type)
        )
    except InvalidRule:
        raise
    except Exception as exc:
        # The documents are within bounds, so this is a bug in validation; it still costs
        # this rule only.
        raise InvalidRule(
            f"cannot be compiled: {type(exc).__name__}: {exc}"[:300],
            rule_id=rule_id,
            reason=CRASHED,
        ) from exc
    return compiled, condition


__all__ = [
    "MAX_DEPTH",
    "MAX_ITEMS",
    "MAX_NODES",
    "MAX_STRING_CHARS",
    "MAX_TEXT_CHARS",
    "REASONS",
    "RuleJsonError",
    "compile_stored",
    "depth",
    "parse",
    "parse_rule",
]
