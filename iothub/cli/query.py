"""`iothub query last` and `iothub query recent`: the seed's two example queries, printed as an
aligned text table (header, rows, a count line), for an operator at a terminal.

- `last --device-metric ID [--limit 100]` (or `--device SERIAL --metric TYPE`): the newest
  readings of one device metric, served by a backward scan of the (device_metric_id, ts) index.
- `recent --device SERIAL_OR_ID [--hours 24]`: every reading of one device over the last hours,
  with its name and metric types.
- `stats --device SERIAL [--metric TYPE] [--bucket hour|day] [--since ISO] [--until ISO]`: one
  device's hourly or daily buckets (readings, min/max/avg, last value) read from
  `telemetry_hourly` / `telemetry_daily`: continuous aggregates on TimescaleDB, plain views over
  `telemetries` elsewhere (schema/migrations/0010_telemetry_buckets.sql). The same query runs on
  both.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Final

import psycopg
import structlog
from psycopg import sql

from config.settings import Settings
from iothub import exitcodes
from iothub.cli import argtypes
from rules_engine import backtest
from schema import db
from schema import sql as queries_mod

log = structlog.get_logger(__name__)

queries = queries_mod.load("iothub.cli", "query.sql")

DEFAULT_LIMIT: Final = 100  # readings, as in the seed's example
DEFAULT_HOURS: Final = 24.0  # hours, as in the seed's example
MAX_LIMIT: Final = 100_000  # readings: more is a job for psql \copy, not for a terminal table
# bucket -> (the view or continuous aggregate, how far back without --since)
AGGREGATES: Final = {
    "hour": ("telemetry_hourly", timedelta(hours=24)),
    "day": ("telemetry_daily", timedelta(days=31)),
}


class TargetNotFound(Exception):
    """No such device or device metric."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="query", required=True, metavar="QUERY")
    last = sub.add_parser(
        "last",
        help="the newest readings of one device metric",
        description="The newest readings of one device metric (a device_metrics row), newest "
        "first. Give --device-metric ID, or --device SERIAL and --metric TYPE.",
    )
    last.add_argument("--device-metric", type=int, metavar="ID", help="device_metrics.id")
    last.add_argument("--device", metavar="SERIAL", help="the device's serial_id")
    last.add_argument("--metric", metavar="TYPE", help="the metric type, e.g. temperature")
    last.add_argument(
        "--limit",
        type=argtypes.count_up_to(MAX_LIMIT),
        default=DEFAULT_LIMIT,
        help=f"how many readings (default {DEFAULT_LIMIT})",
    )
    recent = sub.add_parser(
        "recent",
        help="one device's readings of the last hours, with names",
        description="Every reading of one device over the last hours, newest first, with the "
        "device name and metric type.",
    )
    recent.add_argument(
        "--device",
        required=True,
        metavar="SERIAL_OR_ID",
        help="the device's serial_id, or its numeric id",
    )
    recent.add_argument(
        "--hours",
        type=argtypes.positive,
        default=DEFAULT_HOURS,
        help=f"how far back (default {DEFAULT_HOURS:g})",
    )
    stats = sub.add_parser(
        "stats",
        help="one device's hourly or daily buckets: readings, min/max/avg, last value",
        description="Hourly or daily buckets of one device's metrics, oldest first, read from "
        "telemetry_hourly / telemetry_daily (continuous aggregates on TimescaleDB, plain views "
        "otherwise). Buckets starting in [--since, --until) are shown; by default the last 24 "
        "hours (hour) or 31 days (day). Times without an offset are in the configured time "
        "zone; buckets are cut in UTC.",
    )
    stats.add_argument("--device", required=True, metavar="SERIAL", help="the device's serial_id")
    stats.add_argument("--metric", metavar="TYPE", help="only this metric type")
    stats.add_argument(
        "--bucket", choices=sorted(AGGREGATES), default="hour", help="bucket width (default hour)"
    )
    stats.add_argument("--since", metavar="ISO", help="first bucket start (inclusive)")
    stats.add_argument("--until", metavar="ISO", help="last bucket start (exclusive)")


def _cell(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, datetime):
        return value.isoformat(sep=" ")
    return str(value)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float | Decimal) and not isinstance(value, bool)


def render_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> list[str]:
    """An aligned text table: header, rule, rows (numbers right-aligned), then `(N rows)`."""
    cells = [[_cell(value) for value in row] for row in rows]
    widths = [
        max([len(header)] + [len(row[i]) for row in cells]) for i, header in enumerate(headers)
    ]
    numeric = [
        any(_is_number(row[i]) for row in rows)
        and all(row[i] is None or _is_number(row[i]) for row in rows)
        for i in range(len(headers))
    ]

    def line(values: Sequence[str], align: Sequence[bool]) -> str:
        parts = [
            value.rjust(width) if right else value.ljust(width)
            for value, width, right in zip(values, widths, align, strict=True)
        ]
        return " | ".join(parts).rstrip()

    out = [line(headers, [False] * len(headers)), "-+-".join("-" * w for w in widths)]
    out += [line(row, numeric) for row in cells]
    out.append(f"({len(rows)} {'row' if len(rows) == 1 else 'rows'})")
    return out


