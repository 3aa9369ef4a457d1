"""Fault-injection tooling: the daemon as a real process, and a publisher of numbered readings
that remembers which ones the broker acknowledged."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
from psycopg import sql

from ingestor import mqtt as mqttclient
from tests.support.paho_api import client as mqtt

REPO = Path(__file__).resolve().parents[2]


@dataclass
class Daemon:
    """`iothub run` as a subprocess with the given environment."""

    env: dict[str, str]
    log_path: Path
    args: tuple[str, ...] = ("run",)
    process: subprocess.Popen[bytes] | None = None
    starts: int = 0

    def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("IOTHUB_")}
        env.update(self.env)
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "iothub.cli.main", *self.args],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=REPO,
        )
        log.close()
        self.starts += 1

    def wait_log(self, event: str, occurrences: int = 1, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if (
                self.log_path.read_text(errors="replace").count(f'"event": "{event}"')
                >= occurrences
            ):
                return
            if self.process and self.process.poll() is not None:
                raise AssertionError(f"daemon exited with {self.process.returncode}: {self.tail()}")
            time.sleep(0.05)
        raise AssertionError(f"no {event!r} in the daemon log after {timeout}s: {self.tail()}")

    def kill9(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    def terminate(self, timeout: float = 60.0) -> int:
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)

    def tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None


@dataclass
class NumberedPublisher:
    """Publishes reading i (temperature = i at base + i seconds) for i in range(n), QoS 1,
    and records every i the broker acknowledged."""

    broker_url: str
    topic: str
    n: int
    rate: float  # messages per second
    base: datetime = field(
        default_factory=lambda: datetime.now(UTC).replace(microsecond=0) - timedelta(hours=2)
    )
    acked: set[int] = field(default_factory=set)
    _done: threading.Event = field(default_factory=threading.Event)

    def body(self, i: int) -> bytes:
        ts = self.base + timedelta(seconds=i)
        return json.dumps({"ts": ts.isoformat(), "metrics": {"temperature": i}}).encode()

    def run(self) -> threading.Thread:
        thread = threading.Thread(target=self._run, name="numbered-publisher", daemon=True)
        thread.start()
        return thread

    def _run(self) -> None:
        client = mqttclient.make_client(self.broker_url, f"numpub-{id(self)}")
        client.max_inflight_messages_set(100)
        client.max_queued_messages_set(0)
        connected = threading.Event()
        client.on_connect = lambda *args: connected.set()
        client.connect_async(*mqttclient.host_port(self.broker_url))
        client.loop_start()
        connected.wait(10)
        infos = []
        interval = 1.0 / self.rate
        next_at = time.monotonic()
        for i in range(self.n):
            infos.append((i, client.publish(self.topic, self.body(i), qos=1)))
            next_at += interval
            delay = next_at - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not all(_acked(info) for _, info in infos):
            time.sleep(0.1)
        self.acked = {i for i, info in infos if _acked(info)}
        client.disconnect()
        mqttclient.stop_loop(client)
        self._done.set()

    def wait(self, timeout: float) -> None:
        assert self._done.wait(timeout), "publisher did not finish"


def _acked(info: mqtt.MQTTMessageInfo) -> bool:
    """The broker answered with PUBACK, so it owns the message now."""
    try:
        return info.is_published()
    except (RuntimeError, ValueError):
        return False  # published while disconnected: never counted as acknowledged


def stored(dsn: str, dm_id: int, base: datetime) -> tuple[set[int], int]:
    """The numbers stored for the device_metric, and how many rows there are in all."""
    with psycopg.connect(dsn, autocommit=True, connect_timeout=5) as conn:
        rows = conn.execute(
            "SELECT (value_jsonb->>'v')::int FROM telemetries WHERE device_metric_id = %s", (dm_id,)
        ).fetchall()
    return {r[0] for r in rows}, len(rows)


def wait_stored(
    dsn: str, dm_id: int, base: datetime, expected: set[int], timeout: float = 60.0
) -> tuple[set[int], int]:
    deadline = time.monotonic() + timeout
    numbers, total = stored(dsn, dm_id, base)
    while not expected <= numbers and time.monotonic() < deadline:
        time.sleep(0.25)
        try:
            numbers, total = stored(dsn, dm_id, base)
        except psycopg.OperationalError:
            continue
    return numbers, total


def refuse_value(dsn: str, value: str) -> None:
    """A trigger on telemetries that refuses (a data exception, 22023 'refused by policy') every
    row whose value is `value`: a reading that passes validation but not the server."""
    body = sql.SQL("""
        CREATE FUNCTION refuse_poison() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF NEW.value_jsonb ->> 'v' = {value} THEN
                RAISE EXCEPTION 'refused by policy' USING ERRCODE = '22023';
            END IF;
            RETURN NEW;
        END $$;
        CREATE TRIGGER refuse_poison BEFORE INSERT ON telemetries
            FOR EACH ROW EXECUTE FUNCTION refuse_poison();
    """).format(value=sql.Literal(value))
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(body)
