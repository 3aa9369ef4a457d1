"""The seed's data set as values, and its checks.

Users, metrics, devices, bindings, a few days of telemetry ending at a given time, rules in the
original forms, and the events those rules write over that telemetry. The sample events are
not invented: they are what the rule engine's own evaluator writes when it replays each seeded
rule over the seeded telemetry (`rules_engine.evaluate.step.replay`). The specification is
iothub/devtools/seed/data.py; what the database holds and the writer are in store.py.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Final
from zoneinfo import ZoneInfo

from pydantic import JsonValue

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
    RuleSpec,
    Value,
)
from rules_engine.evaluate import compile as compile_mod
from rules_engine.evaluate import replay as replay_mod
from rules_engine.evaluate import step as evaluator
from rules_engine.model import actions as actions_model
from rules_engine.model import conditions, templates
from schema import types
from schema.types import DataType

INCIDENT_MARGIN: Final = timedelta(minutes=30)  # an incident ends at least this long before "now"
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
        compiled = compile_mod.compile_rule(
            0, rule.name, rule.condition, rule.action, DATA_TYPES[rule.metric]
        )
        template = actions_model.message_template(compiled.action)
        _, transitions = replay_mod.replay(
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
    bindings = {(b.serial_id, b.metric) for b in BINDINGS}
    for binding in BINDINGS:
        problems += _binding_problems(binding)
    for rule in RULES:
        problems += _rule_problems(rule, bindings)
    for incident in INCIDENTS:
        problems += _incident_problems(incident, bindings)
    return problems


def _binding_problems(binding: BindingSpec) -> list[str]:
    problems: list[str] = []
    where = f"binding {binding.serial_id}/{binding.metric}"
    if binding.serial_id not in DEVICE_NAMES:
        problems.append(f"{where}: unknown device")
    data_type = DATA_TYPES.get(binding.metric)
    if data_type is None:
        return [*problems, f"{where}: unknown metric"]
    if not 1 <= binding.interval_minutes <= 24 * 60 or (24 * 60) % binding.interval_minutes:
        problems.append(f"{where}: interval must divide a day")
    profile = binding.profile
    if isinstance(profile, Cycle | DayActivity):
        expected: DataType = "numeric" if isinstance(profile, Cycle) else "boolean"
        if expected != data_type:
            problems.append(f"{where}: a {type(profile).__name__} profile needs {expected}")
    elif isinstance(profile, Constant) and not types.fits(data_type, profile.value):
        problems.append(f"{where}: constant {profile.value!r} is not {data_type}")
    return problems


def _rule_problems(rule: RuleSpec, bindings: set[BindingKey]) -> list[str]:
    where = f"rule {rule.name!r} on {rule.serial_id}/{rule.metric}"
    if (rule.serial_id, rule.metric) not in bindings:
        return [f"{where}: no such binding"]
    problems: list[str] = []
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
    return problems


def _incident_problems(incident: IncidentSpec, bindings: set[BindingKey]) -> list[str]:
    where = f"incident on {incident.serial_id}/{incident.metric}"
    if (incident.serial_id, incident.metric) not in bindings:
        return [f"{where}: no such binding"]
    problems: list[str] = []
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