def _binding(conn: psycopg.Connection, args: argparse.Namespace) -> tuple[int, str, str]:
    if args.device_metric is not None:
        row = conn.execute(
            queries["binding_by_id"], {"device_metric_id": args.device_metric}
        ).fetchone()
        what = f"device metric {args.device_metric}"
    else:
        row = conn.execute(
            queries["binding_by_names"], {"serial_id": args.device, "metric_type": args.metric}
        ).fetchone()
        what = f"device {args.device!r} with metric {args.metric!r}"
    if row is None:
        raise TargetNotFound(f"no {what}")
    return int(row[0]), str(row[1]), str(row[2])


def _device(conn: psycopg.Connection, device: str) -> tuple[int, str, str]:
    row = conn.execute(queries["device_by_serial"], {"device": device}).fetchone()
    # A serial is tried first: serials are the names operators use, and one may be all digits.
    if row is None and device.isdigit() and int(device) < 2**31:
        row = conn.execute(queries["device_by_id"], {"device_id": int(device)}).fetchone()
    if row is None:
        raise TargetNotFound(f"no device with serial or id {device!r}")
    return int(row[0]), str(row[1]), str(row[2])


def _stats_period(settings: Settings, args: argparse.Namespace) -> tuple[datetime, datetime]:
    """[since, until) from the command line, checked; raises backtest.UsageError."""
    until = (
        backtest.parse_time(args.until, "--until", settings.tz) if args.until else datetime.now(UTC)
    )
    since = (
        backtest.parse_time(args.since, "--since", settings.tz)
        if args.since
        else until - AGGREGATES[args.bucket][1]
    )
    if since >= until:
        raise backtest.UsageError("--since must be before --until")
    return since, until


def _stats(
    conn: psycopg.Connection, args: argparse.Namespace, since: datetime, until: datetime
) -> None:
    device_id, serial_id, name = _device_by_serial(conn, args.device)
    ids = [
        int(row[0])
        for row in conn.execute(
            queries["stats_bindings"], {"device_id": device_id, "metric_type": args.metric}
        ).fetchall()
    ]
    if not ids:
        what = f"metric {args.metric!r}" if args.metric else "metrics"
        raise TargetNotFound(f"device {serial_id!r} has no {what}")
    aggregate = AGGREGATES[args.bucket][0]
    # The aggregate's name comes from our own table, never from the command line as text.
    statement = sql.SQL(queries["bucket_stats"]).format(aggregate=sql.Identifier(aggregate))
    cursor = conn.execute(statement, {"ids": ids, "since": since, "until": until})
    _print(
        f"{serial_id} ({name}, device {device_id}): {aggregate} from {since.isoformat()} "
        f"until {until.isoformat()}",
        cursor,
    )


def _device_by_serial(conn: psycopg.Connection, serial: str) -> tuple[int, str, str]:
    row = conn.execute(queries["device_by_serial"], {"device": serial}).fetchone()
    if row is None:
        raise TargetNotFound(f"no device with serial {serial!r}")
    return int(row[0]), str(row[1]), str(row[2])


def _print(title: str, cursor: psycopg.Cursor[tuple[object, ...]]) -> None:
    headers = [column.name for column in cursor.description or ()]
    rows = cursor.fetchall()
    print(title)
    for text in render_table(headers, rows):
        print(text)


def _one_target(args: argparse.Namespace) -> bool:
    by_id = args.device_metric is not None
    by_names = args.device is not None or args.metric is not None
    complete = args.device is not None and args.metric is not None
    return by_id != by_names and (by_id or complete)


def main(settings: Settings, args: argparse.Namespace) -> int:
    if args.query == "last" and not _one_target(args):
        print(
            "iothub query last: give --device-metric ID, or both --device SERIAL and --metric TYPE",
            file=sys.stderr,
        )
        return exitcodes.USAGE
    since = until = datetime.now(UTC)
    if args.query == "stats":
        try:
            since, until = _stats_period(settings, args)
        except backtest.UsageError as exc:
            print(f"iothub query stats: {exc}", file=sys.stderr)
            return exitcodes.USAGE
    try:
        conn = db.connect(settings, "query", autocommit=True)
    except psycopg.OperationalError as exc:
        log.error("db_unavailable", error=str(exc).strip().splitlines()[0])
        return exitcodes.CONNECTION_FAILED
    with conn:
        try:
            if args.query == "last":
                binding_id, serial_id, metric = _binding(conn, args)
                cursor = conn.execute(
                    queries["last_readings"],
                    {"device_metric_id": binding_id, "limit": args.limit},
                )
                _print(
                    f"{serial_id} / {metric} (device metric {binding_id}): "
                    f"newest {args.limit} readings",
                    cursor,
                )
            elif args.query == "stats":
                _stats(conn, args, since, until)
            else:
                device_id, serial_id, name = _device(conn, args.device)
                cursor = conn.execute(
                    queries["recent_readings"], {"device_id": device_id, "hours": args.hours}
                )
                _print(
                    f"{serial_id} ({name}, device {device_id}): readings of the last "
                    f"{args.hours:g} hours",
                    cursor,
                )
        except TargetNotFound as exc:
            log.error("query_target_not_found", error=str(exc))
            return exitcodes.FAILURE
        except psycopg.OperationalError as exc:
            log.error("db_unavailable", error=str(exc).strip().splitlines()[0])
            return exitcodes.CONNECTION_FAILED
    return exitcodes.OK


__all__ = ["AGGREGATES", "DEFAULT_HOURS", "DEFAULT_LIMIT", "add_arguments", "main", "render_table"]
