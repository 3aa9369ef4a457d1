"""The broker configuration in mosquitto/ run for real: logins, the ACL, queues, persistence.

Each broker is a throwaway Mosquitto started from the repository's own mosquitto.conf (or
mosquitto-dev.conf) with only its container paths redirected into a temporary directory and the
listener moved to a free port on 127.0.0.1, so these tests fail when the shipped files break.
"""

from __future__ import annotations

import contextlib
import io
import os
import queue
import re
import shutil
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from config.settings import DEFAULT_CLIENT_ID, DEFAULT_MAX_PAYLOAD, Settings
from ingestor import mqtt as mqttclient
from iothub.devtools.demo.console import Console
from iothub.devtools.demo.environment import Environment
from rules_engine.actions import exceptions, targets
from rules_engine.actions import mqtt as actions_mqtt
from tests.support.paho_api import (
    CallbackAPIVersion,
    MQTTProtocolVersion,
    PacketTypes,
    Properties,
    ReasonCode,
)
from tests.support.paho_api import client as mqtt

MOSQUITTO_DIR = Path(__file__).resolve().parents[2] / "mosquitto"
MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
MOSQUITTO_PASSWD = shutil.which("mosquitto_passwd")

WAIT = 5.0  # seconds for any single broker answer; locally they take milliseconds
START_TIMEOUT = 10.0  # seconds for the broker to listen
RECONNECT_DELAY = 0.05  # seconds
NOT_AUTHORIZED = 0x87  # MQTT v5 reason code
FIRST_FAILURE_CODE = 0x80  # MQTT v5: reason codes below this are successes

SERVICE = ("iothub", "service-secret")
ACTIONS = ("iothub-actions", "actions-secret")
CONSUMER = ("alerts-consumer", "consumer-secret")
SIMULATOR = ("simulator", "simulator-secret")
DEVICE_1 = ("SN-ACL-0001", "device-1-secret")
DEVICE_2 = ("SN-ACL-0002", "device-2-secret")
LOGINS = (SERVICE, ACTIONS, CONSUMER, SIMULATOR, DEVICE_1, DEVICE_2)
SERVICE_CLIENT_ID = DEFAULT_CLIENT_ID  # the service's public default client id
SESSION_EXPIRY = 300  # seconds, for the persistent sessions of these tests

pytestmark = pytest.mark.skipif(
    not Path(MOSQUITTO).exists() or MOSQUITTO_PASSWD is None,
    reason="needs the mosquitto and mosquitto_passwd binaries",
)


# --- a throwaway broker -------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _redirect(text: str, old: str, new: str) -> str:
    # Every rewrite must hit: if the shipped file changes shape, this test must notice.
    assert old in text, f"{old!r} no longer in the shipped config"
    return text.replace(old, new)


def _local_config(name: str, base: Path, port: int) -> str:
    """The shipped config `name` with its listener on `port` and its paths inside `base`."""
    text = (MOSQUITTO_DIR / name).read_text()
    text, count = re.subn(r"^listener 1883$", f"listener {port} 127.0.0.1", text, flags=re.M)
    assert count == 1, "the shipped config must have exactly one `listener 1883`"
    text = _redirect(text, "persistence_location /mosquitto/data/", f"persistence_location {base}/")
    if "password_file" in text:
        text = _redirect(text, "/mosquitto/config/passwd", str(base / "passwd"))
        text = _redirect(text, "/mosquitto/config/acl", str(MOSQUITTO_DIR / "acl"))
    if os.geteuid() == 0:
        # As root Mosquitto switches to the `mosquitto` user, which cannot read a private tmp dir.
        text += "\nuser root\n"
    return text


def _write_passwords(path: Path) -> None:
    # The workflow mosquitto/README.md documents: login:password lines, hashed in place by -U.
    assert MOSQUITTO_PASSWD is not None
    path.write_text("".join(f"{login}:{password}\n" for login, password in LOGINS))
    subprocess.run([MOSQUITTO_PASSWD, "-U", str(path)], check=True, timeout=30)
    assert "service-secret" not in path.read_text()


