"""Simulated traffic in other devices' formats, for `iothub simulate --format`.

Each format re-renders the native factory's good messages (same devices, same series, same
times) as that device family publishes them, on the topic its source in SOURCES reads; the
source table is what the daemon needs in its `sources` setting to ingest the traffic.
"""

from __future__ import annotations

import json
from collections import deque
from datetime import UTC, datetime, timedelta
from typing import Any, Final

from iothub.devtools.simulator import sparkplug
from iothub.devtools.simulator.messages import MessageFactory

FORMATS: Final = ("native", "tasmota", "z2m", "esphome", "senml", "sparkplug")
# The [[sources]] entry each format's traffic needs (docs/sources.md explains each option).
SOURCES: Final[dict[str, dict[str, Any]]] = {
    "tasmota": {
        "name": "sim-tasmota",
        "topic": "tele/{node}/SENSOR",
        "decoder": "tasmota",
        "serial": "{node}",
        "time_zone": "UTC",
    },
    "z2m": {
        "name": "sim-z2m",
        "topic": "zigbee2mqtt/{name+}",
        "decoder": "flat_json",
        "serial": "{name}",
        "time_field": "last_seen",
        "exclude": ["linkquality"],
        "exclude_topics": ["zigbee2mqtt/bridge/#"],
    },
    "esphome": {
        "name": "sim-esphome",
        "topic": "esphome/{node}/sensor/{object}/state",
        "decoder": "value",
        "serial": "{node}",
        "metric": "{object}",
        "values": {"ON": True, "OFF": False},
    },
    "senml": {"name": "sim-senml", "topic": "senml/{node}", "decoder": "senml"},
    "sparkplug": {
        "name": "sim-sparkplug",
        "topic": f"spBv1.0/{sparkplug.GROUP}/{{type}}/{{node}}/{{device}}",
        "decoder": "sparkplug_b",
        "serial": "{device}",
        "exclude": [sparkplug.RSSI],  # bind an rssi metric and drop this to store it
    },
}
# Formats whose traffic needs a second source: Sparkplug's edge node messages (NBIRTH) have no
# device level. Its metrics are protocol (bdSeq, Node Control/*), so nothing of it is stored.
NODE_SOURCES: Final[dict[str, dict[str, Any]]] = {
    "sparkplug": {
        "name": "sim-sparkplug-node",
        "topic": f"spBv1.0/{sparkplug.GROUP}/{{type}}/{{node}}",
        "decoder": "sparkplug_b",
        "serial": "{node}",
        "exclude": ["Node Control/*"],
    },
}


def sources_of(fmt: str) -> list[dict[str, Any]]:
    """Every [[sources]] entry the daemon needs for the format's traffic."""
    return [SOURCES[fmt], *([NODE_SOURCES[fmt]] if fmt in NODE_SOURCES else [])]


_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_LINKQUALITY = 120  # a plausible Zigbee link quality; excluded by the source anyway


class FormatFactory:
    """The native factory's next good message, rendered in ``fmt`` (one thread only)."""

    def __init__(self, native: MessageFactory, fmt: str) -> None:
        if fmt not in SOURCES:
            raise ValueError(f"no simulated format {fmt!r} (one of {', '.join(SOURCES)})")
        self.native = native
        self.fmt = fmt
        self._queue: deque[tuple[str, bytes]] = deque()
        self._node = sparkplug.SparkplugNode()

    @property
    def bad_sent(self) -> dict[str, int]:
        return dict(self.native.bad_sent)

    @property
    def readings(self) -> int:
        return self.native.readings

    def next(self, elapsed: float, wall: float) -> tuple[str, bytes, str | None]:
        """(topic, payload, None): the formats carry no deliberately bad messages."""
        if not self._queue:
            _, payload, _ = self.native.next(elapsed, wall)
            message = json.loads(payload)
            self._queue.extend(self._render(message["device"], message["ts"], message["metrics"]))
        topic, data = self._queue.popleft()
        return topic, data, None

    def _render(self, serial: str, ts_ms: int, metrics: dict[str, Any]) -> list[tuple[str, bytes]]:
        # Exact: fromtimestamp(ts_ms / 1000) can land a microsecond off through the float.
        at = _EPOCH + timedelta(milliseconds=ts_ms)
        if self.fmt == "tasmota":
            # Tasmota's Time: the device's wall clock without an offset (here UTC).
            wall_clock = at.replace(tzinfo=None).isoformat(timespec="seconds")
            return [(f"tele/{serial}/SENSOR", _json({"Time": wall_clock, **metrics}))]
        if self.fmt == "z2m":
            body = {**metrics, "linkquality": _LINKQUALITY, "last_seen": at.isoformat()}
            return [(f"zigbee2mqtt/{serial}", _json(body))]
        if self.fmt == "sparkplug":
            return self._node.render(serial, ts_ms, metrics)
        if self.fmt == "esphome":
            return [
                (f"esphome/{serial}/sensor/{name}/state", _plain(value).encode())
                for name, value in metrics.items()
            ]
        records: list[dict[str, Any]] = []
        for name, value in metrics.items():
            key = "vb" if isinstance(value, bool) else "vs" if isinstance(value, str) else "v"
            records.append({"n": name, key: value})
        records[0] = {"bn": f"{serial}:", "bt": ts_ms / 1000, **records[0]}
        return [(f"senml/{serial}", _json(records))]


def _json(value: object) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def _plain(value: object) -> str:
    if isinstance(value, bool):
        return "ON" if value else "OFF"
    return value if isinstance(value, str) else json.dumps(value)
