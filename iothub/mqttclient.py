"""Small helpers every paho client of the project shares (intake, actions, simulator)."""

from __future__ import annotations

from urllib.parse import unquote, urlsplit

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion


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
