"""The tests' one door to paho. Product code reaches paho only through ingestor/mqtt.py; tests
also need paho raw: clients that talk to the broker as a device or an intruder would (ACLs,
sessions, retained messages) and paho's own message and reason-code objects to drive the
callbacks with. They import it from here, so the ruff ban on paho has two exceptions in all."""

from __future__ import annotations

from paho.mqtt import client
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

__all__ = [
    "CallbackAPIVersion",
    "MQTTProtocolVersion",
    "PacketTypes",
    "Properties",
    "ReasonCode",
    "client",
]
