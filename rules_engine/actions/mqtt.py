"""The mqtt action sender: publishes on a dedicated clean-session client of its own and waits
for the broker's acknowledgement."""

from __future__ import annotations

import json
import threading
import time
from typing import Any, Final

import structlog
from pydantic import JsonValue

from config.settings import Settings
from ingestor import mqtt
from rules_engine.actions import exceptions, sender, targets
from rules_engine.model import actions as actions_model

log = structlog.get_logger(__name__)

PUBLISH_TIMEOUT: Final = 10.0  # seconds to be connected to the broker, and again for its PUBACK
MQTT_RECONNECT_MIN, MQTT_RECONNECT_MAX = 1, 30  # seconds; paho doubles the delay between them
CONNECT_WAIT_SLICE: Final = 0.1  # seconds between checks for a stop while awaiting the broker


class MqttPublisher:
    """The action publisher's own MQTT connection (clean session), opened on first use, so an
    instance without mqtt actions keeps no second connection to the broker."""

    def __init__(
        self, settings: Settings, timeout: float, stopping: threading.Event | None = None
    ) -> None:
        self._url = settings.mqtt_actions_url or settings.mqtt_url
        self._client_id = settings.mqtt_actions_client_id or f"{settings.mqtt_client_id}-actions"
        self._keepalive = settings.mqtt_keepalive
        self._timeout = timeout
        self._stopping = stopping or threading.Event()
        self._host, self._port = mqtt.host_port(self._url)
        # A broker that binds client ids to logins (the shipped mosquitto.conf) gives a login one
        # connection: a second one under the intake's login would take the intake's session
        # over and discard its queued telemetry. So that login is never used here.
        self._login_clash: str | None = None
        intake_login = settings.mqtt.username
        if intake_login is not None and settings.mqtt_actions.username == intake_login:
            self._login_clash = (
                f"mqtt actions need a broker login of their own: the publisher would share "
                f"{intake_login!r} with the intake and take its session over; "
                f"set mqtt_actions_url"
            )
            log.warning("actions_mqtt_login_shared", login=intake_login, why=self._login_clash)
        self._client: mqtt.Client | None = None
        self._connected = threading.Event()
        self._refused: str | None = None  # why the broker last refused the connection
        self._acks_lock = threading.Lock()
        # Reason codes of PUBACK/PUBCOMP by message id; ids wrap at 65535, which bounds it.
        self._acks: dict[int, mqtt.ReasonCode] = {}

    @property
    def client_id(self) -> str:
        return self._client_id

    def _start(self) -> mqtt.Client:
        client = mqtt.make_client(self._url, self._client_id)
        client.reconnect_delay_set(MQTT_RECONNECT_MIN, MQTT_RECONNECT_MAX)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        client.connect_async(self._host, self._port, keepalive=self._keepalive, clean_start=True)
        client.loop_start()
        log.info(
            "actions_mqtt_starting", host=self._host, port=self._port, client_id=self._client_id
        )
        self._client = client
        return client

    def deliver(self, delivery: sender.Delivery) -> str:
        target = delivery.target
        if not isinstance(target, targets.PublishTarget):
            raise exceptions.BadTarget(f"not an mqtt target: {target.kind}")
        return self.publish(target, self._payload(delivery, target))

    @staticmethod
    def _payload(delivery: sender.Delivery, target: targets.PublishTarget) -> bytes:
        document: JsonValue = target.payload
        if document is None:
            if delivery.event is None:
                raise exceptions.BadTarget(f"event {delivery.event_id} no longer exists")
            document = dict(delivery.event)
        try:
            if isinstance(document, str):
                # A text payload ("High temperature on SN-1") is published as the text itself,
                # not as a JSON string in quotes: what a person subscribing expects to read.
                return document.encode()
            return json.dumps(document, ensure_ascii=False, separators=(",", ":")).encode()
        except (UnicodeEncodeError, ValueError) as exc:  # a lone surrogate from a device
            raise exceptions.BadTarget(f"cannot encode the mqtt payload: {exc}") from None

    def publish(self, target: targets.PublishTarget, payload: bytes) -> str:
        if self._login_clash is not None:
            raise exceptions.DeliveryFailed(self._login_clash)
        topic = target.topic
        # Checked before paho sees it: paho raises ValueError on a wildcard, and the broker
        # drops the whole connection over a control character.
        problem = target.topic_error or actions_model.topic_problem(topic)
        if problem is not None:
            raise exceptions.BadTarget(problem)
        client = self._client or self._start()
        if not self._wait_connected():
            why = f" (broker refused: {self._refused})" if self._refused else ""
            raise exceptions.DeliveryFailed(
                f"not connected to the broker {self._host}:{self._port} "
                f"within {self._timeout:g} s{why}"
            )
        try:
            info = client.publish(topic, payload, qos=target.qos, retain=target.retain)
        except ValueError as exc:
            raise exceptions.BadTarget(f"cannot publish to {topic!r}: {exc}") from None
        try:
            if info.rc != mqtt.ERR_SUCCESS:
                raise exceptions.DeliveryFailed(
                    f"publish to {topic!r} failed: {mqtt.error_string(info.rc)}"
                )
            info.wait_for_publish(self._timeout)
            published = info.is_published()
        except (RuntimeError, ValueError) as exc:
            raise exceptions.DeliveryFailed(f"publish to {topic!r} failed: {exc}") from None
        finally:
            with self._acks_lock:
                reason = self._acks.pop(info.mid, None)
        if not published:
            what = "acknowledgement" if target.qos else "send"
            raise exceptions.DeliveryFailed(f"no {what} for {topic!r} within {self._timeout:g} s")
        if reason is not None and reason.is_failure:
            raise exceptions.DeliveryFailed(f"broker refused the publish to {topic!r}: {reason}")
        acked = "acknowledged" if target.qos else "sent, qos 0 is not acknowledged"
        retained = ", retained" if target.retain else ""
        return f"published to {topic!r} (qos {target.qos}{retained}, {acked})"

    def _wait_connected(self) -> bool:
        # In slices, so that a stop is not held up by a broker that is away.
        deadline = time.monotonic() + self._timeout
        while not self._connected.wait(CONNECT_WAIT_SLICE):
            if self._stopping.is_set() or time.monotonic() >= deadline:
                return False
        return True

    def close(self) -> None:
        if self._client is not None:
            self._client.disconnect()
            mqtt.stop_loop(self._client)
            self._client = None
            self._connected.clear()

    # paho runs these on its network thread: they record and never raise (`mqtt.guarded`).
    # paho passes every argument positionally; the ones not needed are named with a `_`.

    @mqtt.guarded("on_connect")
    def _on_connect(
        self,
        _client: mqtt.Client,
        _userdata: Any,
        _flags: mqtt.ConnectFlags,
        reason_code: mqtt.ReasonCode,
        _properties: mqtt.Properties | None,
    ) -> None:
        if reason_code.is_failure:
            self._refused = str(reason_code)
            log.error("actions_mqtt_connect_refused", reason=str(reason_code))
            return
        self._refused = None
        self._connected.set()
        log.info("actions_mqtt_connected", client_id=self._client_id)

    @mqtt.guarded("on_disconnect")
    def _on_disconnect(
        self,
        _client: mqtt.Client,
        _userdata: Any,
        _flags: mqtt.DisconnectFlags,
        reason_code: mqtt.ReasonCode,
        _properties: mqtt.Properties | None,
    ) -> None:
        was_connected = self._connected.is_set()
        self._connected.clear()
        if was_connected:
            log.warning("actions_mqtt_disconnected", reason=str(reason_code))

    @mqtt.guarded("on_publish")
    def _on_publish(
        self,
        _client: mqtt.Client,
        _userdata: Any,
        mid: int,
        reason_code: mqtt.ReasonCode,
        _properties: mqtt.Properties,
    ) -> None:
        with self._acks_lock:
            self._acks[mid] = reason_code
