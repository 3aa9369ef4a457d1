"""Which worker owns a message (`ingestor.handoff.owners_of`): stable, by device, and bounded on
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
    return handoff.owners_of(topic, payload, ROUTER, workers, LIMIT)[0]


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
        "print([handoff.owners_of(f'devices/SN-{i}/telemetry', b'', r, 4, 1)[0]"
        " for i in range(40)])"
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


SENML_ROUTER = sources.router_for(
    ("devices/{serial_id}/telemetry",),
    parse_sources(
        (
            {"name": "senml", "topic": "senml/{x}", "decoder": "senml"},
            {"name": "tpl", "topic": "tpl/{site}", "decoder": "senml", "serial": "{site}-{bn}"},
        )
    ),
)


def serials(topic: str, body: object, router: sources.SourceRouter = ROUTER) -> tuple[str, ...]:
    route = router.match(topic)
    assert route is not None
    return handoff.serials_in_payload(route, json.dumps(body).encode(), LIMIT)


def test_senml_base_name_routes_a_source_without_a_topic_serial() -> None:
    """A SenML device is routed by its serial as the decoder gives it (trailing ':' dropped)."""
    first = json.dumps([{"bn": "urn:dev:SN-3:", "n": "t", "v": 1}]).encode()
    again = json.dumps([{"bn": "urn:dev:SN-3:", "n": "h", "v": 2}]).encode()
    owners = {
        handoff.owners_of(t, p, SENML_ROUTER, 8, LIMIT)[0]
        for t, p in (("senml/a", first), ("senml/b", again))
    }
    assert owners == {zlib.crc32(b"urn:dev:SN-3") % 8} != {handoff.UNROUTABLE_OWNER}


def test_every_device_of_a_gateway_array_in_order_each_once() -> None:
    """Native arrays on the shared topic: every element's device, first appearance first;
    elements that name none (not objects, no device, not a string) are skipped."""
    body = [
        {"device": "GW-B", "metrics": {"t": 1}},
        {"device": "GW-A", "metrics": {"t": 1}},
        "not an object",
        {"metrics": {"t": 1}},
        {"device": 7, "metrics": {"t": 1}},
        {"device": "GW-B", "metrics": {"t": 2}},
        {"device": "GW-C", "metrics": {"nested": {"device": "GW-X"}}},
    ]
    assert serials("telemetry", body) == ("GW-B", "GW-A", "GW-C")
    assert serials("telemetry", {"device": "GW-A", "metrics": {"t": 1}}) == ("GW-A",)
    # A per-device topic names its device, whatever the payload says.
    topic = "devices/GW-A/telemetry"
    assert handoff.owners_of(topic, json.dumps(body).encode(), ROUTER, 4, LIMIT) == (
        zlib.crc32(b"GW-A") % 4,
    )


def test_owners_of_a_gateway_array_primary_first() -> None:
    """The owners of a mixed array, the first device's first, each once."""
    names = [f"GW-{i}" for i in range(12)]
    body = json.dumps([{"device": n, "metrics": {"t": 1}} for n in names]).encode()
    expected = tuple(dict.fromkeys(zlib.crc32(n.encode()) % 3 for n in names))
    assert len(expected) == 3
    assert handoff.owners_of("telemetry", body, ROUTER, 3, LIMIT) == expected
    assert handoff.owners_of("telemetry", body, ROUTER, 1, LIMIT) == (0,)