class Broker:
    """A Mosquitto process on a config of ours, restartable, with its log kept for failures."""

    def __init__(self, config_name: str, base: Path) -> None:
        base.mkdir(parents=True, exist_ok=True)
        self.port = _free_port()
        self.base = base
        self.conf = base / "broker.conf"
        self.conf.write_text(_local_config(config_name, base, self.port))
        self.log = base / "broker.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [MOSQUITTO, "-c", str(self.conf)], stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"mosquitto exited {self.process.returncode}: {self.tail()}")
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5),
            ):
                return
            time.sleep(0.05)
        raise TimeoutError(f"mosquitto not listening on {self.port}: {self.tail()}")

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            # SIGTERM: a clean stop, which also writes the persistence file.
            self.process.terminate()
            try:
                self.process.wait(WAIT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(WAIT)
        self.process = None

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    """The production configuration (mosquitto.conf + acl) with a generated password file."""
    base = tmp_path_factory.mktemp("mosquitto-prod")
    _write_passwords(base / "passwd")
    server = Broker("mosquitto.conf", base)
    server.start()
    try:
        yield server
    finally:
        server.stop()


# --- a client with bounded waits ----------------------------------------------------------------


class Client:
    """A paho client whose every step waits at most WAIT seconds for the broker's answer."""

    def __init__(
        self,
        port: int,
        login: tuple[str, str] | None,
        *,
        protocol: MQTTProtocolVersion = mqtt.MQTTv5,
        client_id: str | None = None,
        persistent: bool = False,
    ) -> None:
        self.port = port
        self.protocol = protocol
        self.client_id = client_id or f"acl-test-{uuid.uuid4().hex[:12]}"
        self.messages: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self.connect_reason: ReasonCode | None = None
        self.session_present: bool | None = None
        self.disconnects = 0  # connections the broker (or the network) ended, not close()
        self.disconnected = threading.Event()
        self._closing = False
        self._connected = threading.Event()
        self._lock = threading.Condition()
        self._pubacks: dict[int, ReasonCode] = {}
        self._subacks: dict[int, list[ReasonCode]] = {}

        # v3.1.1 has no clean start: a persistent session is asked for at construction.
        clean_session = (not persistent) if protocol != mqtt.MQTTv5 else None
        self.paho = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            protocol=protocol,
            clean_session=clean_session,
        )
        if login is not None:
            self.paho.username_pw_set(*login)
        # paho's network thread sleeps out its reconnect delay (1 s by default) before
        # loop_stop() can join it; refused logins and stopped brokers would each cost that.
        self.paho.reconnect_delay_set(min_delay=RECONNECT_DELAY, max_delay=RECONNECT_DELAY)  # type: ignore[arg-type]
        self.paho.on_connect = self._on_connect
        self.paho.on_publish = self._on_publish
        self.paho.on_subscribe = self._on_subscribe
        self.paho.on_message = self._on_message
        self.paho.on_disconnect = self._on_disconnect

    def _on_connect(
        self, _c: object, _u: object, flags: mqtt.ConnectFlags, reason: ReasonCode, _p: object
    ) -> None:
        self.connect_reason = reason
        self.session_present = flags.session_present
        self._connected.set()

    def _on_disconnect(
        self, _c: object, _u: object, _f: object, _reason: ReasonCode, _p: object
    ) -> None:
        if not self._closing:
            self.disconnects += 1
            self.disconnected.set()

    def _on_publish(self, _c: object, _u: object, mid: int, reason: ReasonCode, _p: object) -> None:
        with self._lock:
            self._pubacks[mid] = reason
            self._lock.notify_all()

    def _on_subscribe(
        self, _c: object, _u: object, mid: int, reasons: list[ReasonCode], _p: object
    ) -> None:
        with self._lock:
            self._subacks[mid] = reasons
            self._lock.notify_all()

    def _on_message(self, _c: object, _u: object, message: mqtt.MQTTMessage) -> None:
        self.messages.put((message.topic, bytes(message.payload)))

    def connect(self, *, session_expiry: int | None = None) -> ReasonCode:
        """Connect and return the CONNACK reason (a failure for refused logins)."""
        self._connected.clear()
        if session_expiry is None:
            self.paho.connect("127.0.0.1", self.port)
        else:
            props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            props.SessionExpiryInterval = session_expiry
            self.paho.connect("127.0.0.1", self.port, clean_start=False, properties=props)
        self.paho.loop_start()
        assert self._connected.wait(WAIT), "no CONNACK"
        assert self.connect_reason is not None
        return self.connect_reason

    def subscribe(self, topic: str) -> None:
        result, mid = self.paho.subscribe(topic, qos=1)
        assert result == mqtt.MQTT_ERR_SUCCESS and mid is not None
        with self._lock:
            assert self._lock.wait_for(lambda: mid in self._subacks, WAIT), "no SUBACK"
            assert not any(reason.is_failure for reason in self._subacks[mid])

    def publish(self, topic: str, payload: bytes) -> ReasonCode:
        """Publish with QoS 1 and return the PUBACK's reason (always success on v3.1.1)."""
        info = self.paho.publish(topic, payload, qos=1)
        with self._lock:
            assert self._lock.wait_for(lambda: info.mid in self._pubacks, WAIT), "no PUBACK"
            return self._pubacks[info.mid]

    def expect(self) -> tuple[str, bytes]:
        try:
            return self.messages.get(timeout=WAIT)
        except queue.Empty:
            raise AssertionError(f"{self.client_id}: nothing received within {WAIT}s") from None

    def received_now(self) -> list[tuple[str, bytes]]:
        out = []
        while True:
            try:
                out.append(self.messages.get_nowait())
            except queue.Empty:
                return out

    def close(self) -> None:
        self._closing = True
        with contextlib.suppress(Exception):
            self.paho.disconnect()
        # Also closes the wake-up socket pair paho leaves open (a ResourceWarning otherwise).
        mqttclient.stop_loop(self.paho)


