"""The simulator's publisher: one MQTT connection publishing a MessageFactory's messages.

Built to load the service from one process: one paho client (through `ingestor.mqtt`), a tight
publish loop paced by the monotonic clock, and at most `max_in_flight` QoS 1 messages
unacknowledged (fewer if the broker's Receive Maximum says so).

Device time: by default the wall clock. `time_scale` > 1 makes it run faster from `start_time`
(the demo uses 60: a device minute per second, so that rules with durations fire within a
minute); it is never allowed ahead of the wall clock, where the service would refuse it.

`run_simulation(...)` is the library entry (the demo and benchmarks call it in-process); it
returns a SimResult. The command is `iothub.cli.simulate`.
"""

from __future__ import annotations

import os
import random
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, tzinfo
from typing import Any, Final

import structlog

from config.settings import DEFAULT_MAX_PAYLOAD
from ingestor import mqtt as mqttclient
from iothub.devtools.simulator.devices import SimDevice
from iothub.devtools.simulator.formats import FormatFactory
from iothub.devtools.simulator.messages import MessageFactory

log = structlog.get_logger(__name__)

DEFAULT_QOS: Final = 1
DEFAULT_MAX_IN_FLIGHT: Final = 1000  # QoS 1/2 messages published and not yet acknowledged
MAX_MID: Final = 65_000  # below paho's 16-bit message ids, so in-flight ids never collide
PROGRESS_INTERVAL: Final = 5.0  # seconds between simulate_progress lines
CONNECT_TIMEOUT: Final = 10.0  # seconds to get the broker's CONNACK
DRAIN_TIMEOUT: Final = 10.0  # seconds to wait for outstanding acknowledgements at the end
MAX_BURST: Final = 500  # messages published between two looks at the clock and the stop flag
MAX_SLEEP: Final = 0.05  # seconds: longest nap of the pacing loop, so a stop is seen quickly
ACK_WAIT: Final = 0.05  # seconds: longest wait for an acknowledgement when the window is full
KEEPALIVE: Final = 30  # seconds
CLIENT_ID_PREFIX: Final = "iothub-simulator"


class SimulationError(Exception):
    """The simulation cannot run."""


@dataclass(frozen=True)
class SimResult:
    """What one simulation did."""

    sent: int  # messages handed to the broker connection
    acked: int  # of those, acknowledged by the broker (QoS 0: written to the socket)
    bad_sent: Mapping[str, int]  # deliberately bad messages, by kind (BAD_KINDS)
    seconds: float  # from the first message to the end of the run
    readings: int = 0  # good readings in the good messages

    @property
    def rate(self) -> float:
        """Messages per second."""
        return self.sent / self.seconds if self.seconds > 0 else 0.0


