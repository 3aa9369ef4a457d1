"""`iothub setup-timescaledb [--dry-run] [--force]`: turn `telemetries` into a hypertable and
`telemetry_hourly` / `telemetry_daily` into continuous aggregates.

The work is schema/timescale.py's (fourteen steps in one transaction, two after it); this module
reports its
outcome and chooses the exit code. The extension must be available on the server (else exit
EXTENSION_UNAVAILABLE with one line); a notice when it is available but not installed yet;
nothing to do when `telemetries` is already a hypertable with both aggregates, unless `--force`
(a hypertable set up before the aggregates existed gets them from a plain rerun). `--dry-run` prints
the steps, one numbered line each, and changes nothing.
"""

from __future__ import annotations

import argparse
import time

import psycopg
import structlog

from config.settings import Settings
from iothub import exitcodes
from schema import db, timescale
from schema.timescale import Outcome

log = structlog.get_logger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dry-run", action="store_true", help="print the SQL steps, one per line; change nothing"
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="run the steps even if telemetries is already a hypertable",
    )


def main(settings: Settings, args: argparse.Namespace) -> int:
    debug = bool(getattr(args, "debug", False))
    try:
        conn = db.connect(settings, "setup-timescaledb", autocommit=True)
    except psycopg.OperationalError as exc:
        log.error("db_unavailable", error=timescale.first_line(exc))
        return exitcodes.CONNECTION_FAILED
    conn.add_notice_handler(timescale.log_notice)
    policy = timescale.AggregatePolicy.from_settings(settings)
    with conn:
        if args.dry_run:
            return _dry_run(conn, force=args.force, policy=policy)
        return _setup(conn, force=args.force, debug=debug, policy=policy)


def _dry_run(conn: psycopg.Connection, *, force: bool, policy: timescale.AggregatePolicy) -> int:
    try:
        result = timescale.dry_run(conn, force=force, policy=policy)
    except psycopg.OperationalError as exc:
        log.error("db_unavailable", error=timescale.first_line(exc))
        return exitcodes.CONNECTION_FAILED
    state = result.state
    # A dry run shows what would run; what would stop a real run is said, not enforced.
    if state.available_version is None:
        log.warning(
            "timescaledb_unavailable",
            detail=timescale.UNAVAILABLE,
            real_run_exit=exitcodes.EXTENSION_UNAVAILABLE,
        )
    elif state.installed_version is None:
        log.info(
            "timescaledb_not_installed",
            available_version=state.available_version,
            detail="step 1 would install it",
        )
    if not state.telemetries_exists:
        log.warning("telemetries_missing", hint="run `iothub migrate` first")
    if not result.lines:
        log.info("timescaledb_already_set_up", dry_run=True)
        print(
            "telemetries is already a hypertable with its continuous aggregates: nothing would "
            "run (--force runs the steps)"
        )
        return exitcodes.OK
    for line in result.lines:
        print(line)
    log.info("timescaledb_dry_run", steps=len(result.lines), forced=force)
    return exitcodes.OK


def _setup(
    conn: psycopg.Connection, *, force: bool, debug: bool, policy: timescale.AggregatePolicy
) -> int:
    started = time.monotonic()
    result = timescale.setup(conn, force=force, policy=policy)
    state = result.state
    if result.outcome is Outcome.UNAVAILABLE:
        log.error("timescaledb_unavailable", detail=timescale.UNAVAILABLE)
        return exitcodes.EXTENSION_UNAVAILABLE
    if result.outcome is Outcome.TELEMETRIES_MISSING:
        log.error("telemetries_missing", hint="run `iothub migrate` first")
        return exitcodes.FAILURE
    if result.outcome is Outcome.ALREADY:
        log.info("timescaledb_already_set_up", version=state.installed_version if state else None)
        print(
            "telemetries is already a hypertable with its continuous aggregates: nothing to do "
            "(--force runs the steps again)"
        )
        return exitcodes.OK
    if result.failure is not None:
        failure = result.failure
        if debug:  # the traceback of the failed statement goes with the event
            log.error("timescaledb_setup_failed", exc_info=failure.error, **failure.fields())
        else:
            log.error("timescaledb_setup_failed", **failure.fields())
        return exitcodes.CONNECTION_FAILED if failure.server_gone else exitcodes.FAILURE
    log.info(
        "timescaledb_setup_done",
        forced=force and state is not None and state.is_hypertable,
        steps=len(timescale.steps()),
        ran=list(result.ran),
        ms=round((time.monotonic() - started) * 1000),
    )
    print(
        "telemetries is a hypertable: 7-day chunks, compressed after 30 days, dropped after 1 year"
    )
    print(
        "telemetry_hourly and telemetry_daily are continuous aggregates (real-time), kept "
        f"{timescale.interval_text(policy.aggregate_retention)}"
    )
    return exitcodes.OK