@pytest.fixture
def clients() -> Iterator[list[Client]]:
    """Collects the test's clients and closes them all at the end."""
    made: list[Client] = []
    yield made
    for client in made:
        client.close()


def _connected(
    clients: list[Client], broker: Broker, login: tuple[str, str] | None, **kwargs: object
) -> Client:
    client = Client(broker.port, login, **kwargs)  # type: ignore[arg-type]
    clients.append(client)
    reason = client.connect()
    assert not reason.is_failure, f"{login and login[0]} refused: {reason}"
    return client


def _marker() -> bytes:
    return f'{{"marker": "{uuid.uuid4().hex}"}}'.encode()


# --- the tests ----------------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", [mqtt.MQTTv311, mqtt.MQTTv5], ids=["v3.1.1", "v5"])
def test_device_publishes_under_its_own_login_and_the_service_receives_it(
    broker: Broker, clients: list[Client], protocol: MQTTProtocolVersion
) -> None:
    """A device may publish to devices/<its login>/telemetry, and the iothub login reads it."""
    service = _connected(clients, broker, SERVICE)
    service.subscribe("devices/+/telemetry")
    device = _connected(clients, broker, DEVICE_1, protocol=protocol)
    payload = _marker()

    reason = device.publish(f"devices/{DEVICE_1[0]}/telemetry", payload)

    assert not reason.is_failure
    assert service.expect() == (f"devices/{DEVICE_1[0]}/telemetry", payload)


