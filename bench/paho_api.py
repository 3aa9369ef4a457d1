"""The benchmarks' one door to paho: they measure paho itself (a bare counting subscriber, the
naive one-INSERT subscriber) and publish backlogs with it, so they need it raw; product code
reaches paho only through ingestor/mqtt.py."""

from __future__ import annotations

from paho.mqtt import client
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

__all__ = ["CallbackAPIVersion", "PacketTypes", "Properties", "assert_bare", "client"]


def assert_bare() -> None:
    """The baselines measure paho as shipped: refuse to run one in a process where
    `ingestor.mqtt.make_client` swapped paho's Properties class for its lean one."""
    from paho.mqtt import _packet

    if getattr(_packet, "Properties", Properties) is not Properties:
        raise RuntimeError("paho's Properties is swapped in this process: not a bare baseline")
