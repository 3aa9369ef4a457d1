"""The logic of `iothub rules check`: compile every rule, active or not, exactly as the engine
would, and name each problem. The command (iothub/cli/rules.py) prints the verdicts; it fails
only when an active rule is invalid, because that rule is being skipped."""

from __future__ import annotations

import json
from dataclasses import dataclass

import psycopg

from rules_engine.evaluate.compile import compile_stored
from rules_engine.model import actions as actions_model
from rules_engine.model import rule_json, templates
from rules_engine.model.conditions import InvalidRule
from schema import sql

queries = sql.load("rules_engine", "commands.sql")  # shared with backtest.py


@dataclass(frozen=True)
class RuleRow:
    id: int
    name: str
    is_active: bool
    condition: str | None  # JSON text, decoded within bounds by rule_json
    action: str | None
    device_metric_id: int
    data_type: str
    serial_id: str
    metric: str

    @property
    def label(self) -> str:
        inactive = "" if self.is_active else " (inactive)"
        name = json.dumps(self.name, ensure_ascii=False)
        return f"rule {self.id} {name} on {self.serial_id}/{self.metric}{inactive}"


@dataclass(frozen=True)
class Verdict:
    rule: RuleRow
    valid: bool
    text: str  # what to print after the rule's label: "ok", "INVALID: ...", warnings


@dataclass(frozen=True)
class CheckReport:
    verdicts: tuple[Verdict, ...]

    @property
    def active(self) -> int:
        return sum(v.rule.is_active for v in self.verdicts)

    @property
    def invalid(self) -> int:
        return sum(not v.valid for v in self.verdicts)

    @property
    def invalid_active(self) -> int:
        """Active rules that are invalid: the engine is skipping them."""
        return sum(not v.valid and v.rule.is_active for v in self.verdicts)


def check_rule(rule: RuleRow) -> tuple[bool, str]:
    """(valid, what to print after the rule's label)."""
    try:
        compiled, _condition = compile_stored(
            rule.id, rule.name, rule.condition, rule.action, rule.data_type
        )
    except InvalidRule as exc:
        bound = "" if exc.reason == rule_json.INVALID else f" [{exc.reason}]"
        return False, f"INVALID: {exc.detail}{bound}"
    warnings = template_warnings(compiled.action)
    return True, "ok" + (f" (warning: {'; '.join(warnings)})" if warnings else "")


def template_warnings(action: actions_model.Action) -> list[str]:
    """Placeholders the renderer does not know: they would be sent exactly as written."""
    used = {"message": actions_model.message_template(action)}
    if isinstance(action, actions_model.MqttAction):
        used["topic"] = action.topic
    warnings = []
    for what, template in used.items():
        unknown = templates.unknown_placeholders(template)
        if unknown:
            names = ", ".join(f"{{{name}}}" for name in unknown)
            warnings.append(f"{what} has unknown placeholder(s) {names}, left as written")
    return warnings


def check(conn: psycopg.Connection) -> CheckReport:
    """Every rule's verdict, in id order."""
    with conn.transaction():
        rules = [RuleRow(*row) for row in conn.execute(queries["rules_to_check"])]
    return CheckReport(tuple(Verdict(rule, *check_rule(rule)) for rule in rules))
