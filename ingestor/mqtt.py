"""Small helpers every paho client of the project shares (intake, actions, simulator)."""

from __future__ import annotations

from urllib.parse import unquote, urlsplit

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

# A PUBLISH is its payload plus a fixed header (up to 5 bytes), the topic (2 + its length), a
# packet id (2) and properties. 4 KiB of room covers every topic iothub subscribes to by
# default (a serial is at most 255 characters) with properties to spare.
PACKET_HEADER_ROOM = 4096  # bytes
MQTT_MAX_PACKET_SIZE = 268_435_455  # bytes: the largest Remaining Length MQTT can encode


def max_packet_size(max_payload_bytes: int) -> int:
    """The MQTT 5 Maximum Packet Size to announce in CONNECT for this payload limit.

    The broker must not send us a larger packet (MQTT 5 §3.1.2.11.4): Mosquitto drops such a
    message for this client instead (and logs it), so an oversize payload never reaches our
    memory, let alone rejected_messages."""
    return min(max_payload_bytes + PACKET_HEADER_ROOM, MQTT_MAX_PACKET_SIZE)


def make_client(url: str, client_id: str, *, manual_ack: bool = False) -> mqtt.Client:
    """An MQTT v5 client with the URL's credentials and TLS applied (not connected yet)."""
    parts = urlsplit(url)
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=mqtt.MQTTv5,
        manual_ack=manual_ack,
    )
    if parts.username:
        client.username_pw_set(
            unquote(parts.username), unquote(parts.password) if parts.password else None
        )
    if parts.scheme == "mqtts":
        client.tls_set()
    return client


def host_port(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    default = 8883 if parts.scheme == "mqtts" else 1883
    return parts.hostname or "127.0.0.1", parts.port or default


def stop_loop(client: mqtt.Client) -> None:
    """`loop_stop()`, then close the wake-up socket pair paho leaves open (paho 2.x)."""
    client.loop_stop()
    client._reset_sockets(sockpair_only=True)
