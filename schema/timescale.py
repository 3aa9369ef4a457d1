"""Turning `telemetries` into a TimescaleDB hypertable: the steps, the checks, the run.

The seed's six steps and the aggregates' eight (schema/timescale.sql, blocks step_1 ..
step_14), in one transaction, so a failure at any step leaves the database exactly as it was,
then two that cannot run in a transaction (blocks step_15, step_16, "_after_commit"):

1. install the extension          4. enable compression, segmented by device_metric_id, ts DESC
2. drop the id-only primary key   5. compress chunks older than 30 days
3. hypertable on ts, 7-day chunks 6. drop chunks older than 1 year
7-10. replace the plain view telemetry_hourly by a continuous aggregate, refresh and retention
11-14. the same for telemetry_daily
15-16. after the commit, materialize the history of each aggregate this run created

Checks first: the extension must be available on the server, `telemetries` must exist, and
nothing runs when it is already a hypertable unless forced. `setup()` and `dry_run()` return what
happened as values and print nothing; `iothub setup-timescaledb` (iothub/cli/setup_timescaledb.py)
reports them and chooses the exit code. Creating a hypertable cannot be undone without copying
the data out and back (docs/timescaledb.md).
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from typing import Final

import psycopg
import structlog
from psycopg import sql
from psycopg.errors import Diagnostic

from config import settings as settings_mod
from config.settings import Settings
from schema import locks
from schema import sql as queries_mod

log = structlog.get_logger(__name__)

queries = queries_mod.load("schema", "timescale.sql")

_STEP_BLOCK = re.compile(r"^step_(\d+)_([a-z_]+?)(_after_commit)?$")


@dataclass(frozen=True)
class Step:
    number: int
    name: str
    sql: str
    done_sql: str | None = None  # returns true when the step's effect is already in place
    # Runs after the transaction of the others has committed, and only if its done_sql was
    # false before the first step ran (TimescaleDB refuses a refresh in a transaction block).
    after_commit: bool = False

    @property
    def one_line(self) -> str:
        """The statement on one line, comments dropped and whitespace collapsed."""
        return one_line(self.sql)


def one_line(sql: str) -> str:
    """SQL without whole-line comments, with single spaces and no padding inside parentheses."""
    kept = (line for line in sql.splitlines() if not line.lstrip().startswith("--"))
    text = " ".join(" ".join(kept).split())
    return re.sub(r"\s+\)", ")", re.sub(r"\(\s+", "(", text))


@dataclass(frozen=True)
class AggregatePolicy:
    """The continuous aggregates' refresh and retention intervals, in seconds (the aggregate_*
    settings); the defaults are the settings' defaults."""

    hourly_refresh_interval: float = settings_mod.DEFAULT_HOURLY_REFRESH_INTERVAL
    hourly_refresh_window: float = settings_mod.DEFAULT_HOURLY_REFRESH_WINDOW
    daily_refresh_interval: float = settings_mod.DEFAULT_DAILY_REFRESH_INTERVAL
    daily_refresh_window: float = settings_mod.DEFAULT_DAILY_REFRESH_WINDOW
    aggregate_retention: float = settings_mod.DEFAULT_AGGREGATE_RETENTION

    @classmethod
    def from_settings(cls, settings: Settings) -> AggregatePolicy:
        return cls(
            hourly_refresh_interval=settings.aggregate_hourly_refresh_interval,
            hourly_refresh_window=settings.aggregate_hourly_refresh_window,
            daily_refresh_interval=settings.aggregate_daily_refresh_interval,
            daily_refresh_window=settings.aggregate_daily_refresh_window,
            aggregate_retention=settings.aggregate_retention,
        )

    def literals(self) -> dict[str, sql.Composable]:
        """The steps' placeholders, each an interval literal such as '3 days'."""
        return {name: sql.Literal(interval_text(seconds)) for name, seconds in vars(self).items()}


