"""What a decoded reading costs against a native one: the decode stage, per reading.

Everything after decoding (catalogue resolution, type check, encoding, the COPY, rules) is the
same code for every source, so the decode stage is where a decoder can cost more; its ratio to
native is an upper bound on the ratio of the whole intake. Each case is a message of the same
readings (6 numbers, one time) in a device family's own form.

    .venv/bin/python bench/decoders_bench.py [--repeat N]
"""

from __future__ import annotations

import argparse
import json
import timeit
from collections.abc import Callable
from datetime import UTC, datetime
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
    {"name": "sparkplug", "topic": "spBv1.0/g/{t}/{n}/{d}", "decoder": "sparkplug_b",
     "serial": "{d}"},
]  # fmt: skip
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
    # One reading per message: compare it with a native message of one metric.
    "native_1": (
        "devices/SN-1/telemetry",
        json.dumps({"ts": NOW.isoformat(), "metrics": {"temperature": 21.7}}).encode(),
        1,
    ),
    "value": ("esp/SN-1/sensor/temperature/state", b"21.7", 1),
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


def per_reading(call: Callable[[], object], readings: int, repeat: int) -> float:
    """Microseconds per reading, best of five runs of ``repeat`` calls."""
    best = min(timeit.repeat(call, number=repeat, repeat=5))
    return best / repeat / readings * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=20_000)
    args = parser.parse_args()
    router = router_for(("devices/{serial_id}/telemetry",), parse_sources(SOURCES))
    born(router)
    limits = Limits()
    figures = {}
    for name, (topic, data, readings) in CASES.items():
        route = router.match(topic)
        assert route is not None, topic
        parsed = route.decode(data, NOW, limits)
        assert len(parsed.readings) == readings and not parsed.rejections, (name, parsed)

        def call(topic: str = topic, data: bytes = data) -> object:
            found = router.match(topic)  # the routing is part of the cost
            assert found is not None
            return found.decode(data, NOW, limits)

        figures[name] = per_reading(call, readings, args.repeat)
    for name, micros in figures.items():
        native = figures["native_1" if name == "value" else "native"]
        print(f"(decode) {name:<9} {micros:6.2f} us/reading  {micros / native:5.2f} x native")


if __name__ == "__main__":
    main()
