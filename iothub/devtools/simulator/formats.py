"""Simulated traffic in other devices' formats, for `iothub simulate --format`.

Each format re-renders the native factory's good messages (same devices, same series, same
times) as that device family publishes them, on the topic its source in SOURCES reads; the
source table is what the daemon needs in its `sources` setting to ingest the traffic.
"""

from __future__ import annotations

import base64
import hashlib
import json
import random
from collections import deque
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any, Final

from iothub.devtools.simulator import sparkplug
from iothub.devtools.simulator.messages import MessageFactory

FORMATS: Final = ("native", "tasmota", "z2m", "esphome", "senml", "ttn", "sparkplug")
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
    "ttn": {
        "name": "sim-ttn",
        "topic": "v3/{app}/devices/{device}/up",
        "decoder": "ttn",
        "serial": "{device}",
    },
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


def source_for(fmt: str, prefix: str = "") -> dict[str, Any]:
    """The [[sources]] entry of ``fmt``'s traffic published under the topic ``prefix``."""
    entry = dict(SOURCES[fmt])
    entry["topic"] = f"{prefix}{entry['topic']}"
    if "exclude_topics" in entry:
        entry["exclude_topics"] = [f"{prefix}{t}" for t in entry["exclude_topics"]]
    return entry


_LINKQUALITY = 120  # a plausible Zigbee link quality; excluded by the source anyway
_TTN_APP: Final = "iothub-sim"  # The Things Stack application id
_TTN_TENANT: Final = "ttn"  # The Things Network's tenant id
_TTN_GATEWAY: Final = "iothub-sim-gateway"
_TTN_GATEWAY_EUI: Final = "B827EBFFFE000001"
_TTN_AIR: Final = timedelta(milliseconds=2)  # gateway receipt before the Network Server's
_TTN_FORWARD: Final = timedelta(milliseconds=220)  # Network Server to Application Server