def interval_text(seconds: float) -> str:
    """An interval in the largest whole unit of days, hours, minutes ('3 days', '15 minutes'),
    else in seconds, so that `--dry-run` reads as the settings are meant."""
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds >= size and seconds % size == 0:
            count = int(seconds // size)
            return f"{count} {unit}{'' if count == 1 else 's'}"
    return f"{seconds:g} seconds"


def steps(policy: AggregatePolicy | None = None) -> tuple[Step, ...]:
    """The steps in the order they run, with the policy's intervals put in."""
    values = (policy or AggregatePolicy()).literals()
    found = []
    for name in queries:
        match = _STEP_BLOCK.match(name)
        if match:
            number = int(match.group(1))
            text = queries[name]
            if "{" in text:
                # Literals composed by psycopg, from numbers: nothing in them comes as SQL text.
                text = sql.SQL(text).format(**values).as_string(None)
            found.append(
                Step(
                    number,
                    match.group(2),
                    text,
                    queries.get(f"done_step_{number}"),
                    after_commit=match.group(3) is not None,
                )
            )
    found.sort(key=lambda step: step.number)
    if [step.number for step in found] != list(range(1, len(found) + 1)):
        raise RuntimeError("timescale.sql: the steps must be numbered 1..n without gaps")
    return tuple(found)


def dry_run_lines(policy: AggregatePolicy | None = None) -> list[str]:
    """What `--dry-run` prints: one numbered line per step."""
    return [f"{step.number}. {step.one_line};" for step in steps(policy)]


@dataclass(frozen=True)
class State:
    available_version: str | None  # None: the server does not have the extension at all
    installed_version: str | None  # None: not installed in this database
    telemetries_exists: bool
    is_hypertable: bool
    aggregates_exist: bool = False  # telemetry_hourly and telemetry_daily are continuous aggregates

    @property
    def set_up(self) -> bool:
        """Nothing left to do: the hypertable and both continuous aggregates are in place."""
        return self.is_hypertable and self.aggregates_exist


def read_state(conn: psycopg.Connection) -> State:
    available = conn.execute(queries["extension_available"]).fetchone()
    installed = conn.execute(queries["extension_installed"]).fetchone()
    exists = conn.execute(queries["telemetries_exists"]).fetchone()
    is_hypertable = aggregates_exist = False
    if installed is not None and exists is not None and exists[0]:
        row = conn.execute(queries["is_hypertable"]).fetchone()
        is_hypertable = bool(row and row[0])
        aggregates_exist = _is_true(conn, queries["aggregates_exist"])
    return State(
        available_version=available[0] if available else None,
        installed_version=installed[0] if installed else None,
        telemetries_exists=bool(exists and exists[0]),
        is_hypertable=is_hypertable,
        aggregates_exist=aggregates_exist,
    )


def _log_skipped(step: Step) -> None:
    log.info(
        "timescaledb_step_skipped", number=step.number, step=step.name, reason="already in place"
    )


def _in_place(conn: psycopg.Connection, step: Step, before: State) -> bool:
    """Whether an after-commit step's effect was in place before this run's first step: its
    done_sql, asked before the steps ran (it reads TimescaleDB's catalogue, so without the
    extension installed nothing of it can be in place)."""
    if step.done_sql is None or before.installed_version is None:
        return False
    return _is_true(conn, step.done_sql)


def _is_true(conn: psycopg.Connection, query: str) -> bool:
    row = conn.execute(query).fetchone()
    return bool(row and row[0])


def first_line(exc: BaseException) -> str:
    """The first line of an error's message (its type when the message is empty)."""
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def log_notice(diag: Diagnostic) -> None:
    """A notice handler for the setup's connection."""
    # TimescaleDB explains itself in notices ("migrating data to chunks", "already a hypertable,
    # skipping"): pass them on as events instead of losing them.
    log.info("postgres_notice", severity=diag.severity, message=diag.message_primary)


UNAVAILABLE: Final = (
    "the TimescaleDB extension is not available on this database server "
    "(not in pg_available_extensions); install it on the server, or keep using plain PostgreSQL"
)


class Outcome(enum.Enum):
    DONE = "done"  # the steps ran (or were in place) and committed
    ALREADY = "already"  # hypertable and aggregates in place already, no force: nothing ran
    UNAVAILABLE = "unavailable"  # the server does not have the extension
    TELEMETRIES_MISSING = "telemetries_missing"  # the schema is not migrated
    FAILED = "failed"  # a statement failed: everything rolled back


@dataclass(frozen=True)
class Failure:
    error: psycopg.Error
    step: Step | None  # the step that failed; None: before the steps (the checks, the lock)

    @property
    def server_gone(self) -> bool:
        """OperationalError: the server went away or gave up (lock timeout, shutdown, cancel)."""
        return isinstance(self.error, psycopg.OperationalError)

    def fields(self) -> dict[str, object]:
        """The failure as log fields."""
        exc = self.error
        found: dict[str, object] = {
            "error": (exc.diag.message_primary or first_line(exc)),
            "sqlstate": exc.sqlstate,
            "step": self.step.number if self.step else None,
            "step_name": self.step.name if self.step else None,
            # A step after the commit fails alone: the committed steps stay.
            "rolled_back": not (self.step and self.step.after_commit),
        }
        if exc.diag.message_hint:
            found["hint"] = exc.diag.message_hint
        elif self.step and self.step.after_commit:
            found["hint"] = f"the setup is committed; run by hand: {self.step.one_line}"
        return found


@dataclass(frozen=True)
class SetupResult:
    outcome: Outcome
    state: State | None = None  # None: the failure came before the state was read
    ran: tuple[int, ...] = ()  # numbers of the steps that ran (the others were in place)
    failure: Failure | None = None


@dataclass(frozen=True)
class DryRunResult:
    state: State
    lines: tuple[str, ...]  # what would run, one numbered line per step; () when nothing would


def dry_run(
    conn: psycopg.Connection, *, force: bool, policy: AggregatePolicy | None = None
) -> DryRunResult:
    """What `setup()` would run, read in a read-only transaction; changes nothing.

    Raises psycopg.OperationalError when the server cannot be read."""
    with conn.transaction():
        conn.execute("SET TRANSACTION READ ONLY")
        state = read_state(conn)
    if state.set_up and not force:
        return DryRunResult(state, ())
    return DryRunResult(state, tuple(dry_run_lines(policy)))


def setup(
    conn: psycopg.Connection, *, force: bool, policy: AggregatePolicy | None = None
) -> SetupResult:
    """Run the steps in one transaction, under the setup's advisory lock (`conn` in autocommit
    mode); a failure at any step rolls all of them back."""
    current: Step | None = None
    state: State | None = None
    ran: list[int] = []
    later: list[Step] = []  # the after-commit steps due in this run
    try:
        with conn.transaction():
            conn.execute(queries["lock_setup"], {"key": locks.TIMESCALE_SETUP})
            state = read_state(conn)
            if state.available_version is None:
                return SetupResult(Outcome.UNAVAILABLE, state)
            if not state.telemetries_exists:
                return SetupResult(Outcome.TELEMETRIES_MISSING, state)
            if state.installed_version is None:
                log.info(
                    "timescaledb_not_installed",
                    available_version=state.available_version,
                    detail="step 1 installs it",
                )
            elif state.set_up and not force:
                return SetupResult(Outcome.ALREADY, state)
            planned = steps(policy)
            # Asked before any step runs: steps 8 and 12 would put their effect in place.
            later = [s for s in planned if s.after_commit and not _in_place(conn, s, state)]
            for step in planned:
                current = step
                if step.after_commit:
                    if step not in later:
                        _log_skipped(step)
                    continue
                if step.done_sql is not None and _is_true(conn, step.done_sql):
                    _log_skipped(step)
                    continue
                log.debug("timescaledb_step", number=step.number, step=step.name)
                conn.execute(step.sql)
                ran.append(step.number)
            current = None
        for step in later:
            current = step
            log.debug("timescaledb_step", number=step.number, step=step.name, after_commit=True)
            conn.execute(step.sql)
            ran.append(step.number)
        current = None
    except psycopg.Error as exc:
        return SetupResult(Outcome.FAILED, state, failure=Failure(exc, current))
    return SetupResult(Outcome.DONE, state, tuple(ran))


__all__ = [
    "UNAVAILABLE",
    "AggregatePolicy",
    "DryRunResult",
    "Failure",
    "Outcome",
    "SetupResult",
    "State",
    "Step",
    "dry_run",
    "dry_run_lines",
    "first_line",
    "interval_text",
    "log_notice",
    "one_line",
    "read_state",
    "setup",
    "steps",
]