class Simulator:
    """One MQTT connection publishing the factory's messages at a steady rate.

    `sent` and `acked` may be read from other threads while `run()` runs (the demo shows them).
    """

    def __init__(
        self,
        broker_url: str,
        factory: MessageFactory | FormatFactory,
        *,
        rate: float,
        duration: float | None,
        stop: threading.Event | None = None,
        qos: int = DEFAULT_QOS,
        client_id: str | None = None,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
        progress_interval: float | None = PROGRESS_INTERVAL,
    ) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        if duration is not None and duration <= 0:
            raise ValueError("duration must be positive")
        if qos not in (0, 1, 2):
            raise ValueError("qos must be 0, 1 or 2")
        if not 1 <= max_in_flight <= MAX_MID:
            raise ValueError(f"max_in_flight must be between 1 and {MAX_MID}")
        self.broker_url = broker_url
        self.factory = factory
        self.rate = rate
        self.duration = duration
        self.stop = stop or threading.Event()
        self.qos = qos
        self.client_id = client_id or f"{CLIENT_ID_PREFIX}-{os.getpid()}"
        self.max_in_flight = max_in_flight
        self.progress_interval = progress_interval
        self.sent = 0
        self.acked = 0
        self._window = max_in_flight
        self._connected = threading.Event()
        self._refused: str | None = None
        self._ack_cond = threading.Condition()
        self._waiting = False
        self._closing = False
        self._client = mqttclient.make_client(broker_url, self.client_id)
        # Our own window bounds what is in flight; paho must never hold messages back itself.
        self._client.max_inflight_messages_set(max_in_flight)
        self._client.max_queued_messages_set(0)
        self._client.connect_timeout = CONNECT_TIMEOUT
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_publish = self._on_publish

    @property
    def in_flight(self) -> int:
        return self.sent - self.acked

    # --- paho callbacks (network thread): count and signal, never raise

    @mqttclient.guarded("on_connect")
    def _on_connect(
        self,
        _client: mqttclient.Client,
        _userdata: Any,
        _flags: mqttclient.ConnectFlags,
        reason_code: mqttclient.ReasonCode,
        properties: mqttclient.Properties | None,
    ) -> None:
        if reason_code.is_failure:
            self._refused = str(reason_code)
            log.error("simulate_connect_refused", reason=self._refused)
        else:
            receive_max = mqttclient.receive_maximum(properties)
            if receive_max is not None:
                # MQTT 5: more unacknowledged QoS>0 messages than this may get us disconnected.
                self._window = min(self.max_in_flight, receive_max)
            log.info("simulate_connected", client_id=self.client_id, window=self._window)
        self._connected.set()

    @mqttclient.guarded("on_disconnect")
    def _on_disconnect(
        self,
        _client: mqttclient.Client,
        _userdata: Any,
        _flags: mqttclient.DisconnectFlags,
        reason_code: mqttclient.ReasonCode,
        _properties: mqttclient.Properties | None,
    ) -> None:
        if not self._closing:
            log.warning("simulate_disconnected", reason=str(reason_code), in_flight=self.in_flight)

    @mqttclient.guarded("on_publish")
    def _on_publish(
        self,
        _client: mqttclient.Client,
        _userdata: Any,
        _mid: int,
        _reason_code: mqttclient.ReasonCode,
        _properties: mqttclient.Properties | None,
    ) -> None:
        self.acked += 1
        if self._waiting:
            with self._ack_cond:
                self._ack_cond.notify()

    # --- the run

    def _connect(self) -> None:
        host, port = mqttclient.host_port(self.broker_url)
        try:
            self._client.connect(host, port, keepalive=KEEPALIVE, clean_start=True)
        except OSError as exc:
            raise SimulationError(f"cannot connect to the broker at {host}:{port}: {exc}") from None
        self._client.loop_start()
        if not self._connected.wait(CONNECT_TIMEOUT) or self._refused is not None:
            self._client.disconnect()
            mqttclient.stop_loop(self._client)
            why = self._refused or f"no CONNACK within {CONNECT_TIMEOUT:g}s"
            raise SimulationError(f"the broker at {host}:{port} refused us: {why}")

    def _wait_for_room(self) -> bool:
        """Wait (briefly) until the window has room; False when it still has none."""
        if self.sent - self.acked < self._window:
            return True
        with self._ack_cond:
            self._waiting = True
            try:
                if self.sent - self.acked >= self._window:
                    self._ack_cond.wait(ACK_WAIT)
            finally:
                self._waiting = False
        return self.sent - self.acked < self._window

    def run(self) -> SimResult:
        """Publish until `duration` passed or `stop` is set; then wait for the acknowledgements."""
        self._connect()
        factory, client, qos = self.factory, self._client, self.qos
        started = time.monotonic()
        last_progress, last_sent = started, 0
        try:
            while not self.stop.is_set():
                elapsed = time.monotonic() - started
                if self.duration is not None and elapsed >= self.duration:
                    break
                due = int(self.rate * elapsed) + 1 - self.sent
                if due <= 0:
                    time.sleep(min(MAX_SLEEP, (self.sent + 1) / self.rate - elapsed))
                    continue
                wall = time.time()
                for _ in range(min(due, MAX_BURST)):
                    if not self._wait_for_room():
                        break
                    topic, payload, _kind = factory.next(elapsed, wall)
                    info = client.publish(topic, payload, qos=qos)
                    if info.rc == mqttclient.ERR_SUCCESS or (
                        qos > 0 and info.rc == mqttclient.ERR_NO_CONN
                    ):
                        # QoS>0 while disconnected: paho keeps it and sends it on reconnect.
                        self.sent += 1
                now = time.monotonic()
                if self.progress_interval and now - last_progress >= self.progress_interval:
                    log.info(
                        "simulate_progress",
                        sent=self.sent,
                        acked=self.acked,
                        in_flight=self.in_flight,
                        rate=round((self.sent - last_sent) / (now - last_progress), 1),
                        bad=sum(factory.bad_sent.values()),
                    )
                    last_progress, last_sent = now, self.sent
            seconds = time.monotonic() - started
            self._drain()
        finally:
            self._closing = True
            self._client.disconnect()
            mqttclient.stop_loop(self._client)
        result = SimResult(
            sent=self.sent,
            acked=self.acked,
            bad_sent=dict(factory.bad_sent),
            seconds=seconds,
            readings=factory.readings,
        )
        log.info(
            "simulate_done",
            sent=result.sent,
            acked=result.acked,
            bad=dict(result.bad_sent),
            readings=result.readings,
            seconds=round(result.seconds, 2),
            rate=round(result.rate, 1),
        )
        return result

    def _drain(self) -> None:
        deadline = time.monotonic() + DRAIN_TIMEOUT
        while self.acked < self.sent and time.monotonic() < deadline:
            time.sleep(0.01)
        if self.acked < self.sent:
            log.warning("simulate_unacknowledged", count=self.sent - self.acked)


# The positional order is the one the demo and the benchmark were promised.
def run_simulation(  # noqa: PLR0917
    broker_url: str,
    topics: Sequence[str],
    devices: Sequence[SimDevice],
    rate: float,
    duration: float | None,
    bad_share: float = 0.0,
    stop: threading.Event | None = None,
    *,
    qos: int = DEFAULT_QOS,
    client_id: str | None = None,
    readings_per_message: int | None = None,
    max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
    max_payload_bytes: int = DEFAULT_MAX_PAYLOAD,
    start_time: datetime | None = None,
    time_scale: float = 1.0,
    tz: tzinfo = UTC,
    progress_interval: float | None = PROGRESS_INTERVAL,
    seed: int | str | None = None,
) -> SimResult:
    """Publish simulated telemetry of `devices` at `rate` messages/s for `duration` seconds
    (None: until `stop` is set). Raises SimulationError when the broker cannot be reached."""
    return Simulator(
        broker_url,
        MessageFactory(
            topics,
            devices,
            bad_share=bad_share,
            readings_per_message=readings_per_message,
            origin=(start_time or datetime.now(UTC)).timestamp(),
            time_scale=time_scale,
            max_payload_bytes=max_payload_bytes,
            tz=tz,
            rng=random.Random(seed),
        ),
        rate=rate,
        duration=duration,
        stop=stop,
        qos=qos,
        client_id=client_id,
        max_in_flight=max_in_flight,
        progress_interval=progress_interval,
    ).run()
