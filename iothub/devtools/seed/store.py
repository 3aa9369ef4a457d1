"""The seed in the database: what is seeded already, how it differs, and the writer; `seed()` is
`iothub seed [--force] [--dry-run]` (the command itself, iothub/cli/seed.py, prints its report).

Users, metrics, devices, bindings, a few days of telemetry ending now, rules in the original
forms, and the events those rules write over that telemetry. Seeded rows are recognised by their
natural keys only, so the command never reads, changes or deletes anybody else's rows:

- nothing seeded yet: everything is inserted, in one transaction (telemetry with COPY);
- the database holds exactly the seeded data: "already seeded", nothing changes, exit 0;
- some seeded row exists but differs: refused (exit REFUSED) with what differs, nothing changes;
- `--force`: users, metrics, devices and bindings are upserted; the seeded rules (with their
  events) and the seeded bindings' telemetry are deleted and written again;
- `--dry-run`: the data set is validated and counted, the plan is read from the database, and
  nothing is written.
The data set itself and its checks are dataset.py.
"""

from __future__ import annotations

import time as timer
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final
from zoneinfo import ZoneInfo

import psycopg
import structlog
from psycopg.types.json import Jsonb

from config.settings import Settings
from iothub import exitcodes
from iothub.devtools.seed import passwords
from iothub.devtools.seed.data import (
    BINDINGS,
    DEVICES,
    METRICS,
    RULES,
    USERS,
)
from iothub.devtools.seed.dataset import (
    DATA_TYPES,
    BindingKey,
    Dataset,
    build,
    dataset_problems,
    spec_problems,
)
from rules_engine.model import rule_json
from schema import db, locks
from schema import sql as queries_mod

log = structlog.get_logger(__name__)

queries = queries_mod.load("iothub.devtools.seed", "seed.sql")

MAX_LISTED_DIFFERENCES: Final = 5  # differences named in a refusal; the rest are counted


# ---------------------------------------------------------------------------------------------
# What the database holds


@dataclass(frozen=True)
class StoredRule:
    id: int
    device_metric_id: int
    name: str
    description: str | None
    condition: Any
    action: Any
    is_active: bool

    @classmethod
    def from_row(cls, row: tuple[Any, ...]) -> StoredRule:
        """The documents come as text and are decoded within bounds: one a user made hostile
        (nested thousands deep) only differs from the seed's, it cannot stop the command."""
        rule_id, device_metric_id, name, description, condition, action, is_active = row
        return cls(
            rule_id,
            device_metric_id,
            name,
            description,
            _document(condition),
            _document(action),
            is_active,
        )


def _document(text: str | None) -> Any:
    try:
        return rule_json.parse(text)
    except rule_json.RuleJsonError as exc:
        return f"<unreadable: {exc.reason}>"  # never equal to a seeded document


@dataclass(frozen=True)
class Found:
    """The seeded rows present in the database, found by natural key."""

    users: Mapping[str, tuple[int, str, str, str]]  # username -> id, email, role, password
    email_conflicts: tuple[tuple[str, str], ...]  # (username, email) held by someone else
    metrics: Mapping[str, tuple[int, str, str]]  # lower(type) -> id, metric_type, data_type
    devices: Mapping[str, tuple[int, str, str | None, str | None, bool]]  # id, name, descr...
    bindings: Mapping[BindingKey, int]
    rules: tuple[StoredRule, ...]

    @property
    def anything(self) -> bool:
        return bool(self.users or self.metrics or self.devices or self.bindings or self.rules)


def find_seeded(conn: psycopg.Connection) -> Found:
    usernames = [u.username for u in USERS]
    users = {
        row[1]: (row[0], row[2], row[3], row[4])
        for row in conn.execute(queries["seeded_users"], {"usernames": usernames})
    }
    conflicts = tuple(
        (row[0], row[1])
        for row in conn.execute(
            queries["email_conflicts"],
            {"usernames": usernames, "emails": [u.email for u in USERS]},
        )
    )
    metrics = {
        row[1].lower(): (row[0], row[1], row[2])
        for row in conn.execute(
            queries["seeded_metrics"], {"metric_types": [m.metric_type for m in METRICS]}
        )
    }
    devices = {
        row[1]: (row[0], row[2], row[3], row[4], row[5])
        for row in conn.execute(
            queries["seeded_devices"], {"serials": [d.serial_id for d in DEVICES]}
        )
    }
    bindings = {
        (row[1], row[2]): row[0]
        for row in conn.execute(
            queries["seeded_bindings"],
            {
                "serials": [b.serial_id for b in BINDINGS],
                "metric_types": [b.metric for b in BINDINGS],
            },
        )
    }
    pairs = [
        (bindings[(r.serial_id, r.metric)], r.name)
        for r in RULES
        if (r.serial_id, r.metric) in bindings
    ]
    rules = tuple(
        StoredRule.from_row(row)
        for row in conn.execute(
            queries["seeded_rules"],
            {"binding_ids": [p[0] for p in pairs], "names": [p[1] for p in pairs]},
        )
    )
    return Found(users, conflicts, metrics, devices, bindings, rules)


