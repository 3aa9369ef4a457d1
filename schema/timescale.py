"""`iothub setup-timescaledb [--dry-run] [--force]`: turn `telemetries` into a hypertable.

The seed's six steps (schema/timescale.sql, blocks step_1 .. step_6), in one transaction, so a
failure at any step leaves the database exactly as it was:

1. install the extension          4. enable compression, segmented by device_metric_id, ts DESC
2. drop the id-only primary key   5. compress chunks older than 30 days
3. hypertable on ts, 7-day chunks 6. drop chunks older than 1 year

Checks first, as the original command did: the extension must be available on the server (else
exit EXTENSION_UNAVAILABLE with one line); a notice when it is available but not installed yet;
nothing to do when `telemetries` is already a hypertable, unless `--force`. `--dry-run` prints
the steps, one numbered line each, and changes nothing. Creating a hypertable cannot be undone
without copying the data out and back (docs/timescaledb.md).
"""

from __future__ import annotations

import argparse
import re
import time
from dataclasses import dataclass
from typing import Final

import psycopg
import structlog
from psycopg.errors import Diagnostic

from config.settings import Settings
from iothub import exitcodes
from schema import db, locks
from schema import sql as queries_mod

log = structlog.get_logger(__name__)

queries = queries_mod.load("schema", "timescale.sql")

_STEP_BLOCK = re.compile(r"^step_(\d+)_([a-z_]+)$")


@dataclass(frozen=True)
class Step:
    number: int
    name: str
    sql: str
    done_sql: str | None = None  # returns true when the step's effect is already in place

    @property
    def one_line(self) -> str:
        """The statement on one line, comments dropped and whitespace collapsed."""
        return one_line(self.sql)


def one_line(sql: str) -> str:
    """SQL without whole-line comments, with single spaces and no padding inside parentheses."""
    kept = (line for line in sql.splitlines() if not line.lstrip().startswith("--"))
    text = " ".join(" ".join(kept).split())
    return re.sub(r"\s+\)", ")", re.sub(r"\(\s+", "(", text))


def steps() -> tuple[Step, ...]:
    """The six steps in the order they run."""
    found = []
    for name in queries:
        match = _STEP_BLOCK.match(name)
        if match:
            number = int(match.group(1))
            found.append(
                Step(
                    number,
                    match.group(2),
                    queries[name],
                    queries.get(f"done_step_{number}"),
                )
            )
    found.sort(key=lambda step: step.number)
    if [step.number for step in found] != list(range(1, len(found) + 1)):
        raise RuntimeError("timescale.sql: the steps must be numbered 1..n without gaps")
    return tuple(found)


def dry_run_lines() -> list[str]:
    """What `--dry-run` prints: one numbered line per step."""
    return [f"{step.number}. {step.one_line};" for step in steps()]


@dataclass(frozen=True)
class State:
    available_version: str | None  # None: the server does not have the extension at all
    installed_version: str | None  # None: not installed in this database
    telemetries_exists: bool
    is_hypertable: bool


def read_state(conn: psycopg.Connection) -> State:
    available = conn.execute(queries["extension_available"]).fetchone()
    installed = conn.execute(queries["extension_installed"]).fetchone()
    exists = conn.execute(queries["telemetries_exists"]).fetchone()
    is_hypertable = False
    if installed is not None and exists is not None and exists[0]:
        row = conn.execute(queries["is_hypertable"]).fetchone()
        is_hypertable = bool(row and row[0])
    return State(
        available_version=available[0] if available else None,
        installed_version=installed[0] if installed else None,
        telemetries_exists=bool(exists and exists[0]),
        is_hypertable=is_hypertable,
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dry-run", action="store_true", help="print the SQL steps, one per line; change nothing"
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="run the steps even if telemetries is already a hypertable",
    )


def _is_true(conn: psycopg.Connection, query: str) -> bool:
    row = conn.execute(query).fetchone()
    return bool(row and row[0])


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def _log_notice(diag: Diagnostic) -> None:
    # TimescaleDB explains itself in notices ("migrating data to chunks", "already a hypertable,
    # skipping"): pass them on as events instead of losing them.
    log.info("postgres_notice", severity=diag.severity, message=diag.message_primary)


