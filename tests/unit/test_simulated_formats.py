"""`iothub simulate --format`: each format's traffic decodes, with its printed source, into the
same readings as the native traffic it was rendered from."""

from __future__ import annotations

import random
import time
from datetime import UTC, datetime

import pytest

from config.sources import parse_sources
from ingestor.payload import Limits
from ingestor.sources import router_for
from iothub.devtools.simulator import formats
from iothub.devtools.simulator.devices import DEFAULT_METRICS, SimDevice
from iothub.devtools.simulator.messages import MessageFactory

NATIVE = ("devices/{serial_id}/telemetry",)
MESSAGES = 40  # messages of each format checked


def factory(origin: float, topics: tuple[str, ...] = NATIVE) -> MessageFactory:
    devices = [SimDevice(f"SIM-{i:04d}", DEFAULT_METRICS) for i in range(3)]
    return MessageFactory(
        topics,
        devices,
        bad_share=0.0,
        readings_per_message=None,
        origin=origin,
        time_scale=1.0,
        max_payload_bytes=256 * 1024,
        tz=UTC,
        rng=random.Random(7),
    )


@pytest.mark.parametrize("fmt", [f for f in formats.FORMATS if f != "native"])
def test_format_traffic_decodes_like_the_native_traffic(fmt: str) -> None:
    """Same (serial, metric, value, ts) as native, no rejection, through the printed source."""
    native_router = router_for(NATIVE, ())
    router = router_for(NATIVE, parse_sources(formats.sources_of(fmt)))
    # One origin for both: the device times derive from it.
    origin = time.time() - 60
    native, rendered = factory(origin), formats.FormatFactory(factory(origin), fmt)
    now = datetime.now(UTC)
    limits = Limits()
    expected, got = set(), set()
    for _ in range(MESSAGES):
        topic, data, kind = native.next(30.0, time.time())
        route = native_router.match(topic)
        assert route is not None and kind is None
        expected |= {
            (r.serial_id, r.metric, r.value, r.ts) for r in route.decode(data, now, limits).readings
        }
    while rendered.readings < native.readings or rendered._queue:
        topic, data, kind = rendered.next(30.0, time.time())
        route = router.match(topic)
        assert route is not None and route.source is not None, topic
        parsed = route.decode(data, now, limits)
        for birth in parsed.births:  # what batch.prepare does with a Sparkplug birth
            router.aliases.apply(birth)
        assert parsed.rejections == (), (topic, data, parsed.rejections)
        got |= {(r.serial_id, r.metric, r.value, r.ts) for r in parsed.readings}
    if fmt in ("esphome",):
        # One value per topic has no time of its own: the readings are at receipt.
        assert {k[:3] for k in got} == {k[:3] for k in expected}
    elif fmt == "tasmota":
        # Tasmota's Time has whole seconds.
        assert {(*k[:3], k[3].replace(microsecond=0)) for k in expected} == got
    else:
        assert got == expected


def test_mixed_formats_under_a_prefix_decode_like_the_native_traffic() -> None:
    """The demo's traffic: devices take native, z2m and ttn in turn, under a topic prefix;
    through the native topics and the prefixed sources every reading is the native one's."""
    prefix = "iothub-demo-1/"
    native_topics = tuple(f"{prefix}{t}" for t in NATIVE)
    sources = parse_sources([formats.source_for(f, prefix) for f in ("z2m", "ttn")])
    native_router = router_for(native_topics, ())
    router = router_for(native_topics, sources)
    origin = time.time() - 60
    serials = [f"SIM-{i:04d}" for i in range(3)]
    speakers = dict(zip(serials, ("native", "z2m", "ttn"), strict=True))

    native = factory(origin, native_topics)
    mixed = formats.FormatFactory(factory(origin, native_topics), speakers, prefix)
    now, limits = datetime.now(UTC), Limits()
    expected, got, seen = set(), set(), set()
    for _ in range(MESSAGES):
        topic, data, _ = native.next(30.0, time.time())
        route = native_router.match(topic)
        assert route is not None
        expected |= {
            (r.serial_id, r.metric, r.value, r.ts) for r in route.decode(data, now, limits).readings
        }
        topic, data, _ = mixed.next(30.0, time.time())
        assert topic.startswith(prefix), topic
        route = router.match(topic)
        assert route is not None, topic
        seen.add(None if route.source is None else route.source.name)
        parsed = route.decode(data, now, limits)
        assert parsed.rejections == (), (topic, parsed.rejections)
        got |= {(r.serial_id, r.metric, r.value, r.ts) for r in parsed.readings}

    assert got == expected
    assert seen == {None, "sim-z2m", "sim-ttn"}
    assert [mixed.format_of(s) for s in serials] == ["native", "z2m", "ttn"]
