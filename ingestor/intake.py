"""The MQTT side of ingestion: a persistent session, QoS 1, acknowledgements only on request.

paho runs our callbacks on its network thread. They only copy the message into a value of our
own and append it to a queue: a callback that blocked would stop keepalives, and one that raised
would end paho's thread while `is_connected()` still said True. So every callback is wrapped,
and the service watches the thread.

Acknowledgements: `ack()` is called by the writer after the transaction holding the messages
committed, in arrival order. A message id is only meaningful on the connection that delivered
it, so each message carries the connection generation and only the current generation is
acknowledged. After a reconnect with the session present the broker resends what was not
acknowledged; the unique key in the database drops the copies.

Holding (active/standby, `hold()`): while the election lock of our client id is unconfirmed
(its connection broke, the database is away), another instance may get the lock and take the
broker session over. Acknowledgements then wait, in arrival order, still counted as pending,
and no connection attempt is made (paho's automatic reconnect included: a reconnect would take
the session back from an instance that holds the lock). `resume()` sends what waited and lets
paho connect again; `fence()` drops it and leaves the broker for good.

Memory: at most `max_pending_messages` unacknowledged messages are held. Beyond that the
callback waits (TCP back-pressure to the broker). The broker's window (our Receive Maximum)
normally stops it first, but Mosquitto 2.0.x opens a whole new window on each acknowledgement,
so our own limit is what bounds memory.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Any

import structlog

from config.settings import Settings
from config.topics import TopicRouter
from ingestor import mqtt
from ingestor.messages import InboundMessage, MessageQueue
from ingestor.sources import SourceRouter

log = structlog.get_logger(__name__)

RECONNECT_MIN, RECONNECT_MAX = 1, 30  # seconds, paho doubles the delay between them
FULL_WAIT = 0.5  # seconds: how long the callback waits for room before re-checking stop
RECEIVE_MAXIMUM_CAP = 65_535  # the protocol's limit for Receive Maximum
REQUIRED_QOS = 1  # what every subscription must be granted: acknowledged, redelivered delivery


def held_bytes(messages: Iterable[InboundMessage]) -> int:
    """What messages count against `max_pending_bytes`: their payloads and topics."""
    return sum(len(m.payload) + len(m.topic) for m in messages)


class MqttIntake(MessageQueue):
    def __init__(self, settings: Settings, router: TopicRouter | SourceRouter) -> None:
        self._settings = settings
        self._router = router
        self._max_pending = settings.max_pending_messages
        self._max_pending_bytes = settings.max_pending_bytes
        self._queue: collections.deque[InboundMessage] = collections.deque()
        self._cond = threading.Condition()
        self._pending = 0  # received and not yet acknowledged (or given up on)
        self._pending_bytes = 0  # their payloads and topics
        # Queue length the writer is waiting for (0: not waiting). The callback wakes it only
        # then: a wake-up per message would cost a thread switch per message.
        self._wanted = 0
        self._closed = False  # intake stopped: new messages are left unacknowledged
        self._paused_since: float | None = None
        self._ack_lock = threading.Lock()
        self._generation = 0
        self._connected = False
        self._connected_at: datetime | None = None  # wall clock of the last connect
        self.ever_connected = threading.Event()
        self.session_lost = 0  # reconnects on which the broker had no session for us
        # Why the intake cannot do its job (set on the MQTT thread, read by the service, which
        # then stops): a subscription refused or granted less than QoS 1.
        self.fatal: str | None = None
        self._subscribed_filters: list[str] = []
        self.stale_acks = 0  # acknowledgements skipped because their connection was gone
        self._fenced = False  # another instance may own the session: never acknowledge again
        # The election lock is unconfirmed: acknowledgements wait in `_held`, no connects.
        self._holding = False
        self._held: list[InboundMessage] = []
        client = mqtt.make_client(settings.mqtt, settings.mqtt_client_id, manual_ack=True)
        client.reconnect_delay_set(RECONNECT_MIN, RECONNECT_MAX)
        mqtt.gate_connects(client, self._may_connect)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message  # what the sink does not take
        mqtt.set_publish_sink(client, self._on_publishes)
        client.on_subscribe = self._on_subscribe
        self._client = client

    # --- lifecycle

    def start(self) -> None:
        target = self._settings.mqtt
        props = mqtt.connect_properties(
            session_expiry=self._settings.mqtt_session_expiry,
            receive_maximum=min(self._max_pending, RECEIVE_MAXIMUM_CAP),
            # The broker drops, for us, what our payload limit would reject anyway.
            maximum_packet_size=mqtt.max_packet_size(self._settings.max_payload_bytes),
        )
        self._client.connect_async(
            target.host,
            target.port,
            keepalive=self._settings.mqtt_keepalive,
            clean_start=False,
            properties=props,
        )
        self._client.loop_start()
        log.info(
            "mqtt_starting",
            host=target.host,
            port=target.port,
            client_id=self._settings.mqtt_client_id,
        )

    def close_intake(self) -> None:
        """Stop taking messages: later ones stay unacknowledged and come back next start."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def hold(self) -> None:
        """Another instance may soon hold the session: acknowledgements wait (in arrival
        order, their room not freed) and no connection attempt is made until `resume()`."""
        with self._ack_lock:
            self._holding = True

    def resume(self) -> int:
        """The lock is ours again: send the acknowledgements that waited, in arrival order
        (those of an earlier connection are skipped as stale), let paho connect again.
        Returns how many waited."""
        with self._ack_lock:
            held, self._held = self._held, []
            self._holding = False
            # Under the same lock as `ack()`: a batch acknowledged now cannot overtake these.
            skipped = self._send_acks_locked(held)
        self._acked(held, skipped)
        with self._cond:
            self._cond.notify_all()  # a connection attempt waiting in `_may_connect`
        return len(held)

    @property
    def holding(self) -> bool:
        return self._holding

    def fence(self) -> None:
        """Another instance may hold the session now: acknowledge nothing more, take nothing
        more, and leave the broker; no connection attempt is made again."""
        with self._ack_lock:
            self._fenced = True
            held, self._held = self._held, []
        if held:
            self.stale_acks += len(held)
            log.info(
                "ack_skipped_stale",
                count=len(held),
                why="fenced: the instance that holds the lock gets them again",
            )
            self.release(len(held), held_bytes(held))
        self.close_intake()
        self._client.disconnect()
        with self._cond:
            self._cond.notify_all()

    @property
    def fenced(self) -> bool:
        return self._fenced

    def stop(self) -> None:
        """Disconnect cleanly (the session stays on the broker) and end the network thread."""
        self.close_intake()
        self._client.disconnect()
        mqtt.stop_loop(self._client)

    @property
    def thread_alive(self) -> bool:
        return mqtt.network_thread_alive(self._client)

    @property
    def connected(self) -> bool:
        return self._connected

    def connected_since(self) -> datetime | None:
        """When the current connection to the broker was made (None: not connected). What the
        broker queued for us before it arrives after it: the no-data timer counts no silence
        from before this moment."""
        with self._ack_lock:
            return self._connected_at if self._connected else None

    # --- what the writer uses

    def take(self, max_messages: int, max_wait: float) -> list[InboundMessage]:
        """Up to `max_messages`, waiting at most `max_wait` seconds for the first one."""
        return self.take_batch(max_messages, max_wait, 0.0)

    def _wait_for(self, count: int, timeout: float) -> None:
        """With the condition held: wait until `count` messages are queued, or timeout/close."""
        deadline = time.monotonic() + timeout
        try:
            while len(self._queue) < count and not self._closed:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return
                # No more than can arrive before the pending limit stops intake.
                reachable = len(self._queue) + self._max_pending - self._pending
                if self._queue and len(self._queue) >= reachable:
                    # Intake waits for room, and room comes only from acknowledgements of
                    # what the writer holds: take what is here rather than wait for nothing.
                    return
                self._wanted = max(1, min(count, reachable))
                self._cond.wait(remaining)
        finally:
            self._wanted = 0

    def ack(self, messages: Sequence[InboundMessage]) -> None:
        """Acknowledge stored messages (arrival order) and free their room; while holding,
        they wait for `resume()`."""
        with self._ack_lock:
            if self._holding and not self._fenced:
                self._held.extend(messages)
                return
            skipped = self._send_acks_locked(messages)
        self._acked(messages, skipped)

    def _send_acks_locked(self, messages: Sequence[InboundMessage]) -> int:
        """With `_ack_lock` held: acknowledge what the current connection delivered; returns
        how many were skipped as stale."""
        skipped = 0
        mids: list[int] = []
        for msg in messages:
            if msg.qos == 0:
                continue
            if self._fenced or msg.generation != self._generation or not self._connected:
                skipped += 1
                continue
            if msg.qos == 1:
                mids.append(msg.mid)
            else:  # QoS 2 (never granted: we subscribe at 1): paho's own PUBREC/PUBCOMP path
                self._client.ack(msg.mid, msg.qos)
        mqtt.ack_many(self._client, mids)
        return skipped

    def _acked(self, messages: Sequence[InboundMessage], skipped: int) -> None:
        """Count and log the skipped acknowledgements, free the messages' room."""
        if skipped:
            self.stale_acks += skipped
            log.info(
                "ack_skipped_stale",
                count=skipped,
                why="connection changed; the broker redelivers and duplicates are dropped",
            )
        self.release(len(messages), held_bytes(messages))

    def give_back(self, messages: Sequence[InboundMessage]) -> None:
        """Free the room of messages given up on, unacknowledged: the broker sends them again."""
        self.release(len(messages), held_bytes(messages))

    def release(self, count: int, nbytes: int = 0) -> None:
        """Free room for messages given up on without an acknowledgement (`nbytes`: their
        `held_bytes`)."""
        with self._cond:
            self._pending -= count
            self._pending_bytes -= nbytes
            self._cond.notify_all()

    @property
    def pending(self) -> int:
        return self._pending

    @property
    def pending_bytes(self) -> int:
        return self._pending_bytes

    def _forget_redelivered(self) -> None:
        """Drop queued messages of earlier connections: with the session present the broker
        sends them again, so keeping them would only block room for their own copies (and, at
        the pending limit, this thread, and with it the keepalives)."""
        with self._cond:
            # QoS 0 messages are never sent again: those stay.
            kept = collections.deque(
                m for m in self._queue if m.generation == self._generation or m.qos == 0
            )
            dropped = len(self._queue) - len(kept)
            if dropped:
                self._pending_bytes -= held_bytes(self._queue) - held_bytes(kept)
                self._queue = kept
                self._pending -= dropped
                self._cond.notify_all()
        if dropped:
            log.info(
                "queued_redeliveries_dropped",
                count=dropped,
                why="the broker resends them on the resumed session",
            )

    def _may_connect(self) -> bool:
        """Asked by paho before each connection attempt: wait while holding (the lock of our
        client id is unconfirmed), refuse once fenced or when the wait ends with the stop."""
        with self._cond:
            if self._holding and not self._fenced and not self._closed:
                log.warning(
                    "mqtt_reconnect_held",
                    why="the election lock is unconfirmed: another instance may own the session",
                )
            while self._holding and not self._fenced and not self._closed:
                self._cond.wait(FULL_WAIT)
            return not (self._fenced or self._holding)

    # --- paho callbacks: they hand work over and never raise (`mqtt.guarded`). paho passes
    # every argument positionally; those a callback does not need are named with a `_`.

    @mqtt.guarded("on_connect")
    def _on_connect(
        self,
        client: mqtt.Client,
        _userdata: Any,
        flags: mqtt.ConnectFlags,
        reason_code: mqtt.ReasonCode,
        _properties: mqtt.Properties | None,
    ) -> None:
        if reason_code.is_failure:
            log.error("mqtt_connect_refused", reason=str(reason_code))
            return
        with self._ack_lock:
            self._generation += 1
            self._connected = True
            self._connected_at = datetime.now(UTC)
        if flags.session_present:
            self._forget_redelivered()
        if not flags.session_present and self._generation > 1:
            # Messages queued for us while we were away are gone with that session.
            self.session_lost += 1
            log.warning("mqtt_session_lost", why="the broker had no session for this client id")
        log.info(
            "mqtt_connected", session_present=flags.session_present, generation=self._generation
        )
        group = self._settings.mqtt_shared_group
        # Retain handling 2: the broker does not send its retained messages when we
        # subscribe, which we do on every connect; a retained reading is an old one, and it
        # would be stored again after every restart (again and again without a ts).
        options = mqtt.SubscribeOptions(
            qos=REQUIRED_QOS, retainHandling=mqtt.SubscribeOptions.RETAIN_DO_NOT_SEND
        )
        topics = [(topic, options) for topic in self._router.subscriptions(group)]
        self._subscribed_filters = [topic for topic, _ in topics]
        client.subscribe(topics)

    @mqtt.guarded("on_subscribe")
    def _on_subscribe(
        self,
        _client: mqtt.Client,
        _userdata: Any,
        _mid: int,
        reason_codes: list[mqtt.ReasonCode],
        _properties: mqtt.Properties | None,
    ) -> None:
        filters = self._subscribed_filters
        granted = {
            filters[i] if i < len(filters) else f"#{i}": rc for i, rc in enumerate(reason_codes)
        }
        refused = {topic: str(rc) for topic, rc in granted.items() if rc.is_failure}
        # In a SUBACK a success code is the QoS granted. A broker may grant less than asked:
        # at QoS 0 it sends each message once, without waiting for our PUBACK, so a crash
        # or an outage loses it. That breaks the delivery promise: refuse to run.
        downgraded = {
            topic: rc.value
            for topic, rc in granted.items()
            if not rc.is_failure and rc.value < REQUIRED_QOS
        }
        if refused or downgraded:
            self.fatal = (
                f"the broker refused subscriptions {refused}"
                if refused
                else f"the broker granted QoS {downgraded}, not {REQUIRED_QOS}"
            )
            log.error(
                "mqtt_subscribe_refused",
                refused=refused,
                downgraded=downgraded,
                required_qos=REQUIRED_QOS,
                why="at-least-once delivery needs every subscription at QoS 1",
            )
        else:
            log.info("mqtt_subscribed", granted=[rc.value for rc in reason_codes])
            # Ready only now: before the SUBACK, a first-time session may miss messages.
            self.ever_connected.set()

    @mqtt.guarded("on_disconnect")
    def _on_disconnect(
        self,
        _client: mqtt.Client,
        _userdata: Any,
        _flags: mqtt.DisconnectFlags,
        reason_code: mqtt.ReasonCode,
        _properties: mqtt.Properties | None,
    ) -> None:
        with self._ack_lock:
            self._generation += 1
            self._connected = False
        # Our own clean disconnect (at stop) is news, not trouble.
        level = log.info if reason_code.value == 0 and self._closed else log.warning
        level("mqtt_disconnected", reason=str(reason_code), pending=self._pending)

    @mqtt.guarded("on_message")
    def _on_message(self, _client: mqtt.Client, _userdata: Any, message: mqtt.MQTTMessage) -> None:
        self._admit(
            [
                (
                    mqtt.message_topic(message),
                    bytes(message.payload),
                    message.mid,
                    message.qos,
                    bool(message.dup),
                    bool(message.retain),
                )
            ]
        )

    @mqtt.guarded("on_publishes")
    def _on_publishes(self, publishes: list[mqtt.Publish]) -> None:
        self._admit(publishes)

    def _admit(self, publishes: list[mqtt.Publish]) -> None:
        """Queue what paho received, in order, each message once there is room for it."""
        generation = self._generation
        with self._cond:
            for topic, body, mid, qos, dup, retain in publishes:
                size = len(body) + len(topic)  # held_bytes of one, without a generator
                # Bounded in bytes as well as messages; one message is always let in, so a
                # message larger than the byte limit cannot stop intake for good.
                while (
                    self._pending >= self._max_pending
                    or (self._pending and self._pending_bytes + size > self._max_pending_bytes)
                ) and not self._closed:
                    # What this run queued so far may be what a consumer waits for.
                    if self._wanted and len(self._queue) >= self._wanted:
                        self._cond.notify_all()
                    if self._paused_since is None:
                        self._paused_since = time.monotonic()
                        log.warning(
                            "intake_paused",
                            pending=self._pending,
                            limit=self._max_pending,
                            pending_bytes=self._pending_bytes,
                            limit_bytes=self._max_pending_bytes,
                        )
                    self._cond.wait(FULL_WAIT)
                if self._paused_since is not None:
                    log.info(
                        "intake_resumed", paused_s=round(time.monotonic() - self._paused_since, 3)
                    )
                    self._paused_since = None
                if self._closed:
                    return  # not acknowledged: the broker keeps it for the next start
                self._pending += 1
                self._pending_bytes += size
                # By position: the fields' order (cheaper than keywords). Each message its own
                # receipt time: it is the ts of its readings that carry none.
                self._queue.append(
                    InboundMessage(
                        topic,
                        body,
                        mid,
                        qos,
                        dup,
                        generation,
                        time.time(),
                        time.monotonic(),
                        retain,
                    )
                )
            if self._wanted and len(self._queue) >= self._wanted:
                self._cond.notify_all()