UNAVAILABLE: Final = (
    "the TimescaleDB extension is not available on this database server "
    "(not in pg_available_extensions); install it on the server, or keep using plain PostgreSQL"
)


def main(settings: Settings, args: argparse.Namespace) -> int:
    debug = bool(getattr(args, "debug", False))
    try:
        conn = db.connect(settings, "setup-timescaledb", autocommit=True)
    except psycopg.OperationalError as exc:
        log.error("db_unavailable", error=_first_line(exc))
        return exitcodes.CONNECTION_FAILED
    conn.add_notice_handler(_log_notice)
    with conn:
        if args.dry_run:
            return _dry_run(conn, force=args.force)
        return _setup(conn, force=args.force, debug=debug)


def _dry_run(conn: psycopg.Connection, *, force: bool) -> int:
    try:
        with conn.transaction():
            conn.execute("SET TRANSACTION READ ONLY")
            state = read_state(conn)
    except psycopg.OperationalError as exc:
        log.error("db_unavailable", error=_first_line(exc))
        return exitcodes.CONNECTION_FAILED
    # A dry run shows what would run; what would stop a real run is said, not enforced.
    if state.available_version is None:
        log.warning(
            "timescaledb_unavailable",
            detail=UNAVAILABLE,
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
    if state.is_hypertable and not force:
        log.info("timescaledb_already_set_up", dry_run=True)
        print("telemetries is already a hypertable: nothing would run (--force runs the steps)")
        return exitcodes.OK
    for line in dry_run_lines():
        print(line)
    log.info("timescaledb_dry_run", steps=len(steps()), forced=force)
    return exitcodes.OK


def _setup(conn: psycopg.Connection, *, force: bool, debug: bool) -> int:
    started = time.monotonic()
    current: Step | None = None
    try:
        with conn.transaction():
            conn.execute(queries["lock_setup"], {"key": locks.TIMESCALE_SETUP})
            state = read_state(conn)
            if state.available_version is None:
                log.error("timescaledb_unavailable", detail=UNAVAILABLE)
                return exitcodes.EXTENSION_UNAVAILABLE
            if not state.telemetries_exists:
                log.error("telemetries_missing", hint="run `iothub migrate` first")
                return exitcodes.FAILURE
            if state.installed_version is None:
                log.info(
                    "timescaledb_not_installed",
                    available_version=state.available_version,
                    detail="step 1 installs it",
                )
            elif state.is_hypertable and not force:
                log.info("timescaledb_already_set_up", version=state.installed_version)
                print(
                    "telemetries is already a hypertable: nothing to do "
                    "(--force runs the steps again)"
                )
                return exitcodes.OK
            ran: list[int] = []
            for step in steps():
                current = step
                if step.done_sql is not None and _is_true(conn, step.done_sql):
                    log.info(
                        "timescaledb_step_skipped",
                        number=step.number,
                        step=step.name,
                        reason="already in place",
                    )
                    continue
                log.debug("timescaledb_step", number=step.number, step=step.name)
                conn.execute(step.sql)
                ran.append(step.number)
            current = None
    except psycopg.Error as exc:
        failure = {
            "error": (exc.diag.message_primary or _first_line(exc)),
            "sqlstate": exc.sqlstate,
            "step": current.number if current else None,
            "step_name": current.name if current else None,
            "rolled_back": True,
        }
        if exc.diag.message_hint:
            failure["hint"] = exc.diag.message_hint
        event = "timescaledb_setup_failed"
        # OperationalError: the server went away or gave up (lock timeout, shutdown, cancel).
        code = (
            exitcodes.CONNECTION_FAILED
            if isinstance(exc, psycopg.OperationalError)
            else exitcodes.FAILURE
        )
        if debug:
            log.exception(event, **failure)
        else:
            log.error(event, **failure)
        return code
    log.info(
        "timescaledb_setup_done",
        forced=force and state.is_hypertable,
        steps=len(steps()),
        ran=ran,
        ms=round((time.monotonic() - started) * 1000),
    )
    print(
        "telemetries is a hypertable: 7-day chunks, compressed after 30 days, dropped after 1 year"
    )
    return exitcodes.OK


__all__ = [
    "State",
    "Step",
    "add_arguments",
    "dry_run_lines",
    "main",
    "one_line",
    "read_state",
    "steps",
]
