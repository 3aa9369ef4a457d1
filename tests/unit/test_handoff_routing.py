"""Which worker owns a message (`ingestor.handoff.owner_of`): stable, by device, and bounded on
hostile payloads (they go to the fixed worker that rejects and records them)."""

from __future__ import annotations

import json
import subprocess
import sys
import zlib

from config.sources import parse_sources
from ingestor import handoff, sources

LIMIT = 256 * 1024
ROUTER = sources.router_for(("devices/{serial_id}/telemetry", "telemetry"), ())


def owner(topic: str, payload: bytes, workers: int = 4) -> int:
    return handoff.owner_of(topic, payload, ROUTER, workers, LIMIT)


def test_one_device_one_owner_whatever_the_topic() -> None:
    """A device's messages on its own topic and on the shared topic reach the same worker."""
    for i in range(50):
        serial = f"SN-{i}"
        own = owner(f"devices/{serial}/telemetry", b"{}")
        shared = owner("telemetry", json.dumps({"device": serial, "metrics": {"t": 1}}).encode())
        batch = owner("telemetry", json.dumps([{"device": serial}, {"device": "other"}]).encode())
        assert own == shared == batch


def test_devices_spread_over_every_worker() -> None:
    owners = {owner(f"devices/SN-{i}/telemetry", b"") for i in range(200)}
    assert owners == {0, 1, 2, 3}


def test_the_same_owner_in_another_process() -> None:
    """crc32, not the salted hash(): a fresh interpreter agrees."""
    code = (
        "from ingestor import handoff, sources;"
        "r = sources.router_for(('devices/{serial_id}/telemetry', 'telemetry'), ());"
        "print([handoff.owner_of(f'devices/SN-{i}/telemetry', b'', r, 4, 1) for i in range(40)])"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert done.stdout.strip() == str([owner(f"devices/SN-{i}/telemetry", b"") for i in range(40)])


def test_unreadable_payloads_go_to_the_fixed_worker() -> None:
    hostile = [
        b"",
        b"\xff\xfe not utf-8",
        b'{"metrics": {"t": 1',
        b"[" * 200_000 + b"]" * 200_000,  # nested past the recursion limit
        b'"just a string"',
        b"[]",
        b'{"device": 42}',
        b'{"device": ""}',
        json.dumps({"device": "x" * 10, "pad": "y" * LIMIT}).encode(),  # over the payload limit
    ]
    for payload in hostile:
        assert owner("telemetry", payload) == handoff.UNROUTABLE_OWNER, payload[:40]
    assert owner("not/a/known/topic", b'{"device": "SN-1"}') == handoff.UNROUTABLE_OWNER


def test_senml_base_name_routes_a_source_without_a_topic_serial() -> None:
    router = sources.router_for(
        ("devices/{serial_id}/telemetry",),
        parse_sources(({"name": "senml", "topic": "senml/{x}", "decoder": "senml"},)),
    )
    first = json.dumps([{"bn": "urn:dev:SN-7:", "n": "t", "v": 1}]).encode()
    again = json.dumps([{"bn": "urn:dev:SN-7:", "n": "h", "v": 2}]).encode()
    owners = {
        handoff.owner_of(t, p, router, 8, LIMIT)
        for t, p in (("senml/a", first), ("senml/b", again))
    }
    assert owners == {zlib.crc32(b"urn:dev:SN-7:") % 8} != {handoff.UNROUTABLE_OWNER}


def test_one_worker_owns_everything() -> None:
    assert owner("devices/SN-1/telemetry", b"", workers=1) == 0
    assert owner("telemetry", b"\xff", workers=1) == 0
