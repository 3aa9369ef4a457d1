"""A small fleet of devices in a test database, and an MQTT publisher that waits for PUBACKs."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import psycopg

from ingestor import mqtt as mqttclient

METRICS = {"temperature": "numeric", "humidity": "numeric", "status": "str", "online": "boolean"}


@dataclass(frozen=True)
class Fleet:
    serials: tuple[str, ...]
    bindings: dict[tuple[str, str], int]  # (serial, metric) -> device_metric_id


def make_fleet(dsn: str, prefix: str, n_devices: int = 3, inactive: Iterable[str] = ()) -> Fleet:
    """Devices `<prefix>-0..n` bound to every metric of METRICS."""
    inactive = set(inactive)
    bindings: dict[tuple[str, str], int] = {}
    serials = tuple(f"{prefix}-{i}" for i in range(n_devices))
    with psycopg.connect(dsn, autocommit=True) as conn, conn.transaction():
        metric_ids = {}
        for name, data_type in METRICS.items():
            row = conn.execute(
                "INSERT INTO metrics (metric_type, data_type) VALUES (%s, %s) "
                "ON CONFLICT (metric_type) DO UPDATE SET data_type = EXCLUDED.data_type "
                "RETURNING id",
                (name, data_type),
            ).fetchone()
            assert row
            metric_ids[name] = row[0]
        for serial in serials:
            row = conn.execute(
                "INSERT INTO devices (serial_id, name, is_active) VALUES (%s, %s, %s) RETURNING id",
                (serial, f"Device {serial}", serial not in inactive),
            ).fetchone()
            assert row
            for name, metric_id in metric_ids.items():
                dm = conn.execute(
                    "INSERT INTO device_metrics (device_id, metric_id) VALUES (%s, %s) "
                    "RETURNING id",
                    (row[0], metric_id),
                ).fetchone()
                assert dm
                bindings[(serial, name)] = dm[0]
    return Fleet(serials, bindings)


class Publisher:
    """A QoS 1 publisher; `publish` returns once the broker acknowledged the message."""

    def __init__(self, broker_url: str, client_id: str) -> None:
        self.client = mqttclient.make_client(broker_url, client_id)
        self.client.max_inflight_messages_set(1000)
        self.client.max_queued_messages_set(0)
        self._connected = threading.Event()
        self.client.on_connect = lambda *a: self._connected.set()
        self.client.connect(*mqttclient.host_port(broker_url))
        self.client.loop_start()
        if not self._connected.wait(10):
            raise TimeoutError("publisher could not connect")

    def publish(self, topic: str, body: Any, timeout: float = 10.0) -> None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        info = self.client.publish(topic, data, qos=1)
        info.wait_for_publish(timeout)

    def publish_many(self, items: Iterable[tuple[str, Any]], timeout: float = 30.0) -> int:
        infos = []
        for topic, body in items:
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
            infos.append(self.client.publish(topic, data, qos=1))
        deadline = time.monotonic() + timeout
        for info in infos:
            info.wait_for_publish(max(0.1, deadline - time.monotonic()))
        return sum(1 for info in infos if info.is_published())

    def close(self) -> None:
        self.client.disconnect()
        mqttclient.stop_loop(self.client)


def wait_for(predicate: Any, timeout: float = 15.0, interval: float = 0.05) -> Any:
    """Poll until `predicate()` is truthy; return its value or fail with the last one."""
    deadline = time.monotonic() + timeout
    value = predicate()
    while not value and time.monotonic() < deadline:
        time.sleep(interval)
        value = predicate()
    return value


def count(dsn: str, query: str, *params: Any) -> int:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(query, params).fetchone()
        return int(row[0]) if row else 0
