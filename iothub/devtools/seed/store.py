"""`iothub seed [--force] [--dry-run]`: the original project's development data set.

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

The sample events are not invented: they are what the rule engine's own evaluator writes when it
replays each seeded rule over the seeded telemetry (`rules_engine.evaluator.replay`).
"""

from __future__ import annotations

import argparse
import math
import random
import time as timer
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Final
from zoneinfo import ZoneInfo

import psycopg
import structlog
from psycopg.types.json import Jsonb
from pydantic import JsonValue

from config.settings import Settings
from iothub import exitcodes
from iothub.devtools.seed import passwords
from iothub.devtools.seed.data import (
    BINDINGS,
    DAYS,
    DEVICES,
    INCIDENTS,
    METRICS,
    RANDOM_SEED,
    RULES,
    USERS,
    BindingSpec,
    Constant,
    Cycle,
    DayActivity,
    IncidentSpec,
    Value,
)
from rules_engine.evaluate import step as evaluator
from rules_engine.model import actions as actions_model
from rules_engine.model import conditions, rule_json, templates
from schema import db, locks, types
from schema import sql as queries_mod
from schema.types import DataType

log = structlog.get_logger(__name__)

queries = queries_mod.load("iothub.devtools.seed", "seed.sql")

INCIDENT_MARGIN: Final = timedelta(minutes=30)  # an incident ends at least this long before "now"
MAX_LISTED_DIFFERENCES: Final = 5  # differences named in a refusal; the rest are counted
DEFAULT_DECIMALS: Final = 2  # decimal places of numeric values that have no Cycle profile

BindingKey = tuple[str, str]  # (serial_id, metric_type)


class SeedDataInvalid(Exception):
    """The seed data set is inconsistent."""


# ---------------------------------------------------------------------------------------------
# The data set, as values


@dataclass(frozen=True)
class Reading:
    ts: datetime
    value: Value

    def jsonb(self, data_type: DataType) -> dict[str, JsonValue]:
        """The stored form of the value: `{"t": <data_type>, "v": <value>}`."""
        return {"t": data_type, "v": self.value}


@dataclass(frozen=True)
class SampleEvent:
    serial_id: str
    metric: str
    rule_name: str
    ts: datetime
    context: dict[str, JsonValue]


@dataclass(frozen=True)
class Dataset:
    """Everything `iothub seed` writes for one end time ("now", rounded down to the minute)."""

    end: datetime
    readings: Mapping[BindingKey, tuple[Reading, ...]]  # per binding, oldest first
    events: tuple[SampleEvent, ...]

    @property
    def telemetry_count(self) -> int:
        return sum(len(series) for series in self.readings.values())

    def counts(self) -> dict[str, int]:
        return {
            "users": len(USERS),
            "metrics": len(METRICS),
            "devices": len(DEVICES),
            "device_metrics": len(BINDINGS),
            "rules": len(RULES),
            "events": len(self.events),
            "telemetries": self.telemetry_count,
        }


DATA_TYPES: Final[Mapping[str, DataType]] = {m.metric_type: m.data_type for m in METRICS}
DEVICE_NAMES: Final[Mapping[str, str]] = {d.serial_id: d.name for d in DEVICES}


def _decimals(binding: BindingSpec) -> int:
    return binding.profile.decimals if isinstance(binding.profile, Cycle) else DEFAULT_DECIMALS


def _rng(*parts: object) -> random.Random:
    # A str seed is hashed with SHA-512 by `random`, so it is stable across processes and
    # PYTHONHASHSEED: the same end time always gives the same values.
    return random.Random("/".join([RANDOM_SEED, *(str(p) for p in parts)]))


def _base_series(binding: BindingSpec, end: datetime, tz: ZoneInfo) -> dict[datetime, Value]:
    step = timedelta(minutes=binding.interval_minutes)
    count = DAYS * 24 * 60 // binding.interval_minutes
    times = [end - step * k for k in reversed(range(count))]
    rng = _rng(binding.serial_id, binding.metric)
    profile = binding.profile
    series: dict[datetime, Value] = {}
    if isinstance(profile, Cycle):
        wander = 0.0
        for ts in times:
            local = ts.astimezone(tz)
            hour = local.hour + local.minute / 60
            daily = profile.amplitude * math.cos(2 * math.pi * (hour - profile.peak_hour) / 24)
            wander = profile.persistence * wander + rng.gauss(0.0, profile.noise)
            series[ts] = round(profile.base + daily + wander, profile.decimals)
    elif isinstance(profile, DayActivity):
        for ts in times:
            draw = rng.random()  # drawn for every reading, so night readings shift nothing
            in_day = profile.day_start <= ts.astimezone(tz).time() < profile.day_end
            series[ts] = in_day and draw < profile.probability
    else:
        for ts in times:
            series[ts] = profile.value
    return series


