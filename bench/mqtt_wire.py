"""A minimal MQTT 3.1.1 QoS 1 publisher on a raw socket, for loading a broker fast.

paho spends tens of microseconds of Python per publish; a benchmark whose backlog took longer to
load than to drain would be measuring the publisher. Here packets are pre-encoded and written in
large chunks, and a reader thread counts PUBACKs (4 bytes each: nothing else is ever sent to us,
since keepalive is off and we never subscribe). A window of unacknowledged packets keeps the
broker's incoming queue bounded; a packet id is reused only after 65,535 later ones, far beyond
that window, so ids never collide in flight.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections.abc import Callable, Iterable

WINDOW = 20_000  # packets sent and not yet acknowledged
CHUNK = 500  # packets per socket write
ACK_WAIT = 120.0  # seconds to wait for the last PUBACKs


def _remaining_length(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _string(text: str) -> bytes:
    raw = text.encode()
    return struct.pack("!H", len(raw)) + raw


def publish_packet(topic: bytes, payload: bytes, packet_id: int) -> bytes:
    """A PUBLISH packet, QoS 1, not retained."""
    body = struct.pack("!H", len(topic)) + topic + struct.pack("!H", packet_id) + payload
    return b"\x32" + _remaining_length(len(body)) + body


class WirePublisher:
    """One connection, clean session, QoS 1 publishes counted back by their PUBACKs."""

    def __init__(self, host: str, port: int, client_id: str) -> None:
        self.sock = socket.create_connection((host, port), timeout=30)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        var = _string("MQTT") + bytes([4, 0x02]) + struct.pack("!H", 0)  # v3.1.1, clean, no ka
        body = var + _string(client_id)
        self.sock.sendall(b"\x10" + _remaining_length(len(body)) + body)
        connack = self._read_exact(4)
        if connack[0] != 0x20 or connack[3] != 0:
            raise ConnectionError(f"CONNACK refused: {connack!r}")
        self.sent = 0
        self.acked = 0
        self._next_id = 0
        self._reader = threading.Thread(target=self._count_acks, daemon=True)
        self._reader.start()

    def _read_exact(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                raise ConnectionError("broker closed the connection")
            data += chunk
        return data

    def _count_acks(self) -> None:
        leftover = 0
        try:
            while True:
                chunk = self.sock.recv(65536)
                if not chunk:
                    return
                leftover += len(chunk)
                self.acked += leftover // 4
                leftover %= 4
        except OSError:
            return

    def packet_id(self) -> int:
        self._next_id = self._next_id % 65_535 + 1
        return self._next_id

    def send(self, packets: list[bytes]) -> None:
        while self.sent - self.acked > WINDOW:
            time.sleep(0.001)
        self.sock.sendall(b"".join(packets))
        self.sent += len(packets)

    def publish_all(self, items: Iterable[tuple[bytes, bytes]]) -> int:
        """Publish every (topic, payload) as fast as the broker takes them; wait for PUBACKs."""
        chunk: list[bytes] = []
        for topic, payload in items:
            chunk.append(publish_packet(topic, payload, self.packet_id()))
            if len(chunk) >= CHUNK:
                self.send(chunk)
                chunk = []
        if chunk:
            self.send(chunk)
        return self.wait_acked()

    def publish_paced(
        self,
        rate: float,
        duration: float,
        make: Callable[[int, float], tuple[bytes, bytes]],
        tick: float = 0.002,
    ) -> int:
        """Publish `rate` messages per second for `duration` seconds; `make(i, now)` builds
        message i with the wall-clock time it is sent at (to within one tick)."""
        start = time.monotonic()
        i = 0
        while True:
            elapsed = time.monotonic() - start
            if elapsed >= duration:
                break
            due = int(elapsed * rate)
            if due > i:
                now = time.time()
                packets = []
                while i < due:
                    topic, payload = make(i, now)
                    packets.append(publish_packet(topic, payload, self.packet_id()))
                    i += 1
                self.send(packets)
            time.sleep(tick)
        return self.wait_acked()

    def wait_acked(self) -> int:
        deadline = time.monotonic() + ACK_WAIT
        while self.acked < self.sent and time.monotonic() < deadline:
            time.sleep(0.005)
        return self.acked

    def close(self) -> None:
        try:
            self.sock.sendall(b"\xe0\x00")
        finally:
            self.sock.close()