def differences(conn: psycopg.Connection, found: Found, tz: ZoneInfo) -> list[str]:
    """How the seeded rows in the database differ from the data set (empty: exactly seeded)."""
    diffs = _catalogue_differences(found)
    rule_ids: dict[tuple[str, str, str], int] = {}
    diffs += _rule_differences(found, rule_ids)
    if diffs:
        return diffs  # telemetry and events only mean something once the catalogue matches
    return _history_differences(conn, found, rule_ids, tz)


def _catalogue_differences(found: Found) -> list[str]:
    """Users, metrics, devices and bindings."""
    diffs: list[str] = []
    for user in USERS:
        stored = found.users.get(user.username)
        if stored is None:
            diffs.append(f"user {user.username} is missing")
            continue
        _, email, role, password = stored
        if (email, role) != (user.email, user.role):
            diffs.append(f"user {user.username}: email or role differs")
        elif not passwords.check_password(user.password, password):
            diffs.append(f"user {user.username}: password differs")
    for metric in METRICS:
        stored_metric = found.metrics.get(metric.metric_type.lower())
        if stored_metric is None:
            diffs.append(f"metric {metric.metric_type} is missing")
        elif stored_metric[1:] != (metric.metric_type, metric.data_type):
            diffs.append(f"metric {metric.metric_type}: spelling or data_type differs")
    for device in DEVICES:
        stored_device = found.devices.get(device.serial_id)
        if stored_device is None:
            diffs.append(f"device {device.serial_id} is missing")
        elif stored_device[1:] != (device.name, device.description, device.owner, device.is_active):
            diffs.append(
                f"device {device.serial_id}: name, description, owner or is_active differs"
            )
    diffs += [
        f"binding {binding.serial_id}/{binding.metric} is missing"
        for binding in BINDINGS
        if (binding.serial_id, binding.metric) not in found.bindings
    ]
    return diffs


def _rule_differences(found: Found, rule_ids: dict[tuple[str, str, str], int]) -> list[str]:
    """The seeded rules; each that matches has its id put in `rule_ids`."""
    diffs: list[str] = []
    by_key: dict[tuple[int, str], list[StoredRule]] = {}
    for stored_rule in found.rules:
        by_key.setdefault((stored_rule.device_metric_id, stored_rule.name), []).append(stored_rule)
    for rule in RULES:
        binding_id = found.bindings.get((rule.serial_id, rule.metric))
        same = by_key.get((binding_id, rule.name), []) if binding_id is not None else []
        where = f"rule {rule.name!r} on {rule.serial_id}/{rule.metric}"
        if not same:
            diffs.append(f"{where} is missing")
        elif len(same) > 1:
            diffs.append(f"{where} exists {len(same)} times")
        elif (same[0].description, same[0].condition, same[0].action, same[0].is_active) != (
            rule.description,
            rule.condition,
            rule.action,
            rule.is_active,
        ):
            diffs.append(f"{where}: description, condition, action or is_active differs")
        else:
            rule_ids[(rule.serial_id, rule.metric, rule.name)] = same[0].id
    return diffs


def _history_differences(
    conn: psycopg.Connection,
    found: Found,
    rule_ids: Mapping[tuple[str, str, str], int],
    tz: ZoneInfo,
) -> list[str]:
    key_of = {binding_id: key for key, binding_id in found.bindings.items()}
    stored: dict[BindingKey, list[tuple[datetime, Any]]] = {key: [] for key in found.bindings}
    rows = conn.execute(queries["seeded_telemetry"], {"binding_ids": list(key_of)})
    for binding_id, ts, value in rows:
        stored[key_of[binding_id]].append((ts, value))
    last = max((series[-1][0] for series in stored.values() if series), default=None)
    if last is None:
        return ["the seeded bindings have no telemetry"]
    if last.second or last.microsecond:
        return [
            f"the seeded bindings have telemetry at {last.isoformat()} that the seed did not write"
        ]
    # The seed's telemetry ends at the time of its run: rebuild the data set for that time.
    expected = build(last, tz)
    diffs: list[str] = []
    for (serial_id, metric), series in expected.readings.items():
        want = [(r.ts, r.jsonb(DATA_TYPES[metric])) for r in series]
        if stored[(serial_id, metric)] != want:
            diffs.append(f"telemetry of {serial_id}/{metric} differs from the seeded readings")
    want_events = sorted(
        (
            (
                rule_ids[(e.serial_id, e.metric, e.rule_name)],
                "triggered",
                e.ts,
                found.bindings[(e.serial_id, e.metric)],
                e.context,
            )
            for e in expected.events
        ),
        key=lambda row: row[:4],
    )
    got_events = sorted(
        (
            tuple(row)
            for row in conn.execute(queries["seeded_events"], {"rule_ids": list(rule_ids.values())})
        ),
        key=lambda row: row[:4],
    )
    if got_events != want_events:
        diffs.append("events of the seeded rules differ from the seeded events")
    return diffs


