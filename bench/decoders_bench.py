"""What a decoded reading costs against a native one: the decode stage, per reading.

Everything after decoding (catalogue resolution, type check, encoding, the COPY, rules) is the
same code for every source, so the decode stage is where a decoder can cost more; its ratio to
native is an upper bound on the ratio of the whole intake. Each case is a message of the same
readings (6 numbers, one time) in a device family's own form.

The cases take turns, round after round, and each keeps its best round: on a machine whose
cores other work shares, a slow spell then hurts every case alike instead of the one that ran
during it, which is what a ratio needs.

    .venv/bin/python bench/decoders_bench.py [--repeat N] [--rounds N]
"""

from __future__ import annotations

import argparse
import json
import timeit
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo

from config.sources import parse_sources
from ingestor.decoders import sparkplug_b_pb2 as pb
from ingestor.decoders.sparkplug_b import DataType
from ingestor.payload import Limits
from ingestor.sources import SourceRouter, router_for

NOW = datetime.now(UTC).replace(microsecond=0)
AMSTERDAM_WALL = NOW.astimezone(ZoneInfo("Europe/Amsterdam")).replace(tzinfo=None)
VALUES = {
    "temperature": 21.7,
    "humidity": 66.6,
    "pressure": 988.6,
    "co2": 424,
    "pm25": 3.1,
    "voc": 87,
}
SOURCES = [
    {"name": "tasmota", "topic": "tele/{n}/SENSOR", "decoder": "tasmota", "serial": "{n}",
     "time_zone": "Europe/Amsterdam"},
    {"name": "z2m", "topic": "z2m/{n+}", "decoder": "flat_json", "serial": "{n}",
     "time_field": "last_seen"},
    {"name": "esphome", "topic": "esp/{n}/sensor/{o}/state", "decoder": "value", "serial": "{n}",
     "metric": "{o}"},
    {"name": "ttn", "topic": "v3/{app}/devices/{n}/up", "decoder": "ttn", "serial": "{n}"},
    {"name": "sparkplug", "topic": "spBv1.0/g/{t}/{n}/{d}", "decoder": "sparkplug_b",
     "serial": "{d}"},
]  # fmt: skip
# The Things Stack's documented uplink (docs/sources.md) around the same readings, with its three
# nanosecond times.
TTN_TIME = f"{NOW:%Y-%m-%dT%H:%M:%S}.000000123Z"
TTN_UPLINK = {
    "end_device_ids": {
        "device_id": "SN-1",
        "application_ids": {"application_id": "app1"},
        "dev_eui": "0004A30B001C0530",
        "join_eui": "800000000000000C",
        "dev_addr": "00BCB929",
    },
    "correlation_ids": ["as:up:01E0WZGT6Y7657CPFPE5WEYDSQ"],
    "received_at": TTN_TIME,
    "uplink_message": {
        "session_key_id": "AXA50tHUGUucuzS/bCGMNw==",
        "f_port": 1,
        "f_cnt": 1,
        "frm_payload": "gkHe",
        "decoded_payload": VALUES,
        "rx_metadata": [
            {
                "gateway_ids": {"gateway_id": "gtw1", "eui": "9C5C8E00001A05C4"},
                "time": TTN_TIME,
                "timestamp": 2463457000,
                "rssi": -35,
                "channel_rssi": -35,
                "snr": 5,
                "uplink_token": "ChIKEAoEZ3R3MRIInFyOAAAaBcQQ6L3Vlgk=",
                "channel_index": 2,
            }
        ],
        "settings": {
            "data_rate": {"lora": {"bandwidth": 125000, "spreading_factor": 7}},
            "data_rate_index": 5,
            "coding_rate": "4/6",
            "frequency": "868300000",
        },
        "received_at": TTN_TIME,
        "consumed_airtime": "0.056576s",
    },
}


def ttn_uplink(decoded: dict[str, Any]) -> bytes:
    """The uplink above around ``decoded`` as its decoded_payload."""
    message: dict[str, Any] = json.loads(json.dumps(TTN_UPLINK))
    message["uplink_message"]["decoded_payload"] = decoded
    return json.dumps(message).encode()


