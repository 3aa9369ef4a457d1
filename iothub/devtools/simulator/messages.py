"""The simulator's messages: topics and payloads formatted from pre-encoded pieces, and the
factory of deliberately bad ones.

A share of the messages (`bad_share`) is deliberately bad, of the kinds in BAD_KINDS, each
meant to be rejected with the reason in EXPECTED_REASON.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, tzinfo
from typing import Final

import structlog

from config.topics import TopicPattern
from iothub.devtools.simulator.devices import SimDevice
from iothub.devtools.simulator.series import Series, make_series

log = structlog.get_logger(__name__)

UNKNOWN_SERIAL_PREFIX: Final = "SN-UNKNOWN"  # serials no catalogue has (unknown_device)
UNKNOWN_METRIC: Final = "sim_unknown_metric"  # a metric no catalogue has (unknown_metric)
FUTURE_SKEW: Final = timedelta(hours=1)  # how far ahead the future_ts kind dates its reading
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