@pytest.mark.parametrize("protocol", [mqtt.MQTTv311, mqtt.MQTTv5], ids=["v3.1.1", "v5"])
def test_publish_outside_the_devices_own_topic_is_not_delivered(
    broker: Broker, clients: list[Client], protocol: MQTTProtocolVersion
) -> None:
    """Another device's topic and the shared `telemetry` topic are denied to a device login."""
    service = _connected(clients, broker, SERVICE)
    service.subscribe("devices/+/telemetry")
    service.subscribe("telemetry")
    device = _connected(clients, broker, DEVICE_1, protocol=protocol)

    forged = device.publish(f"devices/{DEVICE_2[0]}/telemetry", b'{"forged": 1}')
    shared = device.publish("telemetry", b'{"forged": 2}')
    # Sent last on the same connection: once it arrives, a delivered forgery would have too.
    own = _marker()
    device.publish(f"devices/{DEVICE_1[0]}/telemetry", own)

    assert service.expect() == (f"devices/{DEVICE_1[0]}/telemetry", own)
    assert service.received_now() == []
    if protocol == mqtt.MQTTv5:
        assert forged.value == NOT_AUTHORIZED
        assert shared.value == NOT_AUTHORIZED
    else:
        # v3.1.1 has no way to say no: the broker acknowledges and drops (see mosquitto/acl).
        assert not forged.is_failure
        assert not shared.is_failure


def test_action_publisher_may_publish_alerts_but_not_telemetry(
    broker: Broker, clients: list[Client]
) -> None:
    """The iothub-actions login may write alerts/# for rule actions, and no device topic; the
    intake's login, whose connection it must not share, writes nothing at all."""
    actions = _connected(clients, broker, ACTIONS)
    service = _connected(clients, broker, SERVICE)

    alert = actions.publish(f"alerts/{DEVICE_1[0]}", b'{"rule": "too hot"}')
    telemetry = actions.publish(f"devices/{DEVICE_1[0]}/telemetry", b"{}")
    alert_by_intake = service.publish(f"alerts/{DEVICE_1[0]}", b'{"rule": "too hot"}')

    # 0x10 "no matching subscribers" is a success: nobody listens to alerts in this test.
    assert alert.value < FIRST_FAILURE_CODE
    assert telemetry.value == NOT_AUTHORIZED
    assert alert_by_intake.value == NOT_AUTHORIZED


def test_alerts_consumer_receives_what_the_action_publisher_sends(
    broker: Broker, clients: list[Client]
) -> None:
    """alerts-consumer reads alerts/# (and may not write there); a device may not read them."""
    consumer = _connected(clients, broker, CONSUMER)
    consumer.subscribe("alerts/#")
    actions = _connected(clients, broker, ACTIONS)
    device = _connected(clients, broker, DEVICE_1)
    # Mosquitto 2.0 grants the subscription and checks each message against the read ACL.
    device.subscribe("alerts/#")
    payload = _marker()

    forged = consumer.publish(f"alerts/{DEVICE_1[0]}", b'{"forged": 1}')
    actions.publish(f"alerts/{DEVICE_1[0]}", payload)

    assert consumer.expect() == (f"alerts/{DEVICE_1[0]}", payload)
    assert consumer.received_now() == []
    assert forged.value == NOT_AUTHORIZED
    assert device.received_now() == []


def test_simulator_publishes_for_any_device_and_the_shared_topic(
    broker: Broker, clients: list[Client]
) -> None:
    """The simulator login may write every device's topic and `telemetry`."""
    service = _connected(clients, broker, SERVICE)
    service.subscribe("devices/+/telemetry")
    service.subscribe("telemetry")
    simulator = _connected(clients, broker, SIMULATOR)
    first, second, shared = _marker(), _marker(), _marker()

    simulator.publish(f"devices/{DEVICE_1[0]}/telemetry", first)
    simulator.publish(f"devices/{DEVICE_2[0]}/telemetry", second)
    simulator.publish("telemetry", shared)

    assert [service.expect() for _ in range(3)] == [
        (f"devices/{DEVICE_1[0]}/telemetry", first),
        (f"devices/{DEVICE_2[0]}/telemetry", second),
        ("telemetry", shared),
    ]


def test_service_reads_through_a_shared_subscription(broker: Broker, clients: list[Client]) -> None:
    """$share/iothub/devices/+/telemetry delivers to the iothub login (several instances)."""
    service = _connected(clients, broker, SERVICE)
    service.subscribe("$share/iothub/devices/+/telemetry")
    device = _connected(clients, broker, DEVICE_2)
    payload = _marker()

    device.publish(f"devices/{DEVICE_2[0]}/telemetry", payload)

    assert service.expect() == (f"devices/{DEVICE_2[0]}/telemetry", payload)


