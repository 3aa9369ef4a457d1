"""`iothub rules check` and `iothub rules backtest`: validate the rules; replay one over history.

`check` compiles every rule, active or not, exactly as the engine would, and names each problem;
it fails (exit 1) only when an active rule is invalid, because that rule is being skipped.
`backtest` replays a rule's condition (or one given on the command line) over a binding's stored
telemetry with the engine's own state machine and lists the events it would have written. It
runs in a READ ONLY transaction: no event, rule state or outbox row is ever written by it.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final, cast
from zoneinfo import ZoneInfo

import psycopg
import structlog

from config.settings import Settings
from iothub import exitcodes
from rules_engine.evaluate import step as evaluator
from rules_engine.model import actions as actions_model
from rules_engine.model import conditions, rule_json, templates
from rules_engine.model.conditions import InvalidRule
from schema import db
from schema import sql as queries_mod
from schema.types import DataType

log = structlog.get_logger(__name__)
queries = queries_mod.load("rules_engine", "commands.sql")

FETCH_ROWS: Final = 5000  # readings per round trip of the server-side cursor
CURSOR_NAME: Final = "iothub_backtest"
# A backtest runs no action, and a rule's broken action must not hide what its condition does.
BACKTEST_ACTION: Final = {"type": "notify", "channel": "log"}
ADHOC_RULE_ID: Final = 0  # the id a --condition that is not a stored rule is compiled under
ADHOC_RULE_NAME: Final = "--condition"
COLUMN_GAP: Final = "  "


class UsageError(Exception):
    """The command line does not say what to backtest."""


class NotFound(Exception):
    """The rule or binding to backtest does not exist."""


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
class Binding:
    device_metric_id: int
    serial_id: str
    metric: str
    data_type: str

    @property
    def label(self) -> str:
        return f"{self.serial_id}/{self.metric} (device_metric {self.device_metric_id})"


# ---------------------------------------------------------------------------------------------
# Command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="rules_command", required=True, metavar="SUBCOMMAND")
    sub.add_parser(
        "check",
        help="validate every rule, active and inactive",
        description="Compile every rule as the engine does and print one line per rule. "
        "Exit 1 when an active rule is invalid (the engine is skipping it).",
    )
    backtest = sub.add_parser(
        "backtest",
        help="replay a rule over stored telemetry; list the events it would have written",
        description="Replay a condition over one binding's stored telemetry in device-time "
        "order and list the events it would have written. Writes nothing. The replay starts "
        "from a fresh state at --since; times without an offset are in the configured "
        "time zone.",
    )
    backtest.add_argument("--rule", type=int, metavar="ID", help="the stored rule to replay")
    backtest.add_argument(
        "--condition",
        metavar="JSON",
        help="a condition to replay (instead of the rule's, when --rule is given too)",
    )
    backtest.add_argument(
        "--device-metric", type=int, metavar="ID", help="the binding to replay on (no --rule)"
    )
    backtest.add_argument("--device", metavar="SERIAL", help="with --metric: the binding")
    backtest.add_argument("--metric", metavar="TYPE", help="with --device: the binding")
    backtest.add_argument("--since", metavar="ISO", help="first reading time (inclusive)")
    backtest.add_argument("--until", metavar="ISO", help="end of the replay (exclusive)")


def main(settings: Settings, args: argparse.Namespace) -> int:
    if args.rules_command == "check":
        return _with_connection(settings, "rules-check", check)
    try:
        plan = BacktestPlan.from_args(args, settings.tz)
    except UsageError as exc:
        print(f"iothub rules backtest: {exc}", file=sys.stderr)
        return exitcodes.USAGE
    return _with_connection(
        settings, "rules-backtest", lambda conn: backtest(conn, plan, settings.tz)
    )


def connect_read_only(settings: Settings, purpose: str) -> psycopg.Connection:
    """A connection whose every transaction is READ ONLY: the server refuses any write."""
    conn = db.connect(settings, purpose)
    # Both commands only read; for a backtest this is the promise that nothing is written.
    conn.read_only = True
    return conn


def _with_connection(
    settings: Settings, purpose: str, run: Callable[[psycopg.Connection], int]
) -> int:
    try:
        conn = connect_read_only(settings, purpose)
    except psycopg.OperationalError as exc:
        log.error("db_unavailable", error=str(exc).strip())
        return exitcodes.CONNECTION_FAILED
    with conn:
        return run(conn)


# ---------------------------------------------------------------------------------------------
# check


def check_rule(rule: RuleRow) -> tuple[bool, str]:
    """(valid, what to print after the rule's label)."""
    try:
        compiled, _condition = rule_json.compile_stored(
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


def check(conn: psycopg.Connection) -> int:
    with conn.transaction():
        rules = [RuleRow(*row) for row in conn.execute(queries["rules_to_check"])]
    invalid = invalid_active = 0
    for rule in rules:
        valid, verdict = check_rule(rule)
        print(f"{rule.label}: {verdict}")
        if not valid:
            invalid += 1
            invalid_active += rule.is_active
    active = sum(rule.is_active for rule in rules)
    summary = (
        f"{len(rules)} rule(s) checked ({active} active, {len(rules) - active} inactive): "
        f"{len(rules) - invalid} ok, {invalid} invalid"
    )
    if invalid:
        summary += f" ({invalid_active} of them active)"
    print(summary)
    return exitcodes.FAILURE if invalid_active else exitcodes.OK


# ---------------------------------------------------------------------------------------------
# backtest


def parse_time(text: str, option: str, tz: ZoneInfo) -> datetime:
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise UsageError(
            f"{option}: not an ISO 8601 time (e.g. 2026-01-27T12:00:00Z): {text!r}"
        ) from None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=tz)


@dataclass(frozen=True)
class BacktestPlan:
    """What to replay, on which binding, over which period: the command line, checked."""

    rule_id: int | None
    condition: Any  # parsed JSON of --condition; None: the rule's own
    device_metric_id: int | None
    device: str | None
    metric: str | None
    since: datetime | None
    until: datetime | None

    @classmethod
    def from_args(cls, args: argparse.Namespace, tz: ZoneInfo) -> BacktestPlan:
        condition = None
        if args.condition is not None:
            try:
                condition = rule_json.parse(args.condition)
            except rule_json.RuleJsonError as exc:
                if exc.reason == rule_json.BAD_JSON:
                    raise UsageError(f"--condition is not valid JSON: {exc}") from None
                raise UsageError(f"--condition is not accepted ({exc.reason}): {exc}") from None
        by_names = args.device is not None or args.metric is not None
        if by_names and (args.device is None or args.metric is None):
            raise UsageError("--device and --metric go together")
        bindings = sum((args.rule is not None, args.device_metric is not None, by_names))
        if args.rule is None and args.condition is None:
            raise UsageError(
                "say what to replay: --rule ID, or --condition JSON with --device-metric ID "
                "or --device SERIAL --metric TYPE"
            )
        if bindings != 1:
            raise UsageError(
                "name the binding exactly once: --rule ID (its own), --device-metric ID, or "
                "--device SERIAL --metric TYPE"
            )
        since = parse_time(args.since, "--since", tz) if args.since else None
        until = parse_time(args.until, "--until", tz) if args.until else None
        if since is not None and until is not None and since >= until:
            raise UsageError(
                f"--since {since.isoformat()} is not before --until {until.isoformat()}"
            )
        return cls(args.rule, condition, args.device_metric, args.device, args.metric, since, until)


@dataclass
class Replayed:
    """What went through the replay, counted on the way (the readings are not kept)."""

    readings: int = 0
    first: datetime | None = None
    last: datetime | None = None
    transitions: list[evaluator.Transition] = field(default_factory=list)
    status: str = "ok"  # the state machine's status at the end


def _one(conn: psycopg.Connection, query: str, params: dict[str, Any]) -> tuple[Any, ...] | None:
    return conn.execute(queries[query], params).fetchone()


def _resolve(conn: psycopg.Connection, plan: BacktestPlan) -> tuple[RuleRow | None, Binding]:
    if plan.rule_id is not None:
        found = _one(conn, "rule_by_id", {"rule_id": plan.rule_id})
        if found is None:
            raise NotFound(f"no rule with id {plan.rule_id}")
        rule = RuleRow(*found)
        return rule, Binding(rule.device_metric_id, rule.serial_id, rule.metric, rule.data_type)
    if plan.device_metric_id is not None:
        found = _one(conn, "binding_by_id", {"device_metric_id": plan.device_metric_id})
        if found is None:
            raise NotFound(f"no device_metric with id {plan.device_metric_id}")
        return None, Binding(*found)
    found = _one(conn, "binding_by_names", {"serial_id": plan.device, "metric": plan.metric})
    if found is None:
        raise NotFound(f"device {plan.device!r} has no metric {plan.metric!r}")
    return None, Binding(*found)


def _readings(
    conn: psycopg.Connection, binding: Binding, plan: BacktestPlan, seen: Replayed
) -> Iterator[evaluator.Reading]:
    with conn.cursor(name=CURSOR_NAME) as cursor:
        cursor.itersize = FETCH_ROWS
        cursor.execute(
            queries["telemetry"],
            {
                "device_metric_id": binding.device_metric_id,
                "since": plan.since,
                "until": plan.until,
                "data_type": binding.data_type,
            },
        )
        for ts, value in cursor:
            seen.readings += 1
            seen.first = seen.first or ts
            seen.last = ts
            yield evaluator.Reading(ts, value)


def replay(
    conn: psycopg.Connection,
    rule: evaluator.CompiledRule,
    binding: Binding,
    plan: BacktestPlan,
    tz: ZoneInfo,
) -> Replayed:
    """The events the engine would have written for these readings, from a fresh state."""
    seen = Replayed()
    state, transitions = evaluator.replay(rule, _readings(conn, binding, plan, seen), tz)
    # The live timer would also have fired for a silence after the last reading.
    end = plan.until or datetime.now(UTC)
    timer = evaluator.check_no_data(rule, state, end, tz)
    seen.transitions = [*transitions, *timer.transitions]
    seen.status = timer.state.status
    return seen


def backtest(conn: psycopg.Connection, plan: BacktestPlan, tz: ZoneInfo) -> int:
    with conn.transaction():
        try:
            rule_row, binding = _resolve(conn, plan)
        except NotFound as exc:
            print(f"iothub rules backtest: {exc}", file=sys.stderr)
            return exitcodes.FAILURE
        rule_id = rule_row.id if rule_row else ADHOC_RULE_ID
        name = rule_row.name if rule_row else ADHOC_RULE_NAME
        subject = rule_row.label if rule_row else f"--condition on {binding.label}"
        try:
            condition = (
                plan.condition
                if plan.condition is not None
                else rule_json.parse_rule(rule_id, cast(RuleRow, rule_row).condition, None)[0]
            )
            compiled = evaluator.compile_rule(
                rule_id, name, condition, BACKTEST_ACTION, cast(DataType, binding.data_type)
            )
        except InvalidRule as exc:
            print(f"{subject}: INVALID: {exc.detail}", file=sys.stderr)
            return exitcodes.FAILURE
        if rule_row is not None and plan.condition is not None:
            subject += " with the condition given"
        print(f"backtest of {subject}: {conditions.describe(compiled.condition)}")
        replayed = replay(conn, compiled, binding, plan, tz)
    print_events(replayed.transitions, tz)
    print(summary(replayed, tz))
    return exitcodes.OK


# ---------------------------------------------------------------------------------------------
# Output


def _value(value: evaluator.Value | None) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return conditions.show(value)
    return conditions.format_number(value)


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """Left-aligned columns; the last one is not padded (reasons are long)."""
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header) - 1)]
    return [
        COLUMN_GAP.join([*(cell.ljust(w) for cell, w in zip(row, widths, strict=False)), row[-1]])
        for row in [header, *rows]
    ]


def print_events(transitions: Sequence[evaluator.Transition], tz: ZoneInfo) -> None:
    if not transitions:
        return
    rows = [
        (t.kind, t.ts.astimezone(tz).isoformat(), _value(t.value), t.reason) for t in transitions
    ]
    for line in table(("KIND", "DEVICE TIME", "VALUE", "REASON"), rows):
        print(line)


def summary(replayed: Replayed, tz: ZoneInfo) -> str:
    kinds = [t.kind for t in replayed.transitions]
    counts = ", ".join(f"{kinds.count(kind)} {kind}" for kind in ("triggered", "resolved"))
    period = ""
    if replayed.first is not None and replayed.last is not None:
        first, last = (
            moment.astimezone(tz).isoformat() for moment in (replayed.first, replayed.last)
        )
        period = f" ({first} .. {last})"
    return (
        f"{len(kinds)} event(s) ({counts}) from {replayed.readings} reading(s){period}; "
        f"final state {replayed.status}; nothing was written"
    )


__all__ = [
    "BacktestPlan",
    "NotFound",
    "UsageError",
    "add_arguments",
    "backtest",
    "check",
    "check_rule",
    "connect_read_only",
    "main",
]