# ---------------------------------------------------------------------------------------------
# Writing


def write(conn: psycopg.Connection, found: Found, dataset: Dataset) -> dict[str, int]:
    """Insert or refresh the seeded rows; returns what was deleted. Call inside a transaction."""
    user_ids: dict[str, int] = {}
    for user in USERS:
        stored = found.users.get(user.username)
        # Keep a hash that still verifies: re-hashing would change the row for nothing.
        if stored is not None and passwords.check_password(user.password, stored[3]):
            encoded = stored[3]
        else:
            encoded = passwords.hash_password(user.password)
        user_ids[user.username] = _returning_id(
            conn,
            "upsert_user",
            {
                "username": user.username,
                "email": user.email,
                "password": encoded,
                "role": user.role,
            },
        )
    metric_ids = {
        m.metric_type: _returning_id(
            conn,
            "upsert_metric",
            {
                "metric_type": m.metric_type,
                "data_type": m.data_type,
            },
        )
        for m in METRICS
    }
    device_ids = {
        d.serial_id: _returning_id(
            conn,
            "upsert_device",
            {
                "serial_id": d.serial_id,
                "name": d.name,
                "description": d.description,
                "user_id": user_ids[d.owner],
                "is_active": d.is_active,
            },
        )
        for d in DEVICES
    }
    binding_ids = {
        (b.serial_id, b.metric): _returning_id(
            conn,
            "ensure_binding",
            {
                "device_id": device_ids[b.serial_id],
                "metric_id": metric_ids[b.metric],
            },
        )
        for b in BINDINGS
    }
    deleted_rules = conn.execute(
        queries["delete_rules"], {"rule_ids": [r.id for r in found.rules]}
    ).rowcount
    deleted_telemetry = conn.execute(
        queries["delete_telemetry"], {"binding_ids": list(binding_ids.values())}
    ).rowcount
    rule_ids = {
        (r.serial_id, r.metric, r.name): _returning_id(
            conn,
            "insert_rule",
            {
                "name": r.name,
                "description": r.description,
                "condition": Jsonb(r.condition),
                "action": Jsonb(r.action),
                "is_active": r.is_active,
                "device_metric_id": binding_ids[(r.serial_id, r.metric)],
            },
        )
        for r in RULES
    }
    with conn.cursor() as cur, cur.copy(queries["copy_telemetry"]) as copy:
        copy.set_types(["int4", "timestamptz", "jsonb"])
        for (serial_id, metric), series in dataset.readings.items():
            binding_id = binding_ids[(serial_id, metric)]
            data_type = DATA_TYPES[metric]
            for reading in series:
                copy.write_row((binding_id, reading.ts, reading.jsonb(data_type)))
    with conn.cursor() as cur:
        cur.executemany(
            queries["insert_event"],
            [
                {
                    "ts": e.ts,
                    "rule_id": rule_ids[(e.serial_id, e.metric, e.rule_name)],
                    "device_metric_id": binding_ids[(e.serial_id, e.metric)],
                    "context": Jsonb(e.context),
                }
                for e in dataset.events
            ],
        )
    return {"rules": max(deleted_rules, 0), "telemetries": max(deleted_telemetry, 0)}


def _returning_id(conn: psycopg.Connection, name: str, params: Mapping[str, object]) -> int:
    row = conn.execute(queries[name], params).fetchone()
    if row is None:
        raise RuntimeError(f"{name} returned no row")
    return int(row[0])


# ---------------------------------------------------------------------------------------------
# Seeding


@dataclass(frozen=True)
class Outcome:
    """What one seed did: its exit code and the lines of its report (the command prints them)."""

    code: int
    report: tuple[str, ...] = ()


def count_lines(counts: Mapping[str, int]) -> tuple[str, ...]:
    width = max(len(name) for name in counts)
    digits = max(len(str(n)) for n in counts.values())
    return tuple(f"{name:<{width}}  {n:>{digits}}" for name, n in counts.items())


def _summary(counts: Mapping[str, int]) -> str:
    return ", ".join(f"{n} {name}" for name, n in counts.items())