@pytest.mark.parametrize("login", [None, (DEVICE_1[0], "wrong-password"), ("nobody", "x")], ids=str)
def test_anonymous_and_bad_logins_are_refused(
    broker: Broker, clients: list[Client], login: tuple[str, str] | None
) -> None:
    """allow_anonymous is false and only the password file's logins get in."""
    client = Client(broker.port, login)
    clients.append(client)

    assert client.connect().is_failure


def test_offline_session_keeps_more_than_the_default_queue_across_a_restart(
    tmp_path: Path, clients: list[Client]
) -> None:
    """1500 messages (default max_queued_messages is 1000) wait for the offline service, even
    across a broker restart."""
    base = tmp_path / "broker"
    base.mkdir()
    _write_passwords(base / "passwd")
    server = Broker("mosquitto.conf", base)
    server.start()
    count = 1500
    try:
        service = Client(server.port, SERVICE, client_id="iothub-persistent")
        clients.append(service)
        assert not service.connect(session_expiry=300).is_failure
        service.subscribe("devices/+/telemetry")
        service.close()

        device = _connected(clients, server, DEVICE_1)
        for n in range(count):
            assert not device.publish(f"devices/{DEVICE_1[0]}/telemetry", b"%d" % n).is_failure
        device.close()

        server.stop()
        server.start()

        service = Client(server.port, SERVICE, client_id="iothub-persistent")
        clients.append(service)
        assert not service.connect(session_expiry=300).is_failure
        received = {service.expect()[1] for _ in range(count)}
    finally:
        server.stop()

    assert received == {b"%d" % n for n in range(count)}


def test_dev_config_loads_and_lets_anonymous_clients_through(
    tmp_path: Path, clients: list[Client]
) -> None:
    """mosquitto-dev.conf starts, and an anonymous client can publish and subscribe."""
    server = Broker("mosquitto-dev.conf", tmp_path / "dev")
    server.start()
    try:
        subscriber = _connected(clients, server, None)
        subscriber.subscribe("devices/+/telemetry")
        publisher = _connected(clients, server, None, protocol=mqtt.MQTTv311)
        payload = _marker()

        publisher.publish("devices/ANY/telemetry", payload)

        assert subscriber.expect() == ("devices/ANY/telemetry", payload)
    finally:
        server.stop()


# --- client ids bound to logins -----------------------------------------------------------------


def _persistent(
    clients: list[Client],
    broker: Broker,
    login: tuple[str, str],
    client_id: str,
    protocol: MQTTProtocolVersion = mqtt.MQTTv5,
) -> Client:
    """A connection with clean start off (v5: session expiry too) under `client_id`."""
    client = Client(broker.port, login, protocol=protocol, client_id=client_id, persistent=True)
    clients.append(client)
    # v3.1.1 has no session expiry: clean_session=False, set at construction, is the request.
    reason = client.connect(session_expiry=SESSION_EXPIRY if protocol == mqtt.MQTTv5 else None)
    assert not reason.is_failure, f"{login[0]} refused: {reason}"
    return client


