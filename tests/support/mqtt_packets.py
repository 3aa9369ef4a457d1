"""MQTT packets written out byte by byte, for tests that play the broker's side of a socket."""

from __future__ import annotations

import struct


def remaining_length(n: int) -> bytes:
    """MQTT's variable-length integer (the fixed header's Remaining Length)."""
    out = bytearray()
    while True:
        n, digit = divmod(n, 128)
        out.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(out)


def publish_v5(
    topic: bytes, payload: bytes, *, qos: int = 0, mid: int = 0, flags: int = 0, props: bytes = b""
) -> bytes:
    """An MQTT 5 PUBLISH; `flags` adds dup (0x08) and retain (0x01) to the QoS bits."""
    body = struct.pack("!H", len(topic)) + topic
    if qos:
        body += struct.pack("!H", mid)
    body += remaining_length(len(props)) + props + payload
    return bytes([0x30 | (qos << 1) | flags]) + remaining_length(len(body)) + body