def test_senml_base_name_applies_to_the_records_after_it() -> None:
    """RFC 8428 4.1: each bn holds until the next; the serial template is applied to it."""
    pack = [
        {"bn": "dev-1:", "n": "t", "v": 1},
        {"n": "h", "v": 2},
        {"bn": "dev-2/", "n": "t", "v": 3},
        {"n": "t", "v": 4},
        {"bn": "dev-1:", "n": "t", "v": 5},
    ]
    assert serials("senml/x", pack, SENML_ROUTER) == ("dev-1", "dev-2")
    assert serials("tpl/north", pack, SENML_ROUTER) == ("north-dev-1", "north-dev-2")
    # Records before any bn: the template alone (the decoder's serial for them too).
    assert serials("tpl/north", [{"n": "t", "v": 1}, *pack], SENML_ROUTER) == (
        "north-",
        "north-dev-1",
        "north-dev-2",
    )
    assert serials("senml/x", [{"n": "t", "v": 1}], SENML_ROUTER) == ()
    assert serials("senml/x", {"bn": "dev-1", "n": "t", "v": 1}, SENML_ROUTER) == ()  # no pack


def test_hostile_payloads_are_read_as_one_process_reads_them() -> None:
    """What the fast reader refuses is read with the stdlib (duplicate keys: the last wins, as
    there; the worker then rejects the message whole); what neither can read names nobody."""
    route = ROUTER.match("telemetry")
    assert route is not None

    def read(payload: bytes) -> tuple[str, ...]:
        return handoff.serials_in_payload(route, payload, LIMIT)

    assert read(b'{"device": "A", "device": "B", "metrics": {"t": 1}}') == ("B",)
    assert read(b'[{"device": "A"}, 5, [1, 2], {"device": "B"}]') == ("A", "B")
    assert read(b'{"device": "A", "metrics": {"t": NaN}}') == ("A",)  # json.loads takes NaN
    assert read(b'{"device": "\\ud800x"}') == ("\ud800x",)  # a lone surrogate
    assert read(b'\xef\xbb\xbf{"device": "A"}') == ("A",)  # a BOM, ignored like the parser
    assert read(b'{"device": "A", "metrics": {"t": 1e999, "u": 123456789012345678901234567}}') == (
        "A",
    )
    deep = b'{"device": "A", "metrics": ' + b"[" * 200_000 + b"]" * 200_000 + b"}"
    assert read(deep) == ()
    assert read(b'[{"device": "A"}, ' + b"[" * 200_000 + b"]" * 200_000 + b"]") == ()
    assert read(b'{"device": "A"') == ()
    assert read(json.dumps({"device": "A", "pad": "y" * LIMIT}).encode()) == ()
    for payload in (deep, b'{"device": "A"', b"\xff"):
        assert owner("telemetry", payload) == handoff.UNROUTABLE_OWNER


def test_one_worker_owns_everything() -> None:
    assert owner("devices/SN-1/telemetry", b"", workers=1) == 0
    assert owner("telemetry", b"\xff", workers=1) == 0


def test_a_message_crosses_the_pipe_field_for_field() -> None:
    """item_of in the receiving process and PipeIntake's rebuild in the worker, over a real
    pipe: every field arrives in its place (the sequence number as mid, generation 0), and a
    message of several owners carries this worker's Split."""
    import multiprocessing

    from ingestor.messages import InboundMessage
    from ingestor.ownership import Split

    sent = InboundMessage("t/a", b'{"x": 1}', 901, 1, True, 5, 1700000000.25, 12.5, False)
    other = InboundMessage("telemetry", b"[]", 902, 1, False, 5, 1700000001.5, 13.75, True)
    inbox, outbox = multiprocessing.Pipe(duplex=False)
    reports, _unused = multiprocessing.Pipe(duplex=False)
    intake = handoff.PipeIntake(
        inbox, handoff.Link(reports), lambda: None, lambda: None, worker=1, workers=3
    )
    intake.start()
    try:
        outbox.send(("msgs", [handoff.item_of(7, sent), handoff.item_of(8, other, (2, 1))]))
        got = intake.take_batch(2, 5.0, 1.0)
    finally:
        outbox.send(("end",))
        intake.thread.join(5)
    assert got == [
        sent._replace(mid=7, generation=0),
        other._replace(mid=8, generation=0, split=Split(1, 3, (2, 1))),
    ]
