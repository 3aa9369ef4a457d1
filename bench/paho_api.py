"""The benchmarks' one door to paho: they measure paho itself (a bare counting subscriber, the
naive one-INSERT subscriber) and publish backlogs with it, so they need it raw; product code
reaches paho only through ingestor/mqtt.py."""

from __future__ import annotations

from paho.mqtt import client
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

__all__ = ["CallbackAPIVersion", "PacketTypes", "Properties", "client"]