def incident_start(incident: IncidentSpec, end: datetime, tz: ZoneInfo) -> datetime:
    """When an incident starts, for data ending at `end`."""
    if incident.minutes_before_end is not None:
        return end - timedelta(minutes=incident.minutes_before_end)
    if incident.at_local is None:
        raise SeedDataInvalid(f"incident on {incident.serial_id}/{incident.metric} has no time")
    duration = timedelta(minutes=incident.duration_minutes)
    day = end.astimezone(tz).date()
    while True:
        start = datetime.combine(day, incident.at_local, tzinfo=tz).astimezone(UTC)
        if start + duration <= end - INCIDENT_MARGIN:
            return start
        day -= timedelta(days=1)


def _apply_incident(
    index: int,
    incident: IncidentSpec,
    *,
    series: dict[BindingKey, dict[datetime, Value]],
    end: datetime,
    tz: ZoneInfo,
    decimals: int,
) -> None:
    start = incident_start(incident, end, tz)
    stop = start + timedelta(minutes=incident.duration_minutes)
    rng = _rng("incident", index)
    key = (incident.serial_id, incident.metric)

    def value() -> Value:
        if isinstance(incident.value, int | float) and not isinstance(incident.value, bool):
            jitter = rng.uniform(-incident.jitter, incident.jitter) if incident.jitter else 0.0
            return round(incident.value + jitter, decimals)
        return incident.value

    target = series[key]
    for ts in sorted(t for t in target if start <= t < stop):
        target[ts] = value()
    for n in range(1, incident.burst_count + 1):
        ts = start + timedelta(seconds=incident.burst_seconds * n)
        if ts not in target:
            target[ts] = value()
    for metric in incident.silences:
        other = series[(incident.serial_id, metric)]
        for ts in [t for t in other if start <= t < stop]:
            del other[ts]


def _sample_events(
    readings: Mapping[BindingKey, tuple[Reading, ...]], tz: ZoneInfo
) -> tuple[SampleEvent, ...]:
    events: list[SampleEvent] = []
    for rule in RULES:
        key = (rule.serial_id, rule.metric)
        compiled = evaluator.compile_rule(
            0, rule.name, rule.condition, rule.action, DATA_TYPES[rule.metric]
        )
        template = actions_model.message_template(compiled.action)
        _, transitions = evaluator.replay(
            compiled, (evaluator.Reading(r.ts, r.value) for r in readings[key]), tz
        )
        for transition in transitions:
            if transition.kind != "triggered":
                continue
            message = templates.render(
                template,
                {
                    "device_name": DEVICE_NAMES[rule.serial_id],
                    "serial_id": rule.serial_id,
                    "metric": rule.metric,
                    "value": transition.value,
                    "ts": transition.ts,
                    "rule_name": rule.name,
                },
            )
            # The same keys the rule engine writes, so seeded events look like live ones.
            context: dict[str, JsonValue] = {
                "value": transition.value,
                "ts": transition.ts.isoformat(),
                "message": message,
                "reason": transition.reason,
                "serial_id": rule.serial_id,
                "metric": rule.metric,
            }
            events.append(
                SampleEvent(rule.serial_id, rule.metric, rule.name, transition.ts, context)
            )
    events.sort(key=lambda e: (e.ts, e.serial_id, e.metric, e.rule_name))
    return tuple(events)


def build(end: datetime, tz: ZoneInfo) -> Dataset:
    """The data set for telemetry ending at `end` (aware, a whole minute); `tz` places the
    daily cycles and the night-time incidents in local time, as the rules see them."""
    if end.tzinfo is None or end.second or end.microsecond:
        raise ValueError("end must be timezone-aware and a whole minute")
    end = end.astimezone(UTC)
    series = {(b.serial_id, b.metric): _base_series(b, end, tz) for b in BINDINGS}
    decimals = {(b.serial_id, b.metric): _decimals(b) for b in BINDINGS}
    for index, incident in enumerate(INCIDENTS):
        key = (incident.serial_id, incident.metric)
        _apply_incident(index, incident, series=series, end=end, tz=tz, decimals=decimals[key])
    readings = {
        key: tuple(Reading(ts, values[ts]) for ts in sorted(values))
        for key, values in series.items()
    }
    return Dataset(end, readings, _sample_events(readings, tz))


# ---------------------------------------------------------------------------------------------
# Validation


def _duplicates(values: Iterable[object]) -> list[object]:
    return [value for value, n in Counter(values).items() if n > 1]


