"""ingestor.mqtt's buffered reads: paho's framing over a buffer, and what a lost socket leaves.

`make_client` builds a client that reads its socket in chunks of up to 64 KiB and handles
every packet a chunk holds in one wake of the network thread. These tests send packets that
straddle the chunk (sizes around the remaining-length boundaries, payloads above the chunk)
through Mosquitto, and script a server over a real TCP socket for what a broker never does:
a packet cut across two sends, and a malformed packet followed by bytes that must die with
the connection they came on.
"""

from __future__ import annotations

import queue
import socket
import threading
import uuid

from ingestor import mqtt
from tests.support.mqtt_packets import publish_v5

WAIT = 10.0  # seconds
# Around one-byte/two-byte/three-byte remaining lengths (127/128, 16383/16384) and above the
# read chunk (65,536), with small ones between so that a chunk ends inside a packet.
SIZES = [0, 1, 100, 122, 123, 127, 128, 300, 16_370, 16_384, 70_000, 5, 65_536, 131_072, 9]


def test_every_payload_arrives_whole_and_in_order_through_the_broker(broker_url: str) -> None:
    topic = f"buffered/{uuid.uuid4().hex}"
    sends = [bytes([i % 251]) * SIZES[i % len(SIZES)] for i in range(600)]
    got: queue.Queue[tuple[bytes, int]] = queue.Queue()
    subscribed = threading.Event()
    receiver = mqtt.make_client(broker_url, f"buf-rx-{uuid.uuid4().hex[:8]}")
    receiver.on_connect = lambda c, *_: c.subscribe(topic, qos=1)
    receiver.on_subscribe = lambda *_: subscribed.set()
    receiver.on_message = lambda _c, _u, m: got.put((bytes(m.payload), m.qos))
    receiver.connect(*mqtt.host_port(broker_url))
    receiver.loop_start()
    sender = mqtt.make_client(broker_url, f"buf-tx-{uuid.uuid4().hex[:8]}")
    sender.connect(*mqtt.host_port(broker_url))
    sender.loop_start()
    try:
        assert subscribed.wait(WAIT), "no SUBACK"
        infos = [sender.publish(topic, body, qos=1) for body in sends]  # a flood: no waiting
        for info in infos:
            info.wait_for_publish(WAIT)
        received = [got.get(timeout=WAIT) for _ in sends]
    finally:
        for client in (sender, receiver):
            client.disconnect()
            mqtt.stop_loop(client)
    assert [len(body) for body, _ in received] == [len(body) for body in sends]
    assert [body for body, _ in received] == sends
    assert {qos for _, qos in received} == {1}


def _publish(topic: str, payload: bytes) -> bytes:
    """A QoS 0 MQTT 5 PUBLISH without properties."""
    return publish_v5(topic.encode(), payload)


CONNACK = b"\x20\x03\x00\x00\x00"  # v5: no session present, success, no properties
# A fixed header whose remaining length runs past four bytes: paho refuses it (protocol error).
MALFORMED = b"\x30\xff\xff\xff\xff\x7f"


class ScriptedServer:
    """One TCP listener on 127.0.0.1: each accepted connection reads the CONNECT, then gets the
    next script's byte strings, one `sendall` each with a pause between, and is left open."""

    def __init__(self, scripts: list[list[bytes]]) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._scripts = scripts
        self.accepted = 0
        self._peers: list[socket.socket] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        for script in self._scripts:
            peer, _ = self._listener.accept()
            self._peers.append(peer)
            self.accepted += 1
            peer.recv(65_536)  # the CONNECT
            for chunk in script:
                peer.sendall(chunk)
                threading.Event().wait(0.05)

    def close(self) -> None:
        for peer in self._peers:
            peer.close()
        self._listener.close()


def test_packets_cut_across_reads_and_a_burst_in_one_read_are_all_handled() -> None:
    burst = b"".join(_publish("t/burst", str(i).encode()) for i in range(300))
    cut = _publish("t/cut", b"x" * 1000)
    server = ScriptedServer([[CONNACK + burst, cut[:3], cut[3:500], cut[500:]]])
    got: queue.Queue[tuple[str, bytes]] = queue.Queue()
    client = mqtt.make_client(f"mqtt://127.0.0.1:{server.port}", "scripted")
    client.on_message = lambda _c, _u, m: got.put((mqtt.message_topic(m), bytes(m.payload)))
    client.connect("127.0.0.1", server.port)
    client.loop_start()
    try:
        received = [got.get(timeout=WAIT) for _ in range(301)]
    finally:
        client.disconnect()
        mqtt.stop_loop(client)
        server.close()
    assert received[:300] == [("t/burst", str(i).encode()) for i in range(300)]
    assert received[300] == ("t/cut", b"x" * 1000)


def test_bytes_read_on_a_lost_connection_are_never_handled_on_the_next() -> None:
    """The malformed header ends the first connection (paho: protocol error) while the rest of
    that read, a well-formed PUBLISH, is still in the buffer; it must not be handled."""
    stale = _publish("t/stale", b"from the lost connection")
    fresh = _publish("t/fresh", b"from the new connection")
    server = ScriptedServer([[CONNACK, MALFORMED + stale], [CONNACK + fresh]])
    got: queue.Queue[tuple[str, bytes]] = queue.Queue()
    client = mqtt.make_client(f"mqtt://127.0.0.1:{server.port}", "scripted-lost")
    client.reconnect_delay_set(min_delay=1, max_delay=1)
    client.on_message = lambda _c, _u, m: got.put((mqtt.message_topic(m), bytes(m.payload)))
    client.connect("127.0.0.1", server.port)
    client.loop_start()
    try:
        first = got.get(timeout=WAIT)
        assert server.accepted == 2  # it did reconnect
        try:
            more = got.get(timeout=0.5)
        except queue.Empty:
            more = None
    finally:
        client.disconnect()
        mqtt.stop_loop(client)
        server.close()
    assert first == ("t/fresh", b"from the new connection")
    assert more is None
