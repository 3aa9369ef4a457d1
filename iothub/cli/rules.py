"""`iothub rules check` and `iothub rules backtest`: the command line of rules_engine/check.py
and rules_engine/backtest.py. This module parses the options, opens the READ ONLY connection,
prints what those return, and maps it to exit codes."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import Final
from zoneinfo import ZoneInfo

import psycopg
import structlog

from config.settings import Settings
from iothub import exitcodes
from rules_engine import backtest, check
from rules_engine.evaluate.state import Value
from rules_engine.evaluate.step import Transition
from rules_engine.model import conditions
from schema import db

log = structlog.get_logger(__name__)

COLUMN_GAP: Final = "  "


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
        return _with_connection(settings, "rules-check", run_check)
    try:
        plan = backtest.BacktestPlan.build(
            settings.tz,
            rule=args.rule,
            condition=args.condition,
            device_metric=args.device_metric,
            device=args.device,
            metric=args.metric,
            since=args.since,
            until=args.until,
        )
    except backtest.UsageError as exc:
        print(f"iothub rules backtest: {exc}", file=sys.stderr)
        return exitcodes.USAGE
    return _with_connection(
        settings, "rules-backtest", lambda conn: run_backtest(conn, plan, settings.tz)
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


def run_check(conn: psycopg.Connection) -> int:
    report = check.check(conn)
    for verdict in report.verdicts:
        print(f"{verdict.rule.label}: {verdict.text}")
    total, active, invalid = len(report.verdicts), report.active, report.invalid
    summary = (
        f"{total} rule(s) checked ({active} active, {total - active} inactive): "
        f"{total - invalid} ok, {invalid} invalid"
    )
    if invalid:
        summary += f" ({report.invalid_active} of them active)"
    print(summary)
    return exitcodes.FAILURE if report.invalid_active else exitcodes.OK


def run_backtest(conn: psycopg.Connection, plan: backtest.BacktestPlan, tz: ZoneInfo) -> int:
    try:
        result = backtest.backtest(conn, plan, tz)
    except backtest.NotFound as exc:
        print(f"iothub rules backtest: {exc}", file=sys.stderr)
        return exitcodes.FAILURE
    except backtest.Unreplayable as exc:
        print(str(exc), file=sys.stderr)
        return exitcodes.FAILURE
    print(f"backtest of {result.subject}: {result.condition}")
    print_events(result.replayed.transitions, tz)
    print(summary(result.replayed, tz))
    return exitcodes.OK


def _value(value: Value | None) -> str:
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


def print_events(transitions: Sequence[Transition], tz: ZoneInfo) -> None:
    if not transitions:
        return
    rows = [
        (t.kind, t.ts.astimezone(tz).isoformat(), _value(t.value), t.reason) for t in transitions
    ]
    for line in table(("KIND", "DEVICE TIME", "VALUE", "REASON"), rows):
        print(line)


def summary(replayed: backtest.Replayed, tz: ZoneInfo) -> str:
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