_MS = int(NOW.timestamp() * 1000)
# Sparkplug: the DBIRTH (applied before timing) defines aliases; the DDATA is what is timed.
SPARKPLUG_BIRTH = pb.Payload(
    timestamp=_MS,
    metrics=[
        pb.Payload.Metric(name=name, alias=i, datatype=DataType.Double, double_value=value)
        for i, (name, value) in enumerate(VALUES.items(), 1)
    ],
).SerializeToString()
CASES: dict[str, tuple[str, bytes, int]] = {
    "native": (
        "devices/SN-1/telemetry",
        json.dumps({"ts": NOW.isoformat(), "metrics": VALUES}).encode(),
        len(VALUES),
    ),
    "tasmota": (
        "tele/SN-1/SENSOR",
        json.dumps(
            {
                "Time": AMSTERDAM_WALL.isoformat(),
                "SCD40": VALUES,
                "TempUnit": "C",
            }
        ).encode(),
        len(VALUES),
    ),
    "flat_json": (
        "z2m/kitchen/SN-1",
        json.dumps({**VALUES, "last_seen": NOW.isoformat()}).encode(),
        len(VALUES),
    ),
    "ttn": ("v3/app1@ttn/devices/SN-1/up", ttn_uplink(VALUES), len(VALUES)),
    # One reading per message: compare it with a native message of one metric.
    "native_1": (
        "devices/SN-1/telemetry",
        json.dumps({"ts": NOW.isoformat(), "metrics": {"temperature": 21.7}}).encode(),
        1,
    ),
    "value": ("esp/SN-1/sensor/temperature/state", b"21.7", 1),
    # The same uplink carrying one reading: its metadata is the whole per-message cost.
    "ttn_1": ("v3/app1@ttn/devices/SN-1/up", ttn_uplink({"temperature": 21.7}), 1),
    "sparkplug": (
        "spBv1.0/g/DDATA/edge/SN-1",
        pb.Payload(
            timestamp=_MS,
            seq=2,
            metrics=[
                pb.Payload.Metric(alias=i, double_value=value)
                for i, value in enumerate(VALUES.values(), 1)
            ],
        ).SerializeToString(),
        len(VALUES),
    ),
}


def born(router: SourceRouter) -> None:
    """Apply the Sparkplug birth as batch.prepare does, so the DDATA's aliases resolve."""
    route = router.match("spBv1.0/g/DBIRTH/edge/SN-1")
    assert route is not None
    for birth in route.decode(SPARKPLUG_BIRTH, NOW, Limits()).births:
        router.aliases.apply(birth)


def per_reading(seconds: float, readings: int, repeat: int) -> float:
    """Microseconds per reading of ``repeat`` calls that took ``seconds``."""
    return seconds / repeat / readings * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5_000, help="calls per case and round")
    parser.add_argument("--rounds", type=int, default=15, help="rounds; each case keeps its best")
    args = parser.parse_args()
    router = router_for(("devices/{serial_id}/telemetry",), parse_sources(SOURCES))
    born(router)
    limits = Limits()
    calls: dict[str, Callable[[], object]] = {}
    for name, (topic, data, readings) in CASES.items():
        route = router.match(topic)
        assert route is not None, topic
        parsed = route.decode(data, NOW, limits)
        assert len(parsed.readings) == readings and not parsed.rejections, (name, parsed)

        def call(topic: str = topic, data: bytes = data) -> object:
            found = router.match(topic)  # the routing is part of the cost
            assert found is not None
            return found.decode(data, NOW, limits)

        calls[name] = call
    best = dict.fromkeys(CASES, float("inf"))
    for _ in range(args.rounds):
        for name, timed in calls.items():
            best[name] = min(best[name], timeit.timeit(timed, number=args.repeat))
    figures = {
        name: per_reading(seconds, CASES[name][2], args.repeat) for name, seconds in best.items()
    }
    for name, micros in figures.items():
        native = figures["native_1" if CASES[name][2] == 1 else "native"]
        print(f"(decode) {name:<9} {micros:6.2f} us/reading  {micros / native:5.2f} x native")


if __name__ == "__main__":
    main()