def seed(
    settings: Settings, *, force: bool = False, dry_run: bool = False, debug: bool = False
) -> Outcome:
    """Seed the configured database (or, with `dry_run`, check and plan only)."""
    problems = spec_problems()
    if problems:
        log.error("seed_data_invalid", problems=problems)
        return Outcome(exitcodes.FAILURE)
    try:
        conn = db.connect(settings, "seed", autocommit=True)
    except psycopg.OperationalError as exc:
        # The data set can still be checked without a database; only the plan needs one.
        report = _dry_run_offline(settings) if dry_run else ()
        log.error("db_unavailable", error=str(exc).strip().splitlines()[0])
        return Outcome(exitcodes.CONNECTION_FAILED, report)
    started = timer.monotonic()
    try:
        with conn:
            if dry_run:
                return _dry_run(conn, settings, force=force)
            return _seed(conn, settings, force=force, started=started)
    except psycopg.errors.UndefinedTable as exc:
        log.error(
            "seed_failed",
            error=exc.diag.message_primary or str(exc),
            hint="run `iothub migrate` first",
        )
        return Outcome(exitcodes.FAILURE)
    except psycopg.OperationalError as exc:
        log.error("db_unavailable", error=str(exc).strip().splitlines()[0])
        return Outcome(exitcodes.CONNECTION_FAILED)
    except psycopg.Error as exc:
        if debug:
            log.exception("seed_failed", sqlstate=exc.sqlstate)
        else:
            log.error(
                "seed_failed",
                sqlstate=exc.sqlstate,
                error=exc.diag.message_primary or str(exc).strip().splitlines()[0],
            )
        return Outcome(exitcodes.FAILURE)


def _server_now(conn: psycopg.Connection) -> datetime:
    # The server's clock, not ours: the seed's "last 24 hours" query runs on the server.
    row = conn.execute(queries["server_now"]).fetchone()
    if row is None:
        raise RuntimeError("now() returned no row")
    moment: datetime = row[0]
    return moment


def _checked_dataset(end: datetime, tz: ZoneInfo) -> Dataset | None:
    dataset = build(end, tz)
    problems = dataset_problems(dataset)
    if problems:
        log.error("seed_data_invalid", problems=problems)
        return None
    return dataset


def _dry_run_offline(settings: Settings) -> tuple[str, ...]:
    end = datetime.now(UTC).replace(second=0, microsecond=0)
    dataset = _checked_dataset(end, settings.tz)
    return count_lines(dataset.counts()) if dataset is not None else ()


def _dry_run(conn: psycopg.Connection, settings: Settings, *, force: bool) -> Outcome:
    dataset = _checked_dataset(_server_now(conn), settings.tz)
    if dataset is None:
        return Outcome(exitcodes.FAILURE)
    with conn.transaction():
        conn.execute("SET TRANSACTION READ ONLY")
        found = find_seeded(conn)
        if found.email_conflicts:
            plan = "fail: a seeded email belongs to another user"
        elif not found.anything:
            plan = "insert: nothing seeded yet"
        elif force:
            plan = "refresh: replace the seeded rows (--force)"
        else:
            diffs = differences(conn, found, settings.tz)
            plan = "nothing: already seeded" if not diffs else f"refuse: {diffs[0]}"
    log.info("seed_dry_run", plan=plan.split(":", 1)[0], **dataset.counts())
    return Outcome(exitcodes.OK, (*count_lines(dataset.counts()), f"plan: {plan}"))


def _seed(conn: psycopg.Connection, settings: Settings, *, force: bool, started: float) -> Outcome:
    with conn.transaction():
        conn.execute(queries["lock_seed"], {"key": locks.SEED})
        found = find_seeded(conn)
        if found.email_conflicts:
            username, email = found.email_conflicts[0]
            log.error(
                "seed_conflict",
                email=email,
                held_by=username,
                detail="a seeded email belongs to a user the seed does not own; "
                "rename that user's email first",
            )
            return Outcome(exitcodes.FAILURE)
        if found.anything and not force:
            diffs = differences(conn, found, settings.tz)
            if not diffs:
                log.info("seed_already_done")
                return Outcome(exitcodes.OK, ("already seeded: nothing to do",))
            log.error(
                "seed_refused",
                reason="seeded rows exist and differ from the data set; "
                "`iothub seed --force` refreshes them (and only them)",
                differences=diffs[:MAX_LISTED_DIFFERENCES],
                more=max(len(diffs) - MAX_LISTED_DIFFERENCES, 0),
            )
            return Outcome(exitcodes.REFUSED)
        dataset = _checked_dataset(_server_now(conn), settings.tz)
        if dataset is None:
            return Outcome(exitcodes.FAILURE)
        deleted = write(conn, found, dataset)
    counts = dataset.counts()
    log.info(
        "seed_done",
        mode="refresh" if found.anything else "insert",
        deleted_rules=deleted["rules"],
        deleted_telemetries=deleted["telemetries"],
        ms=round((timer.monotonic() - started) * 1000),
        **counts,
    )
    return Outcome(exitcodes.OK, (f"seeded: {_summary(counts)}",))
