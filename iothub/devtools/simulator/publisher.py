"""`iothub simulate`: simulated devices publishing realistic telemetry to the configured broker.

Each device publishes on its own topic (the first configured pattern with `{serial_id}`; the
shared topic with a `device` key when there is none). Values follow their metric: temperature,
humidity and pressure a daily cycle plus wandering noise with occasional excursions (a cooling
failure takes the temperature to about 29 °C for 12-20 minutes, so the seed's "above 27.5 for 10
minutes" rule fires), status mostly "OK" with short "WARN"/"FAULT" spells, firmware_version
constant per device, motion_detected random events (more by day), online mostly true.

A share of the messages (`--bad-share`) is deliberately bad, of the kinds in BAD_KINDS, each
meant to be rejected with the reason in EXPECTED_REASON.

Built to load the service from one process: one paho client, payloads formatted from
pre-encoded pieces, a tight publish loop paced by the monotonic clock, and at most
`max_in_flight` QoS 1 messages unacknowledged (fewer if the broker's Receive Maximum says so).

Device time: by default the wall clock. `time_scale` > 1 makes it run faster from `start_time`
(the demo uses 60: a device minute per second, so that rules with durations fire within a
minute); it is never allowed ahead of the wall clock, where the service would refuse it.

`run_simulation(...)` is the library entry (the demo and benchmarks call it in-process); it
returns a SimResult.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import threading
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, tzinfo
from typing import Any, Final, Protocol

import psycopg
import structlog

from config.settings import DEFAULT_MAX_PAYLOAD, Settings
from config.topics import TopicPattern
from ingestor import catalog
from ingestor import mqtt as mqttclient
from iothub import exitcodes, signals
from iothub.devtools.seed import data as seed_data
from schema import db
from schema.types import DataType

log = structlog.get_logger(__name__)

DEFAULT_RATE: Final = 50.0  # messages per second, all devices together
DEFAULT_DEVICE_COUNT: Final = 10  # generated devices when no database says which exist
DEFAULT_QOS: Final = 1
DEFAULT_MAX_IN_FLIGHT: Final = 1000  # QoS 1/2 messages published and not yet acknowledged
MAX_MID: Final = 65_000  # below paho's 16-bit message ids, so in-flight ids never collide
PROGRESS_INTERVAL: Final = 5.0  # seconds between simulate_progress lines
CONNECT_TIMEOUT: Final = 10.0  # seconds to get the broker's CONNACK
DRAIN_TIMEOUT: Final = 10.0  # seconds to wait for outstanding acknowledgements at the end
DB_CONNECT_TIMEOUT: Final = 3  # seconds: the device list is optional, do not wait long for it
MAX_BURST: Final = 500  # messages published between two looks at the clock and the stop flag
MAX_SLEEP: Final = 0.05  # seconds: longest nap of the pacing loop, so a stop is seen quickly
ACK_WAIT: Final = 0.05  # seconds: longest wait for an acknowledgement when the window is full
KEEPALIVE: Final = 30  # seconds
CLIENT_ID_PREFIX: Final = "iothub-simulator"
GENERATED_PREFIX: Final = "SIM"  # serials of generated devices: SIM-0000, SIM-0001, ...
UNKNOWN_SERIAL_PREFIX: Final = "SN-UNKNOWN"  # serials no catalogue has (unknown_device)
UNKNOWN_METRIC: Final = "sim_unknown_metric"  # a metric no catalogue has (unknown_metric)
FUTURE_SKEW: Final = timedelta(hours=1)  # how far ahead the future_ts kind dates its reading
DEFAULT_FIRMWARE: Final = "2.4.0"
DAY_START_HOUR, DAY_END_HOUR = 8, 19  # local hours when people move about (motion)
NIGHT_MOTION_PROBABILITY: Final = 0.01  # per reading, outside the day hours
DAY_MOTION_PROBABILITY: Final = 0.3  # per reading, during the day, unless the seed says
STATUS_FAULT_SHARE: Final = 0.2  # of the not-OK spells, the rest are WARN

# Bad payload kinds and their weights; an oversize payload is rarer because the service keeps
# every rejected payload whole in rejected_messages (max_payload_bytes + 1 each).
BAD_KINDS: Final[Mapping[str, float]] = {
    "bad_json": 1.0,  # truncated JSON text
    "nan_literal": 1.0,  # NaN is not JSON
    "wrong_type": 1.0,  # a string for a number, a number for a boolean or a string
    "unknown_device": 1.0,  # a serial no catalogue has
    "unknown_metric": 1.0,  # a metric the device is not bound to
    "future_ts": 1.0,  # an hour ahead of the wall clock
    "bad_timestamp": 1.0,  # a ts that is no time at all
    "bad_schema": 1.0,  # "timestamp" instead of "ts"
    "device_mismatch": 1.0,  # the payload names another device than the topic (per-device only)
    "oversize": 0.25,  # one byte more than max_payload_bytes
}
PLAUSIBLE: Final[Mapping[str, str]] = {"numeric": "21.5", "boolean": "true", "str": '"OK"'}
WRONG_TYPE: Final[Mapping[str, str]] = {"numeric": '"high"', "boolean": "1", "str": "42"}
EXPECTED_REASON: Final[Mapping[str, str]] = {
    "bad_json": "bad_json",
    "nan_literal": "bad_json",
    "wrong_type": "type_mismatch",
    "unknown_device": "unknown_device",
    "unknown_metric": "unknown_metric",
    "future_ts": "ts_in_future",
    "bad_timestamp": "bad_timestamp",
    "bad_schema": "bad_schema",
    "device_mismatch": "device_mismatch",
    "oversize": "payload_too_large",
}


class SimulationError(Exception):
    """The simulation cannot run."""


# ---------------------------------------------------------------------------------------------
# Devices


@dataclass(frozen=True)
class SimMetric:
    name: str
    data_type: DataType


@dataclass(frozen=True)
class SimDevice:
    """A simulated device: its serial and the metrics it reports."""

    serial_id: str
    metrics: tuple[SimMetric, ...]

    def __post_init__(self) -> None:
        if not self.metrics:
            raise ValueError(f"device {self.serial_id!r} has no metrics")


DEFAULT_METRICS: Final = (
    SimMetric("temperature", "numeric"),
    SimMetric("humidity", "numeric"),
    SimMetric("status", "str"),
    SimMetric("online", "boolean"),
)


def generated_devices(
    count: int, metrics: tuple[SimMetric, ...] = DEFAULT_METRICS
) -> list[SimDevice]:
    """`count` devices SIM-0000... reporting `metrics` (no catalogue knows them)."""
    return [SimDevice(f"{GENERATED_PREFIX}-{i:04d}", metrics) for i in range(count)]


def devices_from_catalog(
    snapshot: catalog.Snapshot, serials: Sequence[str] | None = None
) -> list[SimDevice]:
    """Active devices of the catalogue with their bound metrics.

    With `serials`, those devices in that order (ones the catalogue lacks are left out);
    without, the seed's devices that the catalogue has.
    """
    wanted = list(serials) if serials is not None else [d.serial_id for d in seed_data.DEVICES]
    found = []
    for serial in wanted:
        device = snapshot.devices.get(serial)
        if device is None or not device.is_active or not device.bindings:
            continue
        metrics = tuple(
            SimMetric(b.metric_type, b.data_type)
            for b in sorted(device.bindings.values(), key=lambda b: b.device_metric_id)
        )
        found.append(SimDevice(serial, metrics))
    return found


def load_catalog(settings: Settings) -> catalog.Snapshot | None:
    """The device catalogue of the configured database, or None when it does not answer."""
    conninfo = psycopg.conninfo.make_conninfo(
        db.conninfo(settings, "simulate"), connect_timeout=DB_CONNECT_TIMEOUT
    )
    try:
        with psycopg.connect(conninfo, autocommit=True) as conn:
            return catalog.load(conn)
    except psycopg.Error as exc:
        log.info("simulate_no_catalog", error=str(exc).strip().splitlines()[0][:300])
        return None


# ---------------------------------------------------------------------------------------------
# Values


class Series(Protocol):
    """The values of one metric of one device, as JSON text, at a device time (epoch s)."""

    def text(self, ts: float) -> str: ...


@dataclass(frozen=True)
class EpisodeSpec:
    """When spells of abnormal values happen, in device-minutes."""

    first: tuple[float, float]  # the first starts this long after the simulation's start
    gap: float  # mean time between the end of one and the start of the next (exponential)
    length: tuple[float, float]


class Episodes:
    """A schedule of spells, drawn lazily as device time advances."""

    def __init__(self, spec: EpisodeSpec, origin: float, rng: random.Random) -> None:
        self._spec = spec
        self._rng = rng
        self.start = origin + 60 * rng.uniform(*spec.first)
        self.end = self.start + 60 * rng.uniform(*spec.length)
        self.number = 0  # which spell `start`/`end` describe

    def active(self, ts: float) -> bool:
        while ts >= self.end:
            self.start = self.end + 60 * self._rng.expovariate(1 / self._spec.gap)
            self.end = self.start + 60 * self._rng.uniform(*self._spec.length)
            self.number += 1
        return ts >= self.start


@dataclass(frozen=True)
class Excursion:
    """Spells where a numeric value leaves its cycle for `level` (times the base if relative)."""

    level: float
    jitter: float
    episodes: EpisodeSpec
    relative: bool = False


# The excursions that make the seed's threshold rules fire now and then.
EXCURSIONS: Final[Mapping[str, Excursion]] = {
    # Cooling failure: above the seed's 27.5 °C for longer than its 10 minutes.
    "temperature": Excursion(29.0, 0.6, EpisodeSpec((1, 10), 60, (12, 20))),
    "humidity": Excursion(88.0, 2.0, EpisodeSpec((5, 40), 90, (3, 8))),
    # Overpressure: 1.5 times the usual (the seed's boiler: 2.7 bar, above its 2.5 for 5 min).
    "pressure": Excursion(1.5, 0.02, EpisodeSpec((5, 40), 90, (6, 10)), relative=True),
}
STATUS_EPISODES: Final = EpisodeSpec((1, 8), 30, (1, 4))
OFFLINE_EPISODES: Final = EpisodeSpec((10, 60), 120, (2, 8))
DEFAULT_CYCLES: Final[Mapping[str, seed_data.Cycle]] = {
    "temperature": seed_data.Cycle(21.5, 1.5, 15, 0.15),
    "humidity": seed_data.Cycle(45.0, 5.0, 6, 0.5, decimals=1),
    "pressure": seed_data.Cycle(1.8, 0.05, 17, 0.01, decimals=3),  # bar, like the seed's gauge
}
GENERIC_CYCLE: Final = seed_data.Cycle(50.0, 5.0, 12, 0.5)
SEED_PROFILES: Final[Mapping[tuple[str, str], seed_data.Profile]] = {
    (b.serial_id, b.metric): b.profile for b in seed_data.BINDINGS
}


class CycleSeries:
    """A daily cycle (local time) plus AR(1) noise, with excursions."""

    def __init__(
        self,
        profile: seed_data.Cycle,
        excursion: Excursion | None,
        origin: float,
        utc_offset: float,
        rng: random.Random,
    ) -> None:
        self._p = profile
        self._rng = rng
        self._offset = utc_offset
        self._wander = 0.0
        self._excursion = excursion
        self._episodes = Episodes(excursion.episodes, origin, rng) if excursion else None
        self._level = 0.0
        if excursion is not None:
            self._level = excursion.level * profile.base if excursion.relative else excursion.level

    def text(self, ts: float) -> str:
        p = self._p
        self._wander = p.persistence * self._wander + self._rng.gauss(0.0, p.noise)
        if self._episodes is not None and self._episodes.active(ts):
            assert self._excursion is not None
            jitter = self._excursion.jitter
            value = self._level + self._rng.uniform(-jitter, jitter)
        else:
            hour = ((ts + self._offset) / 3600.0) % 24.0
            daily = p.amplitude * math.cos(2 * math.pi * (hour - p.peak_hour) / 24)
            value = p.base + daily + self._wander
        return repr(round(value, p.decimals))


class StatusSeries:
    """ "OK", with spells of "WARN" (or "FAULT")."""

    def __init__(self, origin: float, rng: random.Random) -> None:
        self._episodes = Episodes(STATUS_EPISODES, origin, rng)
        self._rng = rng
        self._spell = -1
        self._bad = '"WARN"'

    def text(self, ts: float) -> str:
        if not self._episodes.active(ts):
            return '"OK"'
        if self._episodes.number != self._spell:
            self._spell = self._episodes.number
            self._bad = '"FAULT"' if self._rng.random() < STATUS_FAULT_SHARE else '"WARN"'
        return self._bad


class OnlineSeries:
    """True, with spells of false (the device reports it lost its uplink)."""

    def __init__(self, origin: float, rng: random.Random) -> None:
        self._episodes = Episodes(OFFLINE_EPISODES, origin, rng)

    def text(self, ts: float) -> str:
        return "false" if self._episodes.active(ts) else "true"


class MotionSeries:
    """Random motion events, frequent by day and rare at night (local time)."""

    def __init__(self, day_probability: float, utc_offset: float, rng: random.Random) -> None:
        self._day = day_probability
        self._offset = utc_offset
        self._rng = rng

    def text(self, ts: float) -> str:
        hour = ((ts + self._offset) / 3600.0) % 24.0
        p = self._day if DAY_START_HOUR <= hour < DAY_END_HOUR else NIGHT_MOTION_PROBABILITY
        return "true" if self._rng.random() < p else "false"


class ConstantSeries:
    def __init__(self, text: str) -> None:
        self._text = text

    def text(self, ts: float) -> str:
        return self._text


def make_series(
    serial_id: str,
    metric: SimMetric,
    origin: float,
    utc_offset: float,
    rng: random.Random,
) -> Series:
    """The value model of one metric: by its name when the data type fits, else by type.

    Devices of the seed keep the seed's profiles (base, amplitude, firmware), so the simulated
    readings continue its history."""
    profile = SEED_PROFILES.get((serial_id, metric.name))
    name = metric.name.lower()
    if metric.data_type == "numeric":
        cycle = profile if isinstance(profile, seed_data.Cycle) else None
        cycle = cycle or DEFAULT_CYCLES.get(name, GENERIC_CYCLE)
        return CycleSeries(cycle, EXCURSIONS.get(name), origin, utc_offset, rng)
    if metric.data_type == "boolean":
        if name == "motion_detected":
            day = (
                profile.probability
                if isinstance(profile, seed_data.DayActivity)
                else DAY_MOTION_PROBABILITY
            )
            return MotionSeries(day, utc_offset, rng)
        return OnlineSeries(origin, rng)
    if name == "status":
        return StatusSeries(origin, rng)
    if name == "firmware_version":
        value = profile.value if isinstance(profile, seed_data.Constant) else DEFAULT_FIRMWARE
        return ConstantSeries(json.dumps(value))
    return ConstantSeries('"OK"')


# ---------------------------------------------------------------------------------------------
# Messages


@dataclass(frozen=True)
class SimResult:
    """What one simulation did."""

    sent: int  # messages handed to the broker connection
    acked: int  # of those, acknowledged by the broker (QoS 0: written to the socket)
    bad_sent: Mapping[str, int]  # deliberately bad messages, by kind (BAD_KINDS)
    seconds: float  # from the first message to the end of the run
    readings: int = 0  # good readings in the good messages

    @property
    def rate(self) -> float:
        """Messages per second."""
        return self.sent / self.seconds if self.seconds > 0 else 0.0


@dataclass
class _DeviceState:
    device: SimDevice
    topic: str
    prefix: str  # '{"schema_version":1,"device":"SN-...","ts":'
    keys: tuple[str, ...]  # '"temperature":' per metric
    series: tuple[Series, ...]
    last_ms: int = 0
    cursor: int = 0  # first metric of the next message when a message carries a subset


class MessageFactory:
    """Builds the next message of the round-robin over the devices (one thread only)."""

    def __init__(
        self,
        topics: Sequence[str],
        devices: Sequence[SimDevice],
        *,
        bad_share: float,
        readings_per_message: int | None,
        origin: float,
        time_scale: float,
        max_payload_bytes: int,
        tz: tzinfo,
        rng: random.Random,
    ) -> None:
        if not devices:
            raise ValueError("no devices to simulate")
        if not 0.0 <= bad_share <= 1.0:
            raise ValueError("bad_share must be between 0 and 1")
        if time_scale <= 0:
            raise ValueError("time_scale must be positive")
        if readings_per_message is not None and readings_per_message < 1:
            raise ValueError("readings_per_message must be at least 1")
        self.pattern = choose_pattern(topics)
        self._rng = rng
        self._bad_share = bad_share
        self._per_message = readings_per_message
        self._origin = origin
        self._scale = time_scale
        self._max_payload = max_payload_bytes
        offset = datetime.fromtimestamp(origin, tz).utcoffset()
        utc_offset = offset.total_seconds() if offset else 0.0
        self._devices = [self._state(d, origin, utc_offset) for d in devices]
        self._next = 0
        self._unknown = 0
        kinds = [k for k in BAD_KINDS if self.pattern.has_serial or k != "device_mismatch"]
        self._bad_kinds = kinds
        self._bad_weights = [BAD_KINDS[k] for k in kinds]
        self._oversize: bytes | None = None
        self.bad_sent: Counter[str] = Counter()
        self.readings = 0

    def _state(self, device: SimDevice, origin: float, utc_offset: float) -> _DeviceState:
        topic = self.pattern.topic_for(device.serial_id if self.pattern.has_serial else None)
        series_rng = random.Random(self._rng.random())
        return _DeviceState(
            device=device,
            topic=topic,
            prefix=f'{{"schema_version":1,"device":{json.dumps(device.serial_id)},"ts":',
            keys=tuple(f"{json.dumps(m.name)}:" for m in device.metrics),
            series=tuple(
                make_series(device.serial_id, m, origin, utc_offset, series_rng)
                for m in device.metrics
            ),
        )

    def device_time(self, elapsed: float, wall: float) -> float:
        """Device time (epoch s) `elapsed` seconds into the run; never ahead of `wall`."""
        return min(self._origin + elapsed * self._scale, wall)

    def next(self, elapsed: float, wall: float) -> tuple[str, bytes, str | None]:
        """(topic, payload, bad kind or None) of the next message."""
        state = self._devices[self._next]
        self._next = (self._next + 1) % len(self._devices)
        # Strictly increasing per device, so no two readings of a binding share a ts (the unique
        # key would drop the second) and rules see them in order.
        ts_ms = max(int(self.device_time(elapsed, wall) * 1000), state.last_ms + 1)
        state.last_ms = ts_ms
        if self._bad_share and self._rng.random() < self._bad_share:
            kind = self._rng.choices(self._bad_kinds, self._bad_weights)[0]
            self.bad_sent[kind] += 1
            topic, payload = self._bad(kind, state, ts_ms, wall)
            return topic, payload, kind
        n = len(state.keys)
        if self._per_message is None or self._per_message >= n:
            indexes: Sequence[int] = range(n)
        else:
            start = state.cursor
            indexes = [(start + i) % n for i in range(self._per_message)]
            state.cursor = (start + self._per_message) % n
        ts = ts_ms / 1000
        body = ",".join(state.keys[i] + state.series[i].text(ts) for i in indexes)
        self.readings += len(indexes)
        return state.topic, f"{state.prefix}{ts_ms},{_metrics(body)}".encode(), None

    # --- deliberately bad messages

    def _bad(self, kind: str, state: _DeviceState, ts_ms: int, wall: float) -> tuple[str, bytes]:
        device = state.device
        metric = self._rng.choice(device.metrics)
        # A fixed plausible value: drawing from the series would move its schedule to the bad
        # message's time, which may be far from device time (future_ts).
        reading = f"{json.dumps(metric.name)}:{PLAUSIBLE[metric.data_type]}"
        topic = state.topic
        if kind == "bad_json":
            good = f"{state.prefix}{ts_ms},{_metrics(reading)}"
            text = good[: self._rng.randint(1, len(good) - 2)]
        elif kind == "nan_literal":
            text = f"{state.prefix}{ts_ms},{_metrics(f'{json.dumps(metric.name)}:NaN')}"
        elif kind == "wrong_type":
            wrong = f"{json.dumps(metric.name)}:{WRONG_TYPE[metric.data_type]}"
            text = f"{state.prefix}{ts_ms},{_metrics(wrong)}"
        elif kind == "unknown_device":
            self._unknown += 1
            serial = f"{UNKNOWN_SERIAL_PREFIX}-{self._unknown % 10_000:04d}"
            if self.pattern.has_serial:
                topic = self.pattern.topic_for(serial)
            text = _message(serial, ts_ms, reading)
        elif kind == "unknown_metric":
            text = f"{state.prefix}{ts_ms},{_metrics(f'{json.dumps(UNKNOWN_METRIC)}:0.5')}"
        elif kind == "future_ts":
            ahead = int((wall + FUTURE_SKEW.total_seconds()) * 1000)
            text = f"{state.prefix}{ahead},{_metrics(reading)}"
        elif kind == "bad_timestamp":
            text = f'{state.prefix}"yesterday at noon",{_metrics(reading)}'
        elif kind == "bad_schema":
            # A plausible typo: "timestamp" for "ts".
            text = f"{state.prefix}{ts_ms},{_metrics(reading)}".replace('"ts":', '"timestamp":')
        elif kind == "device_mismatch":
            text = _message(f"{device.serial_id}-OTHER", ts_ms, reading)
        elif kind == "oversize":
            return topic, self._oversize_payload(device.serial_id)
        else:
            raise ValueError(f"unknown bad payload kind {kind!r}")
        return topic, text.encode()

    def _oversize_payload(self, serial_id: str) -> bytes:
        if self._oversize is None:
            # Well-formed JSON, refused for its size alone; built once and reused.
            head = f'{{"device":{json.dumps(serial_id)},"metrics":{{"status":"'
            tail = '"}}'
            pad = self._max_payload + 1 - len(head) - len(tail)
            self._oversize = (head + "x" * max(pad, 0) + tail).encode()
        return self._oversize


def _metrics(body: str) -> str:
    return f'"metrics":{{{body}}}}}'


def _message(serial_id: str, ts_ms: int, body: str) -> str:
    return f'{{"schema_version":1,"device":{json.dumps(serial_id)},"ts":{ts_ms},{_metrics(body)}'


def choose_pattern(topics: Sequence[str]) -> TopicPattern:
    """The first per-device pattern (`{serial_id}` in it), else the first shared topic."""
    patterns = [TopicPattern.parse(t) for t in topics]
    if not patterns:
        raise ValueError("no telemetry topic patterns")
    return next((p for p in patterns if p.has_serial), patterns[0])


# ---------------------------------------------------------------------------------------------
# Publishing


class Simulator:
    """One MQTT connection publishing the factory's messages at a steady rate.

    `sent` and `acked` may be read from other threads while `run()` runs (the demo shows them).
    """

    def __init__(
        self,
        broker_url: str,
        factory: MessageFactory,
        *,
        rate: float,
        duration: float | None,
        stop: threading.Event | None = None,
        qos: int = DEFAULT_QOS,
        client_id: str | None = None,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
        progress_interval: float | None = PROGRESS_INTERVAL,
    ) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        if duration is not None and duration <= 0:
            raise ValueError("duration must be positive")
        if qos not in (0, 1, 2):
            raise ValueError("qos must be 0, 1 or 2")
        if not 1 <= max_in_flight <= MAX_MID:
            raise ValueError(f"max_in_flight must be between 1 and {MAX_MID}")
        self.broker_url = broker_url
        self.factory = factory
        self.rate = rate
        self.duration = duration
        self.stop = stop or threading.Event()
        self.qos = qos
        self.client_id = client_id or f"{CLIENT_ID_PREFIX}-{os.getpid()}"
        self.max_in_flight = max_in_flight
        self.progress_interval = progress_interval
        self.sent = 0
        self.acked = 0
        self._window = max_in_flight
        self._connected = threading.Event()
        self._refused: str | None = None
        self._ack_cond = threading.Condition()
        self._waiting = False
        self._closing = False
        self._client = mqttclient.make_client(broker_url, self.client_id)
        # Our own window bounds what is in flight; paho must never hold messages back itself.
        self._client.max_inflight_messages_set(max_in_flight)
        self._client.max_queued_messages_set(0)
        self._client.connect_timeout = CONNECT_TIMEOUT
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_publish = self._on_publish

    @property
    def in_flight(self) -> int:
        return self.sent - self.acked

    # --- paho callbacks (network thread): count and signal, never raise

    @mqttclient.guarded("on_connect")
    def _on_connect(
        self,
        client: mqttclient.Client,
        userdata: Any,
        flags: mqttclient.ConnectFlags,
        reason_code: mqttclient.ReasonCode,
        properties: mqttclient.Properties | None,
    ) -> None:
        if reason_code.is_failure:
            self._refused = str(reason_code)
            log.error("simulate_connect_refused", reason=self._refused)
        else:
            receive_max = mqttclient.receive_maximum(properties)
            if receive_max is not None:
                # MQTT 5: more unacknowledged QoS>0 messages than this may get us disconnected.
                self._window = min(self.max_in_flight, receive_max)
            log.info("simulate_connected", client_id=self.client_id, window=self._window)
        self._connected.set()

    @mqttclient.guarded("on_disconnect")
    def _on_disconnect(
        self,
        client: mqttclient.Client,
        userdata: Any,
        flags: mqttclient.DisconnectFlags,
        reason_code: mqttclient.ReasonCode,
        properties: mqttclient.Properties | None,
    ) -> None:
        if not self._closing:
            log.warning("simulate_disconnected", reason=str(reason_code), in_flight=self.in_flight)

    @mqttclient.guarded("on_publish")
    def _on_publish(
        self,
        client: mqttclient.Client,
        userdata: Any,
        mid: int,
        reason_code: mqttclient.ReasonCode,
        properties: mqttclient.Properties | None,
    ) -> None:
        self.acked += 1
        if self._waiting:
            with self._ack_cond:
                self._ack_cond.notify()

    # --- the run

    def _connect(self) -> None:
        host, port = mqttclient.host_port(self.broker_url)
        try:
            self._client.connect(host, port, keepalive=KEEPALIVE, clean_start=True)
        except OSError as exc:
            raise SimulationError(f"cannot connect to the broker at {host}:{port}: {exc}") from None
        self._client.loop_start()
        if not self._connected.wait(CONNECT_TIMEOUT) or self._refused is not None:
            self._client.disconnect()
            mqttclient.stop_loop(self._client)
            why = self._refused or f"no CONNACK within {CONNECT_TIMEOUT:g}s"
            raise SimulationError(f"the broker at {host}:{port} refused us: {why}")

    def _wait_for_room(self) -> bool:
        """Wait (briefly) until the window has room; False when it still has none."""
        if self.sent - self.acked < self._window:
            return True
        with self._ack_cond:
            self._waiting = True
            try:
                if self.sent - self.acked >= self._window:
                    self._ack_cond.wait(ACK_WAIT)
            finally:
                self._waiting = False
        return self.sent - self.acked < self._window

    def run(self) -> SimResult:
        """Publish until `duration` passed or `stop` is set; then wait for the acknowledgements."""
        self._connect()
        factory, client, qos = self.factory, self._client, self.qos
        started = time.monotonic()
        last_progress, last_sent = started, 0
        try:
            while not self.stop.is_set():
                elapsed = time.monotonic() - started
                if self.duration is not None and elapsed >= self.duration:
                    break
                due = int(self.rate * elapsed) + 1 - self.sent
                if due <= 0:
                    time.sleep(min(MAX_SLEEP, (self.sent + 1) / self.rate - elapsed))
                    continue
                wall = time.time()
                for _ in range(min(due, MAX_BURST)):
                    if not self._wait_for_room():
                        break
                    topic, payload, _kind = factory.next(elapsed, wall)
                    info = client.publish(topic, payload, qos=qos)
                    if info.rc == mqttclient.ERR_SUCCESS or (
                        qos > 0 and info.rc == mqttclient.ERR_NO_CONN
                    ):
                        # QoS>0 while disconnected: paho keeps it and sends it on reconnect.
                        self.sent += 1
                now = time.monotonic()
                if self.progress_interval and now - last_progress >= self.progress_interval:
                    log.info(
                        "simulate_progress",
                        sent=self.sent,
                        acked=self.acked,
                        in_flight=self.in_flight,
                        rate=round((self.sent - last_sent) / (now - last_progress), 1),
                        bad=sum(factory.bad_sent.values()),
                    )
                    last_progress, last_sent = now, self.sent
            seconds = time.monotonic() - started
            self._drain()
        finally:
            self._closing = True
            self._client.disconnect()
            mqttclient.stop_loop(self._client)
        result = SimResult(
            sent=self.sent,
            acked=self.acked,
            bad_sent=dict(factory.bad_sent),
            seconds=seconds,
            readings=factory.readings,
        )
        log.info(
            "simulate_done",
            sent=result.sent,
            acked=result.acked,
            bad=dict(result.bad_sent),
            readings=result.readings,
            seconds=round(result.seconds, 2),
            rate=round(result.rate, 1),
        )
        return result

    def _drain(self) -> None:
        deadline = time.monotonic() + DRAIN_TIMEOUT
        while self.acked < self.sent and time.monotonic() < deadline:
            time.sleep(0.01)
        if self.acked < self.sent:
            log.warning("simulate_unacknowledged", count=self.sent - self.acked)


# The positional order is the one the demo and the benchmark were promised.
def run_simulation(  # noqa: PLR0917
    broker_url: str,
    topics: Sequence[str],
    devices: Sequence[SimDevice],
    rate: float,
    duration: float | None,
    bad_share: float = 0.0,
    stop: threading.Event | None = None,
    *,
    qos: int = DEFAULT_QOS,
    client_id: str | None = None,
    readings_per_message: int | None = None,
    max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
    max_payload_bytes: int = DEFAULT_MAX_PAYLOAD,
    start_time: datetime | None = None,
    time_scale: float = 1.0,
    tz: tzinfo = UTC,
    progress_interval: float | None = PROGRESS_INTERVAL,
    seed: int | str | None = None,
) -> SimResult:
    """Publish simulated telemetry of `devices` at `rate` messages/s for `duration` seconds
    (None: until `stop` is set). Raises SimulationError when the broker cannot be reached."""
    return Simulator(
        broker_url,
        MessageFactory(
            topics,
            devices,
            bad_share=bad_share,
            readings_per_message=readings_per_message,
            origin=(start_time or datetime.now(UTC)).timestamp(),
            time_scale=time_scale,
            max_payload_bytes=max_payload_bytes,
            tz=tz,
            rng=random.Random(seed),
        ),
        rate=rate,
        duration=duration,
        stop=stop,
        qos=qos,
        client_id=client_id,
        max_in_flight=max_in_flight,
        progress_interval=progress_interval,
    ).run()


# ---------------------------------------------------------------------------------------------
# The CLI command


def _positive(text: str) -> float:
    value = float(text)
    if not value > 0 or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number")
    return value


def _share(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text!r} is not between 0 and 1")
    return value


def _count(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of at least 1")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--rate",
        type=_positive,
        default=DEFAULT_RATE,
        help=f"messages per second, all devices together (default {DEFAULT_RATE:g})",
    )
    parser.add_argument(
        "--devices",
        default=None,
        metavar="SERIAL,...",
        help="serials to simulate (default: the seed's devices in the database when it answers, "
        "else --device-count generated ones)",
    )
    parser.add_argument(
        "--device-count",
        type=_count,
        default=DEFAULT_DEVICE_COUNT,
        help=f"generated devices when no database lists any (default {DEFAULT_DEVICE_COUNT})",
    )
    parser.add_argument(
        "--duration",
        type=_positive,
        default=None,
        help="seconds to run (default: until Ctrl-C or SIGTERM)",
    )
    parser.add_argument(
        "--readings-per-message",
        type=_count,
        default=None,
        help="metrics per message (default: all of the device's metrics)",
    )
    parser.add_argument(
        "--bad-share",
        type=_share,
        default=0.0,
        help="share of deliberately bad messages, 0..1 (default 0)",
    )
    parser.add_argument(
        "--qos", type=int, choices=(0, 1, 2), default=DEFAULT_QOS, help="MQTT QoS (default 1)"
    )
    parser.add_argument(
        "--client-id",
        default=None,
        help=f"MQTT client id (default {CLIENT_ID_PREFIX}-<pid>; never the ingestor's)",
    )


def choose_devices(
    settings: Settings, serials: Sequence[str] | None, device_count: int
) -> tuple[list[SimDevice], str]:
    """The devices to simulate and where they came from (for the log)."""
    snapshot = load_catalog(settings)
    if serials:
        known = devices_from_catalog(snapshot, serials) if snapshot else []
        by_serial = {d.serial_id: d for d in known}
        chosen = [by_serial.get(s) or SimDevice(s, DEFAULT_METRICS) for s in serials]
        return chosen, "command line"
    if snapshot is not None:
        found = devices_from_catalog(snapshot)
        if found:
            return found, "database"
        log.info(
            "simulate_no_seed_devices",
            hint="the database has none of the seed's devices (`iothub seed`); generated "
            "serials will be rejected as unknown_device unless they exist",
        )
    return generated_devices(device_count), "generated"


def _reserved_client_ids(settings: Settings) -> set[str]:
    actions = settings.mqtt_actions_client_id or f"{settings.mqtt_client_id}-actions"
    return {settings.mqtt_client_id, actions}


def main(settings: Settings, args: argparse.Namespace) -> int:
    client_id = args.client_id or f"{CLIENT_ID_PREFIX}-{os.getpid()}"
    if client_id in _reserved_client_ids(settings):
        # The same client id would take the service's session over and disconnect it.
        log.error("simulate_bad_client_id", client_id=client_id, why="it is the service's own")
        return exitcodes.USAGE
    stop = threading.Event()

    def stopping(name: str) -> None:
        log.info("simulate_stopping", signal=name)
        stop.set()

    # A repeated signal changes nothing: the publisher already stops within a tick.
    with signals.on_stop(stopping, repeat=lambda name: stop.set()):
        return _simulate(settings, args, client_id, stop)


def _simulate(
    settings: Settings, args: argparse.Namespace, client_id: str, stop: threading.Event
) -> int:
    serials = [s.strip() for s in args.devices.split(",") if s.strip()] if args.devices else None
    try:
        devices, source = choose_devices(settings, serials, args.device_count)
        factory = MessageFactory(
            settings.mqtt_topics,
            devices,
            bad_share=args.bad_share,
            readings_per_message=args.readings_per_message,
            origin=time.time(),
            time_scale=1.0,
            max_payload_bytes=settings.max_payload_bytes,
            tz=settings.tz,
            rng=random.Random(),
        )
        log.info(
            "simulate_starting",
            devices=len(devices),
            source=source,
            topic=factory.pattern.pattern,
            rate=args.rate,
            duration=args.duration,
            bad_share=args.bad_share,
            client_id=client_id,
        )
        Simulator(
            settings.mqtt_url,
            factory,
            rate=args.rate,
            duration=args.duration,
            stop=stop,
            qos=args.qos,
            client_id=client_id,
        ).run()
    except SimulationError as exc:
        log.error("simulate_failed", error=str(exc))
        return exitcodes.CONNECTION_FAILED
    return exitcodes.OK


__all__ = [
    "BAD_KINDS",
    "EXPECTED_REASON",
    "MessageFactory",
    "SimDevice",
    "SimMetric",
    "SimResult",
    "SimulationError",
    "Simulator",
    "add_arguments",
    "choose_devices",
    "devices_from_catalog",
    "generated_devices",
    "main",
    "run_simulation",
]