@pytest.mark.parametrize("protocol", [mqtt.MQTTv311, mqtt.MQTTv5], ids=["v3.1.1", "v5"])
def test_a_device_login_cannot_resume_or_discard_the_service_session(
    tmp_path: Path, clients: list[Client], protocol: MQTTProtocolVersion
) -> None:
    """A device connecting with the service's client id and clean start off gets no session of
    the service's, receives none of its queued telemetry, and the service later gets all of it."""
    base = tmp_path / "broker"
    base.mkdir()
    _write_passwords(base / "passwd")
    server = Broker("mosquitto.conf", base)
    server.start()
    queued = [_marker() for _ in range(5)]
    try:
        service = _persistent(clients, server, SERVICE, SERVICE_CLIENT_ID)
        service.subscribe("devices/+/telemetry")
        service.close()
        publisher = _connected(clients, server, DEVICE_2)
        for payload in queued:
            assert not publisher.publish(f"devices/{DEVICE_2[0]}/telemetry", payload).is_failure

        intruder = _persistent(clients, server, DEVICE_1, SERVICE_CLIENT_ID, protocol)
        # Anything queued for the service would be sent right after CONNACK: a subscription
        # round trip on the intruder's connection lets it arrive before we look.
        intruder.paho.subscribe(f"devices/{DEVICE_1[0]}/ignored", qos=1)
        time.sleep(0.2)
        intruder_saw = intruder.received_now()
        intruder_session = intruder.session_present
        intruder.close()

        service = _persistent(clients, server, SERVICE, SERVICE_CLIENT_ID)
        received = [service.expect()[1] for _ in queued]
        service_session = service.session_present
    finally:
        server.stop()

    assert intruder_session is False
    assert intruder_saw == []
    assert service_session is True
    assert received == queued


def test_a_device_login_cannot_kick_the_service_off(broker: Broker, clients: list[Client]) -> None:
    """Connecting again and again with the service's client id does not disconnect the service."""
    service = _persistent(clients, broker, SERVICE, SERVICE_CLIENT_ID)
    service.subscribe("devices/+/telemetry")

    for _ in range(3):
        intruder = Client(broker.port, DEVICE_1, client_id=SERVICE_CLIENT_ID)
        clients.append(intruder)
        assert not intruder.connect().is_failure
        intruder.close()
    device = _connected(clients, broker, DEVICE_2)
    payload = _marker()
    device.publish(f"devices/{DEVICE_2[0]}/telemetry", payload)

    assert service.expect() == (f"devices/{DEVICE_2[0]}/telemetry", payload)
    assert service.disconnects == 0


def test_intake_and_action_publisher_logins_stay_connected_together(
    broker: Broker, clients: list[Client]
) -> None:
    """The service's two connections (intake, action publisher) have their own logins, so the
    broker keeps both, whatever client ids they send."""
    intake = _persistent(clients, broker, SERVICE, SERVICE_CLIENT_ID)
    intake.subscribe("devices/+/telemetry")
    actions = _connected(clients, broker, ACTIONS, client_id=f"{SERVICE_CLIENT_ID}-actions")

    alert = actions.publish(f"alerts/{DEVICE_1[0]}", _marker())
    device = _connected(clients, broker, DEVICE_1)
    payload = _marker()
    device.publish(f"devices/{DEVICE_1[0]}/telemetry", payload)

    assert alert.value < FIRST_FAILURE_CODE
    assert intake.expect() == (f"devices/{DEVICE_1[0]}/telemetry", payload)
    assert intake.disconnects == 0
    assert actions.disconnects == 0


def _login_url(port: int, login: tuple[str, str]) -> str:
    return f"mqtt://{login[0]}:{login[1]}@127.0.0.1:{port}"


def test_action_publisher_never_uses_the_intakes_login(
    broker: Broker, clients: list[Client]
) -> None:
    """Without a login of its own the action publisher fails its deliveries instead of taking
    the intake's session over; with mqtt_actions_url it publishes and the intake stays on."""
    intake = _persistent(clients, broker, SERVICE, SERVICE_CLIENT_ID)
    intake.subscribe("devices/+/telemetry")
    consumer = _connected(clients, broker, CONSUMER)
    consumer.subscribe("alerts/#")
    target = targets.PublishTarget(topic=f"alerts/{DEVICE_1[0]}")
    shared = actions_mqtt.MqttPublisher(Settings(mqtt_url=_login_url(broker.port, SERVICE)), WAIT)
    own = actions_mqtt.MqttPublisher(
        Settings(
            mqtt_url=_login_url(broker.port, SERVICE),
            mqtt_actions_url=_login_url(broker.port, ACTIONS),
        ),
        WAIT,
    )
    payload = _marker()
    try:
        with pytest.raises(exceptions.DeliveryFailed, match="mqtt_actions_url"):
            shared.publish(target, b"{}")
        outcome = own.publish(target, payload)
    finally:
        shared.close()
        own.close()

    assert "acknowledged" in outcome
    assert consumer.expect() == (f"alerts/{DEVICE_1[0]}", payload)
    assert intake.disconnects == 0


