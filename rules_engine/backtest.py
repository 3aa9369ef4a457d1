"""The logic of `iothub rules backtest`: replay a rule's condition (or one given on the command
line) over a binding's stored telemetry with the engine's own state machine, and return the
events it would have written. The caller's connection is READ ONLY (iothub/cli/rules.py opens
it so): no event, rule state or outbox row is ever written by it."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final, cast
from zoneinfo import ZoneInfo

import psycopg

from rules_engine.check import RuleRow
from rules_engine.evaluate import replay, step
from rules_engine.evaluate.compile import CompiledRule, compile_rule
from rules_engine.evaluate.step import Reading, Transition
from rules_engine.model import conditions, rule_json
from rules_engine.model.conditions import InvalidRule
from schema import sql
from schema.types import DataType

queries = sql.load("rules_engine", "commands.sql")  # shared with check.py

FETCH_ROWS: Final = 5000  # readings per round trip of the server-side cursor
CURSOR_NAME: Final = "iothub_backtest"
# A backtest runs no action, and a rule's broken action must not hide what its condition does.
BACKTEST_ACTION: Final = {"type": "notify", "channel": "log"}
ADHOC_RULE_ID: Final = 0  # the id a --condition that is not a stored rule is compiled under
ADHOC_RULE_NAME: Final = "--condition"


class UsageError(Exception):
    """The command line does not say what to backtest."""


class NotFound(Exception):
    """The rule or binding to backtest does not exist."""


@dataclass(frozen=True)
class Binding:
    device_metric_id: int
    serial_id: str
    metric: str
    data_type: str

    @property
    def label(self) -> str:
        return f"{self.serial_id}/{self.metric} (device_metric {self.device_metric_id})"


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
    def build(
        cls,
        tz: ZoneInfo,
        *,
        rule: int | None = None,
        condition: str | None = None,
        device_metric: int | None = None,
        device: str | None = None,
        metric: str | None = None,
        since: str | None = None,
        until: str | None = None,
    ) -> BacktestPlan:
        """The plan from the command line's options; raises UsageError."""
        parsed = None
        if condition is not None:
            try:
                parsed = rule_json.parse(condition)
            except rule_json.RuleJsonError as exc:
                if exc.reason == rule_json.BAD_JSON:
                    raise UsageError(f"--condition is not valid JSON: {exc}") from None
                raise UsageError(f"--condition is not accepted ({exc.reason}): {exc}") from None
        by_names = device is not None or metric is not None
        if by_names and (device is None or metric is None):
            raise UsageError("--device and --metric go together")
        bindings = sum((rule is not None, device_metric is not None, by_names))
        if rule is None and condition is None:
            raise UsageError(
                "say what to replay: --rule ID, or --condition JSON with --device-metric ID "
                "or --device SERIAL --metric TYPE"
            )
        if bindings != 1:
            raise UsageError(
                "name the binding exactly once: --rule ID (its own), --device-metric ID, or "
                "--device SERIAL --metric TYPE"
            )
        start = parse_time(since, "--since", tz) if since else None
        end = parse_time(until, "--until", tz) if until else None
        if start is not None and end is not None and start >= end:
            raise UsageError(f"--since {start.isoformat()} is not before --until {end.isoformat()}")
        return cls(rule, parsed, device_metric, device, metric, start, end)


@dataclass
class Replayed:
    """What went through the replay, counted on the way (the readings are not kept)."""

    readings: int = 0
    first: datetime | None = None
    last: datetime | None = None
    transitions: list[Transition] = field(default_factory=list)
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
) -> Iterator[Reading]:
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
            yield Reading(ts, value)


def run_replay(
    conn: psycopg.Connection,
    rule: CompiledRule,
    binding: Binding,
    plan: BacktestPlan,
    tz: ZoneInfo,
) -> Replayed:
    """The events the engine would have written for these readings, from a fresh state."""
    seen = Replayed()
    state, transitions = replay.replay(rule, _readings(conn, binding, plan, seen), tz)
    # The live timer would also have fired for a silence after the last reading.
    end = plan.until or datetime.now(UTC)
    timer = step.check_no_data(rule, state, end, tz)
    seen.transitions = [*transitions, *timer.transitions]
    seen.status = timer.state.status
    return seen


class Unreplayable(Exception):
    """The condition to replay is invalid."""

    def __init__(self, subject: str, detail: str) -> None:
        super().__init__(f"{subject}: INVALID: {detail}")
        self.subject = subject
        self.detail = detail


@dataclass(frozen=True)
class Backtest:
    subject: str  # what was replayed on what, for the heading
    condition: str  # the condition, described
    replayed: Replayed


def backtest(conn: psycopg.Connection, plan: BacktestPlan, tz: ZoneInfo) -> Backtest:
    """Replay the plan in one READ ONLY transaction (the connection's); raises NotFound or
    Unreplayable."""
    with conn.transaction():
        rule_row, binding = _resolve(conn, plan)
        rule_id = rule_row.id if rule_row else ADHOC_RULE_ID
        name = rule_row.name if rule_row else ADHOC_RULE_NAME
        subject = rule_row.label if rule_row else f"--condition on {binding.label}"
        try:
            condition = (
                plan.condition
                if plan.condition is not None
                else rule_json.parse_rule(rule_id, cast(RuleRow, rule_row).condition, None)[0]
            )
            compiled = compile_rule(
                rule_id, name, condition, BACKTEST_ACTION, cast(DataType, binding.data_type)
            )
        except InvalidRule as exc:
            raise Unreplayable(subject, exc.detail) from None
        if rule_row is not None and plan.condition is not None:
            subject += " with the condition given"
        replayed = run_replay(conn, compiled, binding, plan, tz)
    return Backtest(subject, conditions.describe(compiled.condition), replayed)
