"""The development data set of `iothub seed`: the original project's users and metrics, seven
devices, their bindings and rules, and how their telemetry behaves.

Plain constants, so that a reader sees the whole data set in one place; `dataset.py` turns it
into rows. Telemetry is not listed reading by reading: each binding has a profile (a daily cycle
plus noise, a day-time probability, or a constant) and a few incidents that make the rules fire,
so that the events table has something real to show.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import time
from typing import Final, Literal

from pydantic import JsonValue

from schema.types import DataType

Role = Literal["admin", "client"]
Value = float | bool | str

DAYS: Final = 3  # days of telemetry, ending at the time of the run
RANDOM_SEED: Final = "iothub-seed-v1"  # changing it changes every generated value


@dataclass(frozen=True)
class UserSpec:
    username: str
    email: str
    role: Role
    password: str  # plain here; stored as a pbkdf2_sha256 hash


@dataclass(frozen=True)
class MetricSpec:
    metric_type: str
    data_type: DataType


@dataclass(frozen=True)
class DeviceSpec:
    serial_id: str
    name: str
    description: str
    owner: str  # username
    is_active: bool = True


@dataclass(frozen=True)
class Cycle:
    """A numeric value following a daily cycle (local time) plus slowly wandering noise."""

    base: float
    amplitude: float
    peak_hour: float  # local hour of the daily maximum
    noise: float  # standard deviation of each step of the AR(1) noise
    decimals: int = 2
    persistence: float = 0.9  # AR(1) coefficient: how much of the last deviation remains


@dataclass(frozen=True)
class DayActivity:
    """A boolean that is true with some probability during the day and false at night."""

    probability: float
    day_start: time = time(8, 0)
    day_end: time = time(19, 0)


@dataclass(frozen=True)
class Constant:
    """A value that does not change unless an incident changes it."""

    value: Value


Profile = Cycle | DayActivity | Constant


@dataclass(frozen=True)
class BindingSpec:
    serial_id: str
    metric: str
    interval_minutes: int  # how often the device reports this metric
    profile: Profile


@dataclass(frozen=True)
class RuleSpec:
    serial_id: str
    metric: str
    name: str
    description: str
    condition: dict[str, JsonValue]
    action: dict[str, JsonValue]
    is_active: bool = True


@dataclass(frozen=True)
class IncidentSpec:
    """A stretch of abnormal readings on one binding.

    It starts `minutes_before_end` before the last reading, or, with `at_local`, at the latest
    such local time that leaves the incident over before the last reading. Numeric incidents draw
    values uniformly in `value ± jitter`. `burst_seconds` adds `burst_count` extra readings that
    far apart after the start (a chatty sensor); `silences` lists metrics of the same device that
    send nothing during the incident (the device is offline).
    """

    serial_id: str
    metric: str
    value: Value
    duration_minutes: int
    minutes_before_end: int | None = None
    at_local: time | None = None
    jitter: float = 0.0
    burst_count: int = 0
    burst_seconds: int = 0
    silences: tuple[str, ...] = ()


USERS: Final[tuple[UserSpec, ...]] = (
    UserSpec("dev_admin", "dev_admin@iothub.local", "admin", "DevSecurePass"),
    UserSpec("alex_client", "alex_client@iothub.local", "client", "ClientAccess1"),
    UserSpec("jordan_client", "jordan_client@iothub.local", "client", "ClientAccess2"),
)

METRICS: Final[tuple[MetricSpec, ...]] = (
    MetricSpec("temperature", "numeric"),
    MetricSpec("humidity", "numeric"),
    MetricSpec("pressure", "numeric"),
    MetricSpec("status", "str"),
    MetricSpec("firmware_version", "str"),
    MetricSpec("motion_detected", "boolean"),
    MetricSpec("online", "boolean"),
)

DEVICES: Final[tuple[DeviceSpec, ...]] = (
    DeviceSpec(
        "SN-A1-TEMP-0001",
        "Server room climate",
        "Temperature and humidity, rack row A",
        "alex_client",
    ),
    DeviceSpec("SN-A1-TEMP-0002", "Warehouse thermometer", "Unheated storage hall", "alex_client"),
    DeviceSpec(
        "SN-A2-HUM-0011",
        "Greenhouse climate",
        "Humidity and temperature, propagation house",
        "alex_client",
    ),
    DeviceSpec(
        "SN-A3-PRES-0021", "Boiler pressure gauge", "Heating circuit, in bar", "jordan_client"
    ),
    DeviceSpec(
        "SN-B1-MOT-0101",
        "Lobby motion sensor",
        "PIR sensor above the main entrance",
        "jordan_client",
    ),
    DeviceSpec(
        "SN-B1-STAT-0102", "Pump controller", "Cooling water pump, plant room", "jordan_client"
    ),
    DeviceSpec("SN-B2-FW-0103", "Edge gateway", "LoRaWAN gateway, roof", "jordan_client"),
)

BINDINGS: Final[tuple[BindingSpec, ...]] = (
    BindingSpec("SN-A1-TEMP-0001", "temperature", 5, Cycle(21.5, 1.0, 15, 0.15)),
    BindingSpec("SN-A1-TEMP-0001", "humidity", 5, Cycle(42.0, 3.0, 6, 0.5, decimals=1)),
    BindingSpec("SN-A1-TEMP-0002", "temperature", 5, Cycle(14.0, 4.0, 15, 0.2)),
    BindingSpec("SN-A2-HUM-0011", "humidity", 5, Cycle(65.0, 10.0, 5, 0.6, decimals=1)),
    BindingSpec("SN-A2-HUM-0011", "temperature", 5, Cycle(24.0, 6.0, 14, 0.25)),
    BindingSpec("SN-A3-PRES-0021", "pressure", 5, Cycle(1.8, 0.05, 17, 0.01, decimals=3)),
    BindingSpec("SN-B1-MOT-0101", "motion_detected", 2, DayActivity(0.3)),
    BindingSpec("SN-B1-MOT-0101", "online", 5, Constant(True)),
    BindingSpec("SN-B1-STAT-0102", "status", 5, Constant("OK")),
    BindingSpec("SN-B1-STAT-0102", "online", 5, Constant(True)),
    BindingSpec("SN-B2-FW-0103", "firmware_version", 60, Constant("2.4.0")),
)

_HOOK_URL: Final = "http://127.0.0.1:9/hook"  # the discard port: nothing is ever delivered


def _notify(message: str) -> dict[str, JsonValue]:
    return {"type": "notify", "channel": "email", "message": message}


def _webhook(message: str) -> dict[str, JsonValue]:
    return {"webhook": {"url": _HOOK_URL, "enabled": False}, "notification": {"message": message}}


RULES: Final[tuple[RuleSpec, ...]] = (
    RuleSpec(
        "SN-A1-TEMP-0001",
        "temperature",
        "Server room overheating",
        "Above 27.5 °C for 10 minutes",
        {"type": "threshold", "operator": ">", "value": 27.5, "duration_minutes": 10},
        _notify("High temperature in {device_name}: {value}°C"),
    ),
    RuleSpec(
        "SN-A1-TEMP-0001",
        "humidity",
        "Server room humidity high",
        "Above 60 % for 15 minutes",
        {"type": "threshold", "operator": ">", "value": 60, "duration_minutes": 15},
        _webhook("Humidity in {device_name} is {value}%"),
    ),
    RuleSpec(
        "SN-A1-TEMP-0002",
        "temperature",
        "Warehouse frost risk",
        "Below 3 °C for 30 minutes",
        {"type": "threshold", "operator": "<", "value": 3, "duration_minutes": 30},
        _notify("Frost risk in {device_name}: {value}°C"),
    ),
    RuleSpec(
        "SN-A2-HUM-0011",
        "humidity",
        "Greenhouse humidity out of range",
        "Below 30 % or above 85 %",
        {
            "type": "composite",
            "operator": "OR",
            "conditions": [
                {"type": "threshold", "operator": "<", "value": 30},
                {"type": "threshold", "operator": ">", "value": 85},
            ],
        },
        _webhook("Humidity out of range in {device_name}: {value}%"),
    ),
    RuleSpec(
        "SN-A2-HUM-0011",
        "temperature",
        "Greenhouse heat stress",
        "35 °C or more for 20 minutes (readings of 60 °C and above are sensor faults)",
        {
            "type": "composite",
            "operator": "AND",
            "conditions": [
                {"type": "threshold", "operator": ">=", "value": 35},
                {"type": "threshold", "operator": "<", "value": 60},
            ],
            "duration_minutes": 20,
        },
        _notify("Heat stress in {device_name}: {value}°C"),
    ),
    RuleSpec(
        "SN-A3-PRES-0021",
        "pressure",
        "Boiler overpressure",
        "Above 2.5 bar for 5 minutes",
        {"type": "threshold", "operator": ">", "value": 2.5, "duration_minutes": 5},
        _notify("Overpressure on {device_name}: {value} bar"),
    ),
    RuleSpec(
        "SN-B1-MOT-0101",
        "motion_detected",
        "After-hours motion in lobby",
        "Motion between 22:00 and 06:00",
        {"type": "boolean", "operator": "==", "value": True, "time_restriction": "22:00-06:00"},
        _notify("Motion detected in {device_name} at {ts}"),
    ),
    RuleSpec(
        "SN-B1-MOT-0101",
        "motion_detected",
        "Lobby sensor chatter",
        "5 or more reports within a minute",
        {"type": "rate", "count": 5, "duration_minutes": 1},
        _webhook("{device_name} sent a burst of reports ({rule_name})"),
    ),
    RuleSpec(
        "SN-B1-STAT-0102",
        "status",
        "Pump controller not OK",
        "Any status other than OK",
        {"type": "string_match", "operator": "!=", "value": "OK"},
        _notify("{device_name} reports {value}"),
    ),
    RuleSpec(
        "SN-B1-STAT-0102",
        "online",
        "Pump controller offline",
        "Offline for 5 minutes",
        {"type": "boolean", "operator": "==", "value": False, "duration_minutes": 5},
        _webhook("{device_name} is offline since {ts}"),
    ),
    RuleSpec(
        "SN-B2-FW-0103",
        "firmware_version",
        "Gateway firmware outdated",
        "Any firmware other than the current release 2.4.0",
        {"type": "string_match", "operator": "!=", "value": "2.4.0"},
        _notify("{device_name} runs firmware {value}"),
    ),
)

# Each incident makes exactly one rule fire once; outside them every profile stays well inside
# every rule's bounds, so the sample events are exactly these.
INCIDENTS: Final[tuple[IncidentSpec, ...]] = (
    IncidentSpec(
        "SN-A1-TEMP-0001", "temperature", 29.0, 40, minutes_before_end=26 * 60, jitter=0.6
    ),
    IncidentSpec(
        "SN-A2-HUM-0011", "humidity", 91.0, 25, minutes_before_end=5 * 60 + 10, jitter=2.0
    ),
    IncidentSpec("SN-A3-PRES-0021", "pressure", 2.7, 15, minutes_before_end=8 * 60, jitter=0.05),
    IncidentSpec("SN-B1-MOT-0101", "motion_detected", True, 10, at_local=time(23, 10)),
    IncidentSpec(
        "SN-B1-MOT-0101",
        "motion_detected",
        True,
        2,
        at_local=time(12, 30),
        burst_count=6,
        burst_seconds=10,
    ),
    IncidentSpec("SN-B1-STAT-0102", "status", "ERROR", 15, minutes_before_end=20 * 60),
    IncidentSpec(
        "SN-B1-STAT-0102", "online", False, 20, minutes_before_end=14 * 60, silences=("status",)
    ),
    IncidentSpec("SN-B2-FW-0103", "firmware_version", "2.3.1", 150, minutes_before_end=40 * 60),
)