def spec_problems() -> list[str]:
    """What is inconsistent in the data set's definitions (empty when it is valid)."""
    problems: list[str] = []
    for what, values in (
        ("username", [u.username for u in USERS]),
        ("email", [u.email for u in USERS]),
        ("metric type", [m.metric_type.lower() for m in METRICS]),
        ("serial", [d.serial_id for d in DEVICES]),
        ("binding", [(b.serial_id, b.metric) for b in BINDINGS]),
        ("rule", [(r.serial_id, r.metric, r.name) for r in RULES]),
    ):
        problems += [f"duplicate {what} {value!r}" for value in _duplicates(values)]
    for user in USERS:
        if not user.password:
            problems.append(f"user {user.username}: empty password")
    usernames = {u.username for u in USERS}
    for device in DEVICES:
        if device.owner not in usernames:
            problems.append(f"device {device.serial_id}: unknown owner {device.owner!r}")
    bindings = {(b.serial_id, b.metric): b for b in BINDINGS}
    for binding in BINDINGS:
        where = f"binding {binding.serial_id}/{binding.metric}"
        if binding.serial_id not in DEVICE_NAMES:
            problems.append(f"{where}: unknown device")
        data_type = DATA_TYPES.get(binding.metric)
        if data_type is None:
            problems.append(f"{where}: unknown metric")
            continue
        if not 1 <= binding.interval_minutes <= 24 * 60 or (24 * 60) % binding.interval_minutes:
            problems.append(f"{where}: interval must divide a day")
        profile = binding.profile
        if isinstance(profile, Cycle | DayActivity):
            expected: DataType = "numeric" if isinstance(profile, Cycle) else "boolean"
            if expected != data_type:
                problems.append(f"{where}: a {type(profile).__name__} profile needs {expected}")
        elif isinstance(profile, Constant) and not types.fits(data_type, profile.value):
            problems.append(f"{where}: constant {profile.value!r} is not {data_type}")
    for rule in RULES:
        where = f"rule {rule.name!r} on {rule.serial_id}/{rule.metric}"
        if (rule.serial_id, rule.metric) not in bindings:
            problems.append(f"{where}: no such binding")
            continue
        try:
            conditions.parse_condition(rule.condition, DATA_TYPES[rule.metric])
        except conditions.InvalidRule as exc:
            problems += [f"{where}: {p}" for p in exc.problems]
        try:
            action = actions_model.parse_action(rule.action)
        except conditions.InvalidRule as exc:
            problems += [f"{where}: {p}" for p in exc.problems]
        else:
            unknown = templates.unknown_placeholders(actions_model.message_template(action))
            if unknown:
                problems.append(f"{where}: unknown placeholders {', '.join(unknown)}")
    for incident in INCIDENTS:
        where = f"incident on {incident.serial_id}/{incident.metric}"
        if (incident.serial_id, incident.metric) not in bindings:
            problems.append(f"{where}: no such binding")
            continue
        if (incident.minutes_before_end is None) == (incident.at_local is None):
            problems.append(f"{where}: needs exactly one of minutes_before_end and at_local")
        if not types.fits(DATA_TYPES[incident.metric], incident.value):
            problems.append(f"{where}: value {incident.value!r} does not fit the metric")
        if incident.duration_minutes <= 0:
            problems.append(f"{where}: duration must be positive")
        if incident.minutes_before_end is not None and not (
            incident.duration_minutes * 60 + INCIDENT_MARGIN.total_seconds()
            <= incident.minutes_before_end * 60
            < DAYS * 24 * 3600
        ):
            problems.append(f"{where}: must lie inside the data and end before its last reading")
        for metric in incident.silences:
            if (incident.serial_id, metric) not in bindings:
                problems.append(f"{where}: silences {metric!r}, which the device does not report")
    return problems