class FormatFactory:
    """The native factory's next message, rendered as its device's format (one thread only).

    ``fmt`` is one format for every device, or a table of serial to format in which a device
    not named stays native. Native messages (and every deliberately bad one, which are native)
    pass through as the native factory made them. ``prefix`` goes before every rendered topic,
    as ``source_for`` puts it before the sources' patterns.
    """

    def __init__(
        self, native: MessageFactory, fmt: str | Mapping[str, str], prefix: str = ""
    ) -> None:
        chosen = {fmt} if isinstance(fmt, str) else set(fmt.values()) - {"native"}
        for name in sorted(chosen):
            if name not in SOURCES:
                raise ValueError(f"no simulated format {name!r} (one of {', '.join(SOURCES)})")
        self.native = native
        self.fmt = fmt
        self.prefix = prefix
        self._queue: deque[tuple[str, bytes]] = deque()
        self._frames: dict[str, int] = {}  # ttn: each device's frame counter (f_cnt)
        self._rng = random.Random()
        self._node = sparkplug.SparkplugNode()

    @property
    def bad_sent(self) -> dict[str, int]:
        return dict(self.native.bad_sent)

    @property
    def readings(self) -> int:
        return self.native.readings

    def format_of(self, serial: str) -> str:
        """The format device ``serial`` publishes in."""
        return self.fmt if isinstance(self.fmt, str) else self.fmt.get(serial, "native")

    def next(self, elapsed: float, wall: float) -> tuple[str, bytes, str | None]:
        """(topic, payload, bad kind or None) of the next message."""
        if self._queue:
            topic, data = self._queue.popleft()
            return topic, data, None
        topic, payload, kind = self.native.next(elapsed, wall)
        if kind is not None:
            return topic, payload, kind
        message = json.loads(payload)
        fmt = self.format_of(message["device"])
        if fmt == "native":
            return topic, payload, None
        rendered = self._render(fmt, message["device"], message["ts"], message["metrics"])
        self._queue.extend((f"{self.prefix}{t}", data) for t, data in rendered)
        topic, data = self._queue.popleft()
        return topic, data, None

    def _render(
        self, fmt: str, serial: str, ts_ms: int, metrics: dict[str, Any]
    ) -> list[tuple[str, bytes]]:
        # Exact: fromtimestamp(ts_ms / 1000) can land a microsecond off through the float.
        at = _EPOCH + timedelta(milliseconds=ts_ms)
        if fmt == "tasmota":
            # Tasmota's Time: the device's wall clock without an offset (here UTC).
            wall_clock = at.replace(tzinfo=None).isoformat(timespec="seconds")
            return [(f"tele/{serial}/SENSOR", _json({"Time": wall_clock, **metrics}))]
        if fmt == "z2m":
            body = {**metrics, "linkquality": _LINKQUALITY, "last_seen": at.isoformat()}
            return [(f"zigbee2mqtt/{serial}", _json(body))]
        if fmt == "sparkplug":
            return self._node.render(serial, ts_ms, metrics)
        if fmt == "esphome":
            return [
                (f"esphome/{serial}/sensor/{name}/state", _plain(value).encode())
                for name, value in metrics.items()
            ]
        if fmt == "ttn":
            return [self._uplink(serial, at, metrics)]
        records: list[dict[str, Any]] = []
        for name, value in metrics.items():
            key = "vb" if isinstance(value, bool) else "vs" if isinstance(value, str) else "v"
            records.append({"n": name, key: value})
        records[0] = {"bn": f"{serial}:", "bt": ts_ms / 1000, **records[0]}
        return [(f"senml/{serial}", _json(records))]

    def _uplink(self, serial: str, at: datetime, metrics: dict[str, Any]) -> tuple[str, bytes]:
        """An uplink as The Things Stack's MQTT server publishes it (docs/sources.md)."""
        count = self._frames[serial] = self._frames.get(serial, 0) + 1
        eui = hashlib.sha256(serial.encode()).hexdigest()[:16].upper()
        rng = self._rng
        rssi, snr = -rng.randint(40, 118), round(rng.uniform(-12.0, 10.0), 1)
        body = _json(metrics)
        uplink: dict[str, Any] = {
            "session_key_id": base64.b64encode(eui.encode()[:16]).decode(),
            "f_port": 1,
            "f_cnt": count,
            # The frame a device's formatter would decode; decoded_payload is what it made of it.
            "frm_payload": base64.b64encode(body).decode(),
            "decoded_payload": metrics,
            "rx_metadata": [
                {
                    "gateway_ids": {"gateway_id": _TTN_GATEWAY, "eui": _TTN_GATEWAY_EUI},
                    "time": _nanos(at - _TTN_AIR, rng),
                    "timestamp": (count * 7_919_000) % 2**32,
                    "rssi": rssi,
                    "channel_rssi": rssi,
                    "snr": snr,
                    "uplink_token": base64.b64encode(f"{_TTN_GATEWAY}:{count}".encode()).decode(),
                    "channel_index": count % 8,
                }
            ],
            "settings": {
                "data_rate": {"lora": {"bandwidth": 125000, "spreading_factor": 7}},
                "data_rate_index": 5,
                "coding_rate": "4/5",
                "frequency": str(867_100_000 + 200_000 * (count % 8)),
            },
            # The readings' time: the Network Server's receipt, with nanoseconds.
            "received_at": _nanos(at, rng),
            "consumed_airtime": f"{0.041216 + 0.00256 * len(body):.6f}s",
        }
        message = {
            "end_device_ids": {
                "device_id": serial,
                "application_ids": {"application_id": _TTN_APP},
                "dev_eui": eui,
                "join_eui": "0000000000000000",
                "dev_addr": eui[-8:],
            },
            "correlation_ids": [f"as:up:{rng.getrandbits(80):020X}"],
            "received_at": _nanos(at + _TTN_FORWARD, rng),
            "uplink_message": uplink,
        }
        return f"v3/{_TTN_APP}@{_TTN_TENANT}/devices/{serial}/up", _json(message)


def _nanos(at: datetime, rng: random.Random) -> str:
    """RFC 3339 with nine fraction digits, as The Things Stack writes; beyond the microsecond
    (which iothub cuts) the digits are noise."""
    return f"{at:%Y-%m-%dT%H:%M:%S}.{at.microsecond:06d}{rng.randrange(1000):03d}Z"


def _json(value: object) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def _plain(value: object) -> str:
    if isinstance(value, bool):
        return "ON" if value else "OFF"
    return value if isinstance(value, str) else json.dumps(value)
