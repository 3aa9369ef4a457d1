"""A rule row compiled into what evaluation runs: `CompiledRule`, from parsed documents
(`compile_rule`) or from the stored text (`compile_stored`, within rule_json's bounds)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import cast

from pydantic import JsonValue

from rules_engine.model import actions as actions_model
from rules_engine.model import conditions, rule_json
from rules_engine.model.actions import Action
from rules_engine.model.conditions import Condition, InvalidRule
from schema.types import DataType


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


def compile_stored(
    rule_id: int,
    name: str,
    condition_text: str | None,
    action_text: str | None,
    data_type: DataType | str,
) -> tuple[CompiledRule, JsonValue]:
    """A stored rule, compiled as the engine runs it, and its decoded condition (for the
    fingerprint). Raises InvalidRule, and only that, whatever the documents hold."""
    condition, action = rule_json.parse_rule(rule_id, condition_text, action_text)
    try:
        compiled = compile_rule(rule_id, name, condition, action, cast(DataType, data_type))
    except InvalidRule:
        raise
    except Exception as exc:
        # The documents are within bounds, so this is a bug in validation; it still costs
        # this rule only.
        raise InvalidRule(
            f"cannot be compiled: {type(exc).__name__}: {exc}"[:300],
            rule_id=rule_id,
            reason=rule_json.CRASHED,
        ) from exc
    return compiled, condition
