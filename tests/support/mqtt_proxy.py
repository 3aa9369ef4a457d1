"""A TCP proxy between one MQTT client and the broker that records the packet ids of the
PUBLISHes the broker sends (QoS 1) and of the PUBACKs the client answers, in wire order: what a
test needs to check that acknowledgements leave in the order the messages arrived."""

from __future__ import annotations

import socket
import threading
from dataclasses import dataclass, field

PUBLISH, PUBACK = 3, 4


@dataclass
class Recorded:
    published: list[int] = field(default_factory=list)  # broker → client, QoS 1 packet ids
    acked: list[int] = field(default_factory=list)  # client → broker, PUBACK packet ids
    lock: threading.Lock = field(default_factory=threading.Lock)


def _packets(buffer: bytearray) -> list[tuple[int, bytes]]:
    """Complete packets at the start of `buffer` as (first byte, body), removed from it."""
    out: list[tuple[int, bytes]] = []
    while len(buffer) >= 2:
        length, multiplier, i = 0, 1, 1
        while True:
            if i >= len(buffer):
                return out
            byte = buffer[i]
            length += (byte & 0x7F) * multiplier
            multiplier *= 128
            i += 1
            if not byte & 0x80:
                break
        if len(buffer) < i + length:
            return out
        out.append((buffer[0], bytes(buffer[i : i + length])))
        del buffer[: i + length]
    return out


class MqttProxy:
    """Listens on 127.0.0.1 (an ephemeral port); each accepted connection is piped to the
    broker, and the packets of interest are recorded in `recorded`."""

    def __init__(self, broker_host: str, broker_port: int) -> None:
        self.broker = (broker_host, broker_port)
        self.recorded = Recorded()
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._server.getsockname()[1])
        self._closed = threading.Event()
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, name="mqtt-proxy", daemon=True).start()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.broker)
            self._sockets += [client, upstream]
            for src, dst, kind in ((upstream, client, PUBLISH), (client, upstream, PUBACK)):
                threading.Thread(
                    target=self._pipe, args=(src, dst, kind), name="mqtt-proxy-pipe", daemon=True
                ).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, kind: int) -> None:
        buffer = bytearray()
        r = self.recorded
        while True:
            try:
                data = src.recv(65536)
            except OSError:
                data = b""
            if not data:
                for s in (src, dst):
                    s.close()
                return
            buffer += data
            for first, body in _packets(buffer):
                if first >> 4 != kind:
                    continue
                if kind == PUBLISH and (first >> 1) & 3 == 1:
                    topic_len = int.from_bytes(body[:2], "big")
                    packet_id = int.from_bytes(body[2 + topic_len : 4 + topic_len], "big")
                    with r.lock:
                        r.published.append(packet_id)
                elif kind == PUBACK:
                    with r.lock:
                        r.acked.append(int.from_bytes(body[:2], "big"))
            try:
                dst.sendall(data)
            except OSError:
                src.close()
                return

    def close(self) -> None:
        self._closed.set()
        self._server.close()
        for s in self._sockets:
            s.close()