# --- message size -------------------------------------------------------------------------------


def _shipped_max_packet_size(name: str) -> int:
    values = re.findall(r"^max_packet_size (\d+)$", (MOSQUITTO_DIR / name).read_text(), re.M)
    assert len(values) == 1, f"{name} must set max_packet_size once"
    return int(values[0])


@pytest.mark.parametrize("protocol", [mqtt.MQTTv311, mqtt.MQTTv5], ids=["v3.1.1", "v5"])
def test_oversize_publish_is_refused_and_a_max_payload_one_passes(
    broker: Broker, clients: list[Client], protocol: MQTTProtocolVersion
) -> None:
    """A publish over max_packet_size is dropped (and its sender disconnected); one with a
    payload of the service's max_payload_bytes still arrives."""
    limit = _shipped_max_packet_size("mosquitto.conf")
    service = _connected(clients, broker, SERVICE)
    service.subscribe("devices/+/telemetry")
    sender = _connected(clients, broker, DEVICE_1, protocol=mqtt.MQTTv311)
    big = Client(broker.port, DEVICE_2, protocol=protocol)
    clients.append(big)
    assert not big.connect().is_failure
    topic = f"devices/{DEVICE_2[0]}/telemetry"

    # Sent without waiting for a PUBACK: the broker answers with a disconnect instead (paho
    # 2.2 sends it even though a v5 CONNACK announced the limit).
    info = big.paho.publish(topic, b"x" * limit, qos=1)
    assert info.rc == mqtt.MQTT_ERR_SUCCESS
    assert big.disconnected.wait(WAIT), "the broker kept the oversize sender connected"
    fits = b"y" * DEFAULT_MAX_PAYLOAD
    sender.publish(f"devices/{DEVICE_1[0]}/telemetry", fits)

    topic_seen, body = service.expect()
    assert (topic_seen, len(body)) == (f"devices/{DEVICE_1[0]}/telemetry", len(fits))
    assert service.received_now() == []


def test_dev_config_has_the_same_packet_limit() -> None:
    """The demo broker drops what the production one drops."""
    assert _shipped_max_packet_size("mosquitto-dev.conf") == _shipped_max_packet_size(
        "mosquitto.conf"
    )


def test_the_demo_never_connects_under_a_service_login(
    tmp_path: Path, clients: list[Client]
) -> None:
    """`iothub demo` configured with the service's broker URL (login included) does not even
    probe that broker: the shipped broker binds sessions to logins, so the probe alone would
    discard the service's queued telemetry. It starts a broker of its own, and the service's
    session keeps every queued reading."""
    base = tmp_path / "broker"
    base.mkdir()
    _write_passwords(base / "passwd")
    server = Broker("mosquitto.conf", base)
    server.start()
    queued = [_marker() for _ in range(3)]
    try:
        service = _persistent(clients, server, SERVICE, SERVICE_CLIENT_ID)
        service.subscribe("devices/+/telemetry")
        service.close()
        publisher = _connected(clients, server, DEVICE_2)
        for payload in queued:
            assert not publisher.publish(f"devices/{DEVICE_2[0]}/telemetry", payload).is_failure

        url = f"mqtt://{SERVICE[0]}:{SERVICE[1]}@127.0.0.1:{server.port}"
        settings = Settings(mqtt_url=url)
        with contextlib.ExitStack() as stack:
            env = Environment(settings, stack, Console(io.StringIO()), keep=False)
            chosen, shared = env.broker()
        assert shared is False and chosen != url

        service = _persistent(clients, server, SERVICE, SERVICE_CLIENT_ID)
        received = [service.expect()[1] for _ in queued]
        assert service.session_present is True
    finally:
        server.stop()
    assert received == queued
