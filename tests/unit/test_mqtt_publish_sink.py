"""ingestor.mqtt's publish sink against paho's own decoding of the same bytes.

`set_publish_sink` makes a client decode runs of QoS 0/1 PUBLISH packets itself and hand them
over in one call; everything else stays paho's. Two clients of `make_client` read the same
byte stream from a real socket, cut into the same pieces: one with a sink, one with paho's
`on_message` only. What each delivers (topic, payload, packet id, QoS, dup, retain, in order)
must be the same, for any mix of packets hypothesis makes: sizes around the length
boundaries, properties short and long, QoS 2, topics that are not UTF-8, PINGRESPs between.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
from collections.abc import Iterator

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from ingestor import mqtt
from tests.support.mqtt_packets import publish_v5
from tests.support.paho_api import client as paho

Delivered = tuple[str, bytes, int, int, bool, bool]


@st.composite
def publishes(draw: st.DrawFn) -> bytes:
    qos = draw(st.sampled_from([0, 1, 1, 1, 2]))
    topic = draw(
        st.one_of(
            st.text(max_size=40).map(lambda t: t.encode()),
            st.just(b"devices/\xff\xfe/telemetry"),  # not UTF-8
            st.just(b""),
        )
    )
    props = draw(
        st.one_of(
            st.just(b""),
            st.just(b"\x02\x00\x00\x0e\x10"),  # Message Expiry Interval 3600
            # A long user property; its value is not always UTF-8 (paho refuses the packet).
            st.one_of(st.binary(min_size=130, max_size=200), st.just(b"v" * 140)).map(
                lambda b: b"\x26\x00\x01k" + struct.pack("!H", len(b)) + b
            ),
        )
    )
    payload = draw(
        st.one_of(st.binary(max_size=300), st.integers(0, 20_000).map(lambda n: b"p" * n))
    )
    mid = draw(st.integers(1, 65_535))
    flags = (0x08 if draw(st.booleans()) else 0) | (0x01 if draw(st.booleans()) else 0)
    return publish_v5(topic, payload, qos=qos, mid=mid, flags=flags, props=props)


PINGRESP = b"\xd0\x00"
streams = st.lists(st.one_of(publishes(), st.just(PINGRESP)), min_size=1, max_size=25)


@contextlib.contextmanager
def broker_side(client: mqtt.Client) -> Iterator[socket.socket]:
    """A socket pair in place of a broker connection: the client reads its end, set as paho's
    connect() would set its socket; the test writes to (and reads from) the other end."""
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    theirs.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
    client._sock = ours
    try:
        yield theirs
    finally:
        client._sock = None
        ours.close()
        theirs.close()


def _deliveries(data: bytes, cuts: list[int], with_sink: bool) -> list[Delivered | int]:
    """What the client delivered, and the code of each read that was not a success (paho
    then drops the connection: the rest of the stream is not read)."""
    got: list[Delivered | int] = []
    client = mqtt.make_client("mqtt://127.0.0.1:1", f"sink-{with_sink}")

    def on_message(_c: mqtt.Client, _u: object, m: mqtt.MQTTMessage) -> None:
        got.append((mqtt.message_topic(m), bytes(m.payload), m.mid, m.qos, m.dup, m.retain))

    client.on_message = on_message
    if with_sink:
        assert mqtt.set_publish_sink(client, got.extend)
    with broker_side(client) as broker:
        start = 0
        for cut in [*sorted(cuts), len(data)]:
            broker.sendall(data[start:cut])
            start = max(start, cut)
            rc = client.loop_read()
            if rc != mqtt.ERR_SUCCESS:
                got.append(int(rc))
                break
    return got


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(stream=streams, data=st.data())
def test_the_sink_delivers_what_paho_delivers(stream: list[bytes], data: st.DataObject) -> None:
    wire = b"".join(stream)
    cuts = data.draw(st.lists(st.integers(0, len(wire)), max_size=6))
    assert _deliveries(wire, cuts, with_sink=True) == _deliveries(wire, cuts, with_sink=False)


def test_a_run_of_publishes_reaches_the_sink_in_one_call() -> None:
    calls: list[int] = []
    client = mqtt.make_client("mqtt://127.0.0.1:1", "sink-run")
    assert mqtt.set_publish_sink(client, lambda run: calls.append(len(run)))
    one = publish_v5(b"a/b", b"{}", qos=1, mid=7)
    with broker_side(client) as broker:
        broker.sendall(one * 200 + PINGRESP + one * 5)
        assert client.loop_read() == mqtt.ERR_SUCCESS
    assert calls == [200, 5]  # paho took the PINGRESP between the two runs


def test_acknowledgements_leave_while_publishes_keep_coming() -> None:
    """A read that goes on (the broker keeps sending) still writes the queued PUBACKs every
    so many packets, not only once the socket runs dry: the broker's in-flight window is freed
    as messages are acknowledged."""
    client = mqtt.make_client("mqtt://127.0.0.1:1", "sink-acks", manual_ack=True)
    assert mqtt.set_publish_sink(client, lambda run: mqtt.ack_many(client, [p[2] for p in run]))
    # What the sink does not take (here, a packet cut by the end of a read) is paho's.
    client.on_message = lambda c, _u, m: mqtt.ack_many(c, [m.mid])
    with broker_side(client) as broker:
        broker.sendall(b"".join(publish_v5(b"a/b", b"{}", qos=1, mid=m) for m in range(1, 20_001)))
        # It reads all 20,000 (several read chunks) and writes on the way.
        assert client.loop_read() == mqtt.ERR_SUCCESS
        broker.setblocking(False)
        acked = broker.recv(1 << 20)
    # What was written during the read (this test never runs paho's own write step): PUBACKs
    # (4 bytes each, packet ids in order) for at least the first thousand messages.
    assert len(acked) % 4 == 0 and len(acked) >= 4 * 1000
    ids = [struct.unpack("!H", acked[i + 2 : i + 4])[0] for i in range(0, len(acked), 4)]
    assert ids == list(range(1, len(ids) + 1))
    assert {acked[i] for i in range(0, len(acked), 4)} == {0x40}


def test_a_paho_without_the_state_the_sink_needs_keeps_paho_decoding() -> None:
    """After a paho upgrade that dropped what the sink relies on, the sink is refused loudly
    and messages still reach on_message."""
    client = mqtt.make_client("mqtt://127.0.0.1:1", "sink-off")
    del client._msgtime_mutex  # as a paho that no longer has it
    with capture_logs() as logs:
        assert mqtt.set_publish_sink(client, lambda run: None) is False
    assert [e["event"] for e in logs] == ["publish_sink_off"]
    assert logs[0]["missing"] == ["_msgtime_mutex"]
    got: list[bytes] = []
    client.on_message = lambda _c, _u, m: got.append(bytes(m.payload))
    with broker_side(client) as broker:
        broker.sendall(publish_v5(b"a/b", b"one") + publish_v5(b"a/b", b"two"))
        client._msgtime_mutex = threading.Lock()  # paho's own read needs it back
        assert client.loop_read() == mqtt.ERR_SUCCESS
    assert got == [b"one", b"two"]


def test_bytes_of_a_lost_connection_are_dropped_with_its_socket() -> None:
    """paho refuses a packet in the middle of a read (QoS 3) and drops the connection; what
    followed it in that read is never handled, and a new socket with nothing to read yet
    makes the read return at once, not spin over the old bytes."""
    got: list[mqtt.Publish] = []
    client = mqtt.make_client("mqtt://127.0.0.1:1", "sink-lost")
    assert mqtt.set_publish_sink(client, got.extend)
    bad = b"\x36\x02\x00\x00"  # PUBLISH with QoS 3: a protocol error
    with broker_side(client) as broker:
        broker.sendall(publish_v5(b"a/b", b"kept") + bad + publish_v5(b"a/b", b"stale") * 10)
        assert client.loop_read() == paho.MQTT_ERR_PROTOCOL
        assert client._sock is None  # paho dropped the connection
    with broker_side(client):  # the next connection, nothing on it yet
        codes: list[int] = []
        reading = threading.Thread(target=lambda: codes.append(client.loop_read()), daemon=True)
        reading.start()
        reading.join(2.0)
        assert not reading.is_alive(), "loop_read spins over bytes of the lost connection"
    assert codes == [mqtt.ERR_SUCCESS]
    assert [p[1] for p in got] == [b"kept"]


def test_a_flood_of_qos0_messages_still_keeps_the_connection_alive() -> None:
    """QoS 0 messages are never acknowledged: while they keep coming, only the keepalive
    tells the broker the client lives. A PINGREQ leaves during a read that goes on."""
    client = mqtt.make_client("mqtt://127.0.0.1:1", "sink-keepalive")
    assert mqtt.set_publish_sink(client, lambda run: None)
    with broker_side(client) as broker:
        # As after a CONNACK, and with nothing sent for 5 s.
        client._state = paho._ConnectionState.MQTT_CS_CONNECTED  # type: ignore[attr-defined]
        client._keepalive = 1
        client._last_msg_out = paho.time_func() - 5
        broker.sendall(b"".join(publish_v5(b"a/b", b"{}") for _ in range(20_000)))
        assert client.loop_read() == mqtt.ERR_SUCCESS
        broker.setblocking(False)
        sent = broker.recv(1 << 16)
    assert sent[:2] == b"\xc0\x00"  # PINGREQ