def dataset_problems(dataset: Dataset) -> list[str]:
    """What is wrong with a generated data set (empty when it is valid)."""
    problems: list[str] = []
    for (serial_id, metric), series in dataset.readings.items():
        data_type = DATA_TYPES[metric]
        for reading in series:
            if not types.fits(data_type, reading.value):
                problems.append(f"{serial_id}/{metric} at {reading.ts}: {reading.value!r}")
                break
        if series and series[-1].ts > dataset.end:
            problems.append(f"{serial_id}/{metric}: readings after the end of the data set")
    # Every incident is there to make one rule fire once; more or fewer events means a profile
    # strays into a rule's bounds or an incident misses its rule.
    if len(dataset.events) != len(INCIDENTS):
        problems.append(
            f"the rules fire {len(dataset.events)} times over the telemetry, expected one event "
            f"per incident ({len(INCIDENTS)})"
        )
    return problems


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
    for binding in BINDINGS:
        if (binding.serial_id, binding.metric) not in found.bindings:
            diffs.append(f"binding {binding.serial_id}/{binding.metric} is missing")
    by_key: dict[tuple[int, str], list[StoredRule]] = {}
    for stored_rule in found.rules:
        by_key.setdefault((stored_rule.device_metric_id, stored_rule.name), []).append(stored_rule)
    rule_ids: dict[tuple[str, str, str], int] = {}
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
    if diffs:
        return diffs  # telemetry and events only mean something once the catalogue matches
    return _history_differences(conn, found, rule_ids, tz)


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
# The command


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--force",
        action="store_true",
        help="refresh the seeded rows even if they exist or were changed (others are untouched)",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="validate the data set and report counts and the plan; write nothing",
    )


def _print_counts(counts: Mapping[str, int]) -> None:
    width = max(len(name) for name in counts)
    digits = max(len(str(n)) for n in counts.values())
    for name, n in counts.items():
        print(f"{name:<{width}}  {n:>{digits}}")


def _summary(counts: Mapping[str, int]) -> str:
    return ", ".join(f"{n} {name}" for name, n in counts.items())


def main(settings: Settings, args: argparse.Namespace) -> int:
    debug = bool(getattr(args, "debug", False))
    problems = spec_problems()
    if problems:
        log.error("seed_data_invalid", problems=problems)
        return exitcodes.FAILURE
    try:
        conn = db.connect(settings, "seed", autocommit=True)
    except psycopg.OperationalError as exc:
        if args.dry_run:
            # The data set can still be checked without a database; only the plan needs one.
            _dry_run_offline(settings)
        log.error("db_unavailable", error=str(exc).strip().splitlines()[0])
        return exitcodes.CONNECTION_FAILED
    started = timer.monotonic()
    try:
        with conn:
            if args.dry_run:
                return _dry_run(conn, settings, force=args.force)
            return _seed(conn, settings, force=args.force, started=started)
    except psycopg.errors.UndefinedTable as exc:
        log.error(
            "seed_failed",
            error=exc.diag.message_primary or str(exc),
            hint="run `iothub migrate` first",
        )
        return exitcodes.FAILURE
    except psycopg.OperationalError as exc:
        log.error("db_unavailable", error=str(exc).strip().splitlines()[0])
        return exitcodes.CONNECTION_FAILED
    except psycopg.Error as exc:
        if debug:
            log.exception("seed_failed", sqlstate=exc.sqlstate)
        else:
            log.error(
                "seed_failed",
                sqlstate=exc.sqlstate,
                error=exc.diag.message_primary or str(exc).strip().splitlines()[0],
            )
        return exitcodes.FAILURE


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


def _dry_run_offline(settings: Settings) -> None:
    end = datetime.now(UTC).replace(second=0, microsecond=0)
    dataset = _checked_dataset(end, settings.tz)
    if dataset is not None:
        _print_counts(dataset.counts())


def _dry_run(conn: psycopg.Connection, settings: Settings, *, force: bool) -> int:
    dataset = _checked_dataset(_server_now(conn), settings.tz)
    if dataset is None:
        return exitcodes.FAILURE
    _print_counts(dataset.counts())
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
    print(f"plan: {plan}")
    log.info("seed_dry_run", plan=plan.split(":", 1)[0], **dataset.counts())
    return exitcodes.OK


def _seed(conn: psycopg.Connection, settings: Settings, *, force: bool, started: float) -> int:
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
            return exitcodes.FAILURE
        if found.anything and not force:
            diffs = differences(conn, found, settings.tz)
            if not diffs:
                log.info("seed_already_done")
                print("already seeded: nothing to do")
                return exitcodes.OK
            log.error(
                "seed_refused",
                reason="seeded rows exist and differ from the data set; "
                "`iothub seed --force` refreshes them (and only them)",
                differences=diffs[:MAX_LISTED_DIFFERENCES],
                more=max(len(diffs) - MAX_LISTED_DIFFERENCES, 0),
            )
            return exitcodes.REFUSED
        dataset = _checked_dataset(_server_now(conn), settings.tz)
        if dataset is None:
            return exitcodes.FAILURE
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
    print(f"seeded: {_summary(counts)}")
    return exitcodes.OK


__all__ = [
    "Dataset",
    "Found",
    "Reading",
    "SampleEvent",
    "add_arguments",
    "build",
    "dataset_problems",
    "differences",
    "find_seeded",
    "incident_start",
    "main",
    "spec_problems",
    "write",
]
