"""Where rule actions are delivered: the outbox worker, after the ingestion transaction committed.

The rule engine only INSERTs rows into `action_outbox` inside the ingestion transaction; this
worker, on a thread and pool connections of its own, delivers them, so a slow webhook delays other
actions but never ingestion. A pass claims due rows in a short transaction (`FOR UPDATE SKIP
LOCKED`, several service instances share the outbox) that gives them a lease and a claim token and
commits; it then delivers them one by one with no transaction open, and records each outcome in a
short transaction of its own that only counts while the claim token is still the row's. A worker
that crashes or hangs leaves its rows leased; once the lease runs out they are due again, so
delivery is at least once (webhook receivers get the outbox id in a header to drop a repeat).

Outcomes: delivered; or a retry after a jittered exponential delay; or, after
`outbox_max_attempts` attempts (or at once when the row itself is malformed or its destination
refused), `failed`, kept in the table with its last error and never dropped. Every attempt leaves
a row in `action_attempts`.

Every delivery has a wall-clock deadline, and the worker keeps a heartbeat of the step it is in:
`health()` (the service's /healthz) reports it stuck when a step overruns its deadline by more
than `outbox_stuck_after`.

Deliveries: `webhook` POSTs the JSON body (2xx is success) to public addresses only, unless
allow-listed (see `egress`); `mqtt` publishes on a dedicated clean-session client and waits for
the broker's acknowledgement; `notify` logs the notification and, for the email channel with
`smtp_url` set, sends it to the target's `to` address(es).
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import random
import smtplib
import socket
import ssl
import threading
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from email.message import EmailMessage
from typing import Any, Final, Literal, TypeVar
from urllib.parse import unquote, urlsplit

import httpcore
import httpx
import paho.mqtt.client as mqtt
import psycopg
import structlog
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from psycopg_pool import ConnectionPool
from pydantic import BaseModel, ConfigDict, JsonValue, ValidationError

from config.settings import Settings
from ingestor import mqtt as mqttclient
from ingestor.backoff import Backoff
from rules_engine.actions import egress
from rules_engine.metrics import RuleMetrics
from rules_engine.model import actions as actions_model
from schema import sql as queries_mod

log = structlog.get_logger(__name__)
queries = queries_mod.load("rules_engine.actions", "outbox.sql")

CLAIM_BATCH: Final = 50  # rows claimed (and leased) per pass
BATCH_BUDGET: Final = 15.0  # seconds: past this no row is started; the rest is released
LEASE_MARGIN: Final = 30.0  # seconds a lease outlasts the longest a pass should take
RETRY_BASE: Final = 1.0  # seconds before the first retry; doubles with each failed attempt
RETRY_MAX: Final = 300.0  # seconds: the longest wait between two attempts (5 minutes)
RETRY_JITTER: Final = 0.2  # ±20 %: rows that failed together do not all retry together
MAX_DOUBLINGS: Final = 30  # 2**30 s is far past RETRY_MAX; a bound keeps the float finite
LOOP_RETRY_MIN: Final = 0.5  # seconds: first wait after the loop itself failed
LOOP_RETRY_MAX: Final = 30.0  # seconds
PUBLISH_TIMEOUT: Final = 10.0  # seconds to be connected to the broker, and again for its PUBACK
MQTT_RECONNECT_MIN, MQTT_RECONNECT_MAX = 1, 30  # seconds; paho doubles the delay between them
CONNECT_WAIT_SLICE: Final = 0.1  # seconds between checks for a stop while awaiting the broker
SMTP_TIMEOUT: Final = 10.0  # seconds per SMTP conversation step
SMTP_DEADLINE: Final = 30.0  # seconds for one whole SMTP conversation, on the wall clock
SMTP_PORT, SMTPS_PORT = 25, 465
MAX_DETAIL_CHARS: Final = 1000  # of an attempt's detail and of last_error
MAX_REASON_CHARS: Final = 60  # of a webhook's HTTP reason phrase, quoted in the detail
# Bytes of a response body read (and thrown away) so that its connection can be kept alive; a
# longer body is cut off by closing the connection. Bodies are never stored: the status says
# whether a delivery worked, and a body is the receiver's text, not ours to keep.
DRAIN_LIMIT: Final = 64 * 1024
WEBHOOK_CONNECTIONS: Final = 8  # kept-alive connections to webhook receivers at most
WEBHOOK_KEEPALIVE: Final = 30.0  # seconds an idle webhook connection is kept
USER_AGENT: Final = "iothub-outbox"
DELIVERY_HEADER: Final = "X-Iothub-Delivery"  # the outbox id: receivers can drop a repeat

KINDS: Final = ("notify", "webhook", "mqtt")
OUTCOMES: Final = ("delivered", "retry", "failed")


class DeliveryFailed(Exception):
    """The action could not be delivered."""


class BadTarget(DeliveryFailed):
    """The outbox row's target is malformed; retrying cannot help."""

    why = "malformed target"


class RefusedTarget(BadTarget):
    """The action's destination is not allowed (egress policy, reserved header); retrying
    cannot help."""

    why = "target refused"


# ---------------------------------------------------------------------------------------------
# What the rule engine writes into `action_outbox.target`, one model per kind. Unknown keys are
# ignored so that a newer engine can add some without stopping an older worker.


class NotifyTarget(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    channel: str
    message: str
    subject: str = "iothub notification"
    # Not written by the engine today: the original action form names no address.
    to: str | list[str] | None = None

    @property
    def recipients(self) -> tuple[str, ...]:
        given = [self.to] if isinstance(self.to, str) else (self.to or [])
        return tuple(address.strip() for address in given if address.strip())


class WebhookTarget(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    url: str
    headers: dict[str, str] | None = None
    body: JsonValue = None


class PublishTarget(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    topic: str
    payload: JsonValue = None  # None: publish the standard event document
    qos: Literal[0, 1, 2] = 1
    retain: bool = False
    # Written by the engine when the rendered topic cannot be published to (a device's value
    # held a level separator or a wildcard): the row fails at once, naming why.
    topic_error: str | None = None


_Target = TypeVar("_Target", NotifyTarget, WebhookTarget, PublishTarget)


def _parse_target(model: type[_Target], row: OutboxRow) -> _Target:
    try:
        return model.model_validate(row.target)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in error['loc']) or 'target'}: {error['msg']}"
            for error in exc.errors()
        )
        raise BadTarget(f"malformed {row.kind} target: {problems}") from None


@dataclass(frozen=True)
class OutboxRow:
    id: int
    event_id: int
    rule_id: int
    kind: str
    target: Any
    attempts: int  # before this attempt
    lost: bool = False  # a previous claim ran out without an outcome (counted in attempts)


@dataclass(frozen=True)
class Outcome:
    ok: bool
    detail: str
    permanent: str | None = None  # why no retry can fix this failure


def retry_delay(attempts: int, base: float = RETRY_BASE, maximum: float = RETRY_MAX) -> float:
    """Seconds before the next attempt, after `attempts` failed ones (jittered, capped)."""
    delay = min(base * 2.0 ** min(max(attempts - 1, 0), MAX_DOUBLINGS), maximum)
    return delay * random.uniform(1 - RETRY_JITTER, 1 + RETRY_JITTER)


def _origin(url: str) -> str:
    # Webhook URLs often carry a secret in their path (chat services do): logs and attempt
    # details name only where the request went.
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}"


def _clip(text: str, limit: int = MAX_DETAIL_CHARS) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ---------------------------------------------------------------------------------------------
# Senders. Each returns a one-line success detail or raises DeliveryFailed with a precise one.


class WebhookSender:
    """POSTs webhooks through one pool of kept-alive connections, each delivery within one
    wall-clock deadline and to checked addresses only (`egress`). httpcore rather than httpx:
    it takes the network backend that does the checking, and follows no redirect by design (a
    3xx is a failed attempt; following it would need every hop checked, and is not done)."""

    def __init__(self, timeout: float, policy: egress.AddressPolicy | None = None) -> None:
        self._timeout = timeout
        self._backend = egress.GuardedBackend(policy or egress.AddressPolicy())
        self._pool = httpcore.ConnectionPool(
            network_backend=self._backend,
            max_connections=WEBHOOK_CONNECTIONS,
            max_keepalive_connections=WEBHOOK_CONNECTIONS,
            keepalive_expiry=WEBHOOK_KEEPALIVE,
        )

    def send(self, outbox_id: int, target: WebhookTarget) -> str:
        where = _origin(target.url)
        url, headers, body = self._request(outbox_id, target)
        limit = {"connect": self._timeout, "read": self._timeout, "write": self._timeout}
        cut = ""
        try:
            with (
                self._backend.deadline(self._timeout),
                self._pool.stream(
                    "POST",
                    url,
                    headers=headers,
                    content=body,
                    extensions={"timeout": {**limit, "pool": self._timeout}},
                ) as response,
            ):
                status = response.status
                reason = _reason(response.extensions.get("reason_phrase", b""))
                if not self._drain(response):
                    cut = "; rest of the body discarded"
        except egress.DestinationRefused as exc:
            raise RefusedTarget(f"refused {where}: {exc}") from None
        except httpcore.TimeoutException:
            raise DeliveryFailed(
                f"no complete answer from {where} within {self._timeout:g} s"
            ) from None
        except httpcore.ConnectError as exc:
            raise DeliveryFailed(f"cannot connect to {where}: {exc}") from None
        except (httpcore.UnsupportedProtocol, httpcore.LocalProtocolError) as exc:
            raise BadTarget(f"cannot POST to {where}: {exc}") from None
        except (httpcore.NetworkError, httpcore.ProtocolError) as exc:
            raise DeliveryFailed(f"POST to {where} failed: {type(exc).__name__}: {exc}") from None
        if 200 <= status < 300:
            return f"HTTP {status} from {where}{cut}"
        moved = " (redirects are not followed)" if 300 <= status < 400 else ""
        raise DeliveryFailed(f"HTTP {status} {reason}".rstrip() + f" from {where}{moved}")

    @staticmethod
    def _request(
        outbox_id: int, target: WebhookTarget
    ) -> tuple[httpcore.URL, list[tuple[bytes, bytes]], bytes]:
        try:
            url = httpx.URL(target.url)
        except httpx.InvalidURL as exc:
            raise BadTarget(f"invalid webhook url: {exc}") from None
        if url.scheme not in ("http", "https") or not url.host:
            raise BadTarget("invalid webhook url: needs an absolute http(s) URL")
        given = target.headers or {}
        problem = actions_model.header_problem(given)
        if problem is not None:  # a row written before the rule check knew, or by hand
            raise RefusedTarget(problem)
        named: dict[str, tuple[str, str]] = {
            "user-agent": ("User-Agent", USER_AGENT),
            "content-type": ("Content-Type", "application/json"),
        }
        if url.username or url.password:
            token = base64.b64encode(f"{url.username}:{url.password}".encode()).decode()
            named["authorization"] = ("Authorization", f"Basic {token}")
        named.update({name.lower(): (name, value) for name, value in given.items()})
        named["x-iothub-delivery"] = (DELIVERY_HEADER, str(outbox_id))
        headers = [(name.encode(), value.encode()) for name, value in named.values()]
        try:
            body = json.dumps(target.body, ensure_ascii=False, separators=(",", ":")).encode()
        except (UnicodeEncodeError, ValueError) as exc:
            raise BadTarget(f"cannot encode the webhook body: {exc}") from None
        plain = httpcore.URL(
            scheme=url.raw_scheme, host=url.raw_host, port=url.port, target=url.raw_path
        )
        return plain, headers, body

    @staticmethod
    def _drain(response: httpcore.Response) -> bool:
        """Read and forget the body up to DRAIN_LIMIT; True when it was read to its end (the
        connection can be used again), False when it was cut off (the connection is closed)."""
        seen = 0
        try:
            for chunk in response.iter_stream():
                seen += len(chunk)
                if seen > DRAIN_LIMIT:
                    return False
        except (httpcore.TimeoutException, httpcore.NetworkError, httpcore.ProtocolError):
            return False  # the status was read: the body cannot change the outcome
        return True

    def close(self) -> None:
        self._pool.close()
        self._backend.close()


def _reason(raw: object) -> str:
    # The reason phrase is the receiver's text: printable ASCII only, and short.
    text = raw.decode("ascii", "replace") if isinstance(raw, bytes) else ""
    text = " ".join("".join(c if c.isprintable() else " " for c in text).split())
    return _clip(text, MAX_REASON_CHARS)


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
        self._host, self._port = mqttclient.host_port(self._url)
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
        self._acks: dict[int, ReasonCode] = {}

    @property
    def client_id(self) -> str:
        return self._client_id

    def _start(self) -> mqtt.Client:
        client = mqttclient.make_client(self._url, self._client_id)
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

    def publish(self, target: PublishTarget, payload: bytes) -> str:
        if self._login_clash is not None:
            raise DeliveryFailed(self._login_clash)
        topic = target.topic
        # Checked before paho sees it: paho raises ValueError on a wildcard, and the broker
        # drops the whole connection over a control character.
        problem = target.topic_error or actions_model.topic_problem(topic)
        if problem is not None:
            raise BadTarget(problem)
        client = self._client or self._start()
        if not self._wait_connected():
            why = f" (broker refused: {self._refused})" if self._refused else ""
            raise DeliveryFailed(
                f"not connected to the broker {self._host}:{self._port} "
                f"within {self._timeout:g} s{why}"
            )
        try:
            info = client.publish(topic, payload, qos=target.qos, retain=target.retain)
        except ValueError as exc:
            raise BadTarget(f"cannot publish to {topic!r}: {exc}") from None
        try:
            if info.rc != mqtt.MQTT_ERR_SUCCESS:
                raise DeliveryFailed(f"publish to {topic!r} failed: {mqtt.error_string(info.rc)}")
            info.wait_for_publish(self._timeout)
            published = info.is_published()
        except (RuntimeError, ValueError) as exc:
            raise DeliveryFailed(f"publish to {topic!r} failed: {exc}") from None
        finally:
            with self._acks_lock:
                reason = self._acks.pop(info.mid, None)
        if not published:
            what = "acknowledgement" if target.qos else "send"
            raise DeliveryFailed(f"no {what} for {topic!r} within {self._timeout:g} s")
        if reason is not None and reason.is_failure:
            raise DeliveryFailed(f"broker refused the publish to {topic!r}: {reason}")
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
            mqttclient.stop_loop(self._client)
            self._client = None
            self._connected.clear()

    # paho runs these on its network thread: they record and never raise.

    def _on_connect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: mqtt.ConnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        try:
            if reason_code.is_failure:
                self._refused = str(reason_code)
                log.error("actions_mqtt_connect_refused", reason=str(reason_code))
                return
            self._refused = None
            self._connected.set()
            log.info("actions_mqtt_connected", client_id=self._client_id)
        except Exception:
            log.exception("mqtt_callback_failed", callback="on_connect")

    def _on_disconnect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: mqtt.DisconnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        try:
            was_connected = self._connected.is_set()
            self._connected.clear()
            if was_connected:
                log.warning("actions_mqtt_disconnected", reason=str(reason_code))
        except Exception:
            log.exception("mqtt_callback_failed", callback="on_disconnect")

    def _on_publish(
        self,
        client: mqtt.Client,
        userdata: Any,
        mid: int,
        reason_code: ReasonCode,
        properties: Properties,
    ) -> None:
        try:
            with self._acks_lock:
                self._acks[mid] = reason_code
        except Exception:
            log.exception("mqtt_callback_failed", callback="on_publish")


class Mailer:
    """Sends notifications through the SMTP server of `smtp_url` (smtp:// or smtps://).

    On smtp:// the conversation is upgraded with STARTTLS when the server offers it; with
    credentials in the URL it must be, since AUTH on a plain connection hands the password to
    anyone on the path (and a man in the middle need only strip STARTTLS from the EHLO answer).
    """

    def __init__(
        self,
        smtp_url: str,
        sender: str,
        timeout: float = SMTP_TIMEOUT,
        deadline: float = SMTP_DEADLINE,
    ) -> None:
        parts = urlsplit(smtp_url)
        if parts.scheme not in ("smtp", "smtps") or not parts.hostname:
            raise ValueError(
                f"smtp_url must be smtp://host:port or smtps://..., got {parts.scheme}"
            )
        self._tls = parts.scheme == "smtps"
        self._host = parts.hostname
        self._port = parts.port or (SMTPS_PORT if self._tls else SMTP_PORT)
        self._user = unquote(parts.username) if parts.username else None
        self._password = unquote(parts.password) if parts.password else ""
        self._sender = sender
        self._timeout = timeout
        self._deadline = deadline

    def send(self, recipients: Sequence[str], subject: str, body: str) -> str:
        message = EmailMessage()
        try:
            message["From"] = self._sender
            message["To"] = ", ".join(recipients)
            message["Subject"] = subject
        except ValueError as exc:  # a line break in a header: an injection attempt or a typo
            raise BadTarget(f"cannot build the email: {exc}") from None
        message.set_content(body)
        context = ssl.create_default_context()
        where = f"smtp {self._host}:{self._port}"
        server = (
            smtplib.SMTP_SSL(timeout=self._timeout, context=context)
            if self._tls
            else smtplib.SMTP(timeout=self._timeout)
        )
        # smtplib's timeout is per socket operation: a server that answers a byte at a time
        # would hold the conversation for ever. At the deadline the socket is shut down, which
        # ends whatever read or write is blocked on it.
        cut = threading.Event()
        timer = threading.Timer(self._deadline, self._cut, (server, cut))
        timer.daemon = True
        timer.start()
        try:
            with server:
                server.connect(self._host, self._port)
                server.ehlo()
                if not self._tls and server.has_extn("starttls"):
                    server.starttls(context=context)
                    server.ehlo()
                elif not self._tls and self._user:
                    log.error("smtp_starttls_missing", host=self._host, port=self._port)
                    raise DeliveryFailed(
                        f"{where} does not offer STARTTLS: refusing to send the password "
                        "in clear (use smtps:// or a server that offers STARTTLS)"
                    )
                if self._user:
                    server.login(self._user, self._password)
                refused = server.send_message(message)
        except (smtplib.SMTPException, OSError) as exc:
            if cut.is_set():
                raise DeliveryFailed(
                    f"{where}: no complete conversation within {self._deadline:g} s"
                ) from None
            raise DeliveryFailed(f"{where}: {type(exc).__name__}: {exc}") from None
        finally:
            timer.cancel()
        accepted = [address for address in recipients if address not in refused]
        detail = f"emailed to {', '.join(accepted)}"
        # Some recipients accepted: a retry would mail those again, so this counts as done.
        return detail + (f"; refused: {', '.join(refused)}" if refused else "")

    @staticmethod
    def _cut(server: smtplib.SMTP, cut: threading.Event) -> None:
        cut.set()
        sock = getattr(server, "sock", None)
        if sock is not None:
            # Already closed: the conversation ended on its own.
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


# ---------------------------------------------------------------------------------------------
# The worker


@dataclass(frozen=True)
class Step:
    """What the worker is doing now, since when, and how long it may take (its heartbeat)."""

    name: Literal["claim", "deliver", "record"]
    started: float  # time.monotonic()
    allowed: float  # seconds; database steps have none of their own
    outbox_id: int | None = None
    kind: str | None = None


class OutboxWorker:
    """Delivers the outbox on a thread of its own; `service.Worker` of `iothub run`.

    The pool is the caller's: it must be open while the worker runs, and is never closed here.
    """

    name = "iothub-outbox"

    def __init__(
        self,
        settings: Settings,
        pool: ConnectionPool,
        metrics: RuleMetrics,
        *,
        retry_base: float = RETRY_BASE,
        retry_max: float = RETRY_MAX,
        batch_size: int = CLAIM_BATCH,
        publish_timeout: float = PUBLISH_TIMEOUT,
        smtp_deadline: float = SMTP_DEADLINE,
    ) -> None:
        self._settings = settings
        self._pool = pool
        self._metrics = metrics
        self._retry_base = retry_base
        self._retry_max = retry_max
        self._batch_size = batch_size
        self._max_attempts = settings.outbox_max_attempts
        self._stopping = threading.Event()
        policy = egress.AddressPolicy(egress.parse_networks(settings.action_allow_networks))
        self._webhooks = WebhookSender(settings.webhook_timeout, policy)
        self._mqtt = MqttPublisher(settings, publish_timeout, self._stopping)
        self._mailer = (
            Mailer(settings.smtp_url, settings.smtp_from, deadline=smtp_deadline)
            if settings.smtp_url
            else None
        )
        # The longest each kind of delivery may take: its own timeouts bound it.
        self._deadlines: Mapping[str, float] = {
            "webhook": settings.webhook_timeout,
            "mqtt": 2 * publish_timeout,  # to be connected, then for the acknowledgement
            "notify": smtp_deadline,
        }
        # A claim's lease outlasts the longest a pass can take: rows are started only within
        # BATCH_BUDGET, and the last one started ends by its deadline.
        self._lease = BATCH_BUDGET + max(self._deadlines.values()) + LEASE_MARGIN
        self._claimer = f"{socket.gethostname()}:{os.getpid()}"
        self._warned_no_recipient = False
        self._thread: threading.Thread | None = None
        self._step: Step | None = None
        self._health_lock = threading.Lock()
        self._reported_stuck: Step | None = None
        metrics.outbox_worker_stuck.set(0)
        for kind in KINDS:
            for outcome in OUTCOMES:
                metrics.actions_delivered.labels(kind=kind, outcome=outcome)

    # --- lifecycle

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("the outbox worker was already started")
        self._thread = threading.Thread(target=self._main, name=self.name, daemon=True)
        self._thread.start()

    def stop(self, timeout: float) -> None:
        """Finish the row in hand (rows not attempted are released), then close the clients."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                # Stuck past every deadline: its rows keep their lease, which runs out, and
                # they are delivered again later. The clients stay open for it.
                log.error("outbox_stop_timeout", timeout_s=timeout)
                return
        self._webhooks.close()
        self._mqtt.close()

    @property
    def alive(self) -> bool:
        """False only when the thread should be running and is not (it died)."""
        thread = self._thread
        return thread is None or self._stopping.is_set() or thread.is_alive()

    def health(self) -> dict[str, bool]:
        """`{"outbox": False}` while the current step has overrun its deadline by more than
        `outbox_stuck_after` (a hung receiver the deadlines did not catch, a lock on the
        outbox). Called from other threads (the service's main loop, /healthz); it logs
        `outbox_worker_stuck` once per stuck step and keeps the gauge."""
        step = self._step
        now = time.monotonic()
        stuck = (
            step is not None
            and now - step.started > step.allowed + self._settings.outbox_stuck_after
        )
        with self._health_lock:
            if stuck and step is not None and self._reported_stuck is not step:
                self._reported_stuck = step
                self._metrics.outbox_worker_stuck.set(1)
                log.error(
                    "outbox_worker_stuck",
                    step=step.name,
                    outbox_id=step.outbox_id,
                    kind=step.kind,
                    running_s=round(now - step.started, 1),
                    deadline_s=step.allowed,
                )
            elif not stuck and self._reported_stuck is not None:
                self._reported_stuck = None
                self._metrics.outbox_worker_stuck.set(0)
                log.info("outbox_worker_unstuck")
        return {"outbox": not stuck}

    @contextmanager
    def _doing(
        self, name: Literal["claim", "deliver", "record"], row: OutboxRow | None = None
    ) -> Iterator[None]:
        allowed = self._deadlines.get(row.kind, 0.0) if row and name == "deliver" else 0.0
        self._step = Step(
            name,
            time.monotonic(),
            allowed,
            outbox_id=row.id if row else None,
            kind=row.kind if row else None,
        )
        try:
            yield
        finally:
            self._step = None

    def _main(self) -> None:
        log.info(
            "outbox_started",
            poll_interval_s=self._settings.outbox_poll_interval,
            max_attempts=self._max_attempts,
            smtp=self._mailer is not None,
            lease_s=self._lease,
            allow_networks=list(self._settings.action_allow_networks),
        )
        backoff = Backoff(initial=LOOP_RETRY_MIN, maximum=LOOP_RETRY_MAX)
        while not self._stopping.is_set():
            try:
                busy = self.run_once()
            except psycopg.OperationalError as exc:
                delay = backoff.next()
                first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                log.warning("outbox_db_unavailable", error=first_line, retry_in=round(delay, 2))
                self._stopping.wait(delay)
                continue
            except Exception:
                delay = backoff.next()
                log.exception("outbox_loop_failed", retry_in=round(delay, 2))
                self._stopping.wait(delay)
                continue
            if backoff.failing:
                log.info("outbox_recovered")
                backoff.reset()
            if not busy:
                self._stopping.wait(self._settings.outbox_poll_interval)
        log.info("outbox_stopped")

    # --- one pass

    def run_once(self) -> bool:
        """Claim due rows, deliver, record; True when more rows may be due right away.

        No transaction is open while a row is delivered: the claim and each outcome commit in
        transactions of their own, a few milliseconds each."""
        started = time.monotonic()
        token = f"{self._claimer}:{uuid.uuid4().hex[:12]}"
        attempted = 0
        with self._pool.connection() as conn:
            with self._doing("claim"), conn.transaction():
                found = conn.execute(
                    queries["claim_due"],
                    {"limit": self._batch_size, "lease": self._lease, "token": token},
                ).fetchall()
                rows = sorted((OutboxRow(*values) for values in found), key=lambda r: r.id)
                documents = self._event_documents(conn, rows)
            for row in rows:
                if row.lost:
                    log.warning(
                        "action_lease_expired",
                        why="claimed before and no outcome recorded: counted as a failed attempt",
                        outbox_id=row.id,
                        kind=row.kind,
                        attempts=row.attempts,
                    )
            try:
                for row in rows:
                    if self._stopping.is_set() or time.monotonic() - started > BATCH_BUDGET:
                        break
                    if row.lost and row.attempts >= self._max_attempts:
                        with self._doing("record", row), conn.transaction():
                            self._give_up(conn, token, row)
                        attempted += 1
                        continue
                    attempted_at = datetime.now(UTC)
                    with self._doing("deliver", row):
                        outcome = self._attempt(row, documents)
                    finished_at = datetime.now(UTC)
                    with self._doing("record", row), conn.transaction():
                        self._record(
                            conn,
                            token,
                            row,
                            outcome,
                            attempted_at=attempted_at,
                            finished_at=finished_at,
                        )
                    attempted += 1
            finally:
                if attempted < len(rows) and not conn.broken:
                    with self._doing("record"), conn.transaction():
                        conn.execute(queries["release_claim"], {"token": token})
            with self._doing("record"), conn.transaction():
                pending = conn.execute(queries["count_pending"]).fetchone()
        self._metrics.outbox_backlog.set(pending[0] if pending else 0)
        return len(rows) == self._batch_size or attempted < len(rows)

    def _attempt(self, row: OutboxRow, documents: Mapping[int, dict[str, JsonValue]]) -> Outcome:
        try:
            return Outcome(ok=True, detail=self._deliver(row, documents))
        except BadTarget as exc:
            return Outcome(ok=False, detail=str(exc), permanent=exc.why)
        except DeliveryFailed as exc:
            return Outcome(ok=False, detail=str(exc))
        except Exception as exc:
            # A bug in one delivery must not stop the others: record it like any failure.
            log.exception("action_delivery_crashed", outbox_id=row.id, kind=row.kind)
            return Outcome(ok=False, detail=f"internal error: {type(exc).__name__}: {exc}")

    def _record(
        self,
        conn: psycopg.Connection,
        token: str,
        row: OutboxRow,
        outcome: Outcome,
        *,
        attempted_at: datetime,
        finished_at: datetime,
    ) -> None:
        """One outcome, with its attempt row, if the claim is still ours."""
        detail = _clip(outcome.detail)
        attempts = row.attempts + 1
        facts = {
            "outbox_id": row.id,
            "kind": row.kind,
            "rule_id": row.rule_id,
            "event_id": row.event_id,
            "attempts": attempts,
        }
        params: dict[str, Any] = {
            "outbox_id": row.id,
            "token": token,
            "attempted_at": attempted_at,
            "finished_at": finished_at,
            "detail": detail,
        }
        if outcome.ok:
            query, result = "record_delivered", "delivered"
        elif outcome.permanent or attempts >= self._max_attempts:
            query, result = "record_failed", "failed"
        else:
            query, result = "record_retry", "retry"
            params["delay"] = retry_delay(attempts, self._retry_base, self._retry_max)
        if conn.execute(queries[query], params).fetchone() is None:
            # The lease ran out and another claim took the row: its outcome is the one that
            # counts (this attempt is not recorded; the receiver may see the action twice).
            log.warning("action_outcome_dropped", why="lease lost", outcome=result, **facts)
            return
        self._count(row.kind, result)
        if result == "delivered":
            log.info("action_delivered", detail=detail, **facts)
        elif result == "failed":
            why = outcome.permanent or "max attempts reached"
            log.error("action_failed", error=detail, why=why, **facts)
        else:
            delay = params["delay"]
            log.warning("action_retry", error=detail, retry_in=round(delay, 2), **facts)

    def _give_up(self, conn: psycopg.Connection, token: str, row: OutboxRow) -> None:
        found = conn.execute(queries["give_up"], {"outbox_id": row.id, "token": token}).fetchone()
        if found is None:
            return  # another claim holds it now: its outcome counts
        self._count(row.kind, "failed")
        log.error(
            "action_failed",
            error=found[0],
            why="max attempts reached",
            outbox_id=row.id,
            kind=row.kind,
            rule_id=row.rule_id,
            event_id=row.event_id,
            attempts=row.attempts,
        )

    def _count(self, kind: str, outcome: str) -> None:
        self._metrics.actions_delivered.labels(kind=kind, outcome=outcome).inc()

    # --- deliveries

    def _deliver(self, row: OutboxRow, documents: Mapping[int, dict[str, JsonValue]]) -> str:
        if row.kind == "webhook":
            return self._webhooks.send(row.id, _parse_target(WebhookTarget, row))
        if row.kind == "mqtt":
            target = _parse_target(PublishTarget, row)
            return self._mqtt.publish(target, self._mqtt_payload(row, target, documents))
        if row.kind == "notify":
            return self._notify(row, _parse_target(NotifyTarget, row))
        raise BadTarget(f"unknown action kind {row.kind!r}; expected one of {', '.join(KINDS)}")

    @staticmethod
    def _mqtt_payload(
        row: OutboxRow, target: PublishTarget, documents: Mapping[int, dict[str, JsonValue]]
    ) -> bytes:
        document = target.payload
        if document is None:
            if row.event_id not in documents:
                raise BadTarget(f"event {row.event_id} no longer exists")
            document = documents[row.event_id]
        try:
            if isinstance(document, str):
                # A text payload ("High temperature on SN-1") is published as the text itself,
                # not as a JSON string in quotes: what a person subscribing expects to read.
                return document.encode()
            return json.dumps(document, ensure_ascii=False, separators=(",", ":")).encode()
        except (UnicodeEncodeError, ValueError) as exc:  # a lone surrogate from a device
            raise BadTarget(f"cannot encode the mqtt payload: {exc}") from None

    @staticmethod
    def _event_documents(
        conn: psycopg.Connection, rows: Sequence[OutboxRow]
    ) -> dict[int, dict[str, JsonValue]]:
        """The standard event documents the claimed mqtt rows without a payload publish."""
        wanted = sorted(
            {
                row.event_id
                for row in rows
                if row.kind == "mqtt"
                and isinstance(row.target, dict)
                and row.target.get("payload") is None
            }
        )
        if not wanted:
            return {}
        documents: dict[int, dict[str, JsonValue]] = {}
        for found in conn.execute(queries["event_documents"], {"event_ids": wanted}):
            event, kind, rule_id, rule_name, serial, device, metric, value, ts, message = found
            documents[event] = {
                "event_id": event,
                "kind": kind,
                "rule_id": rule_id,
                "rule_name": rule_name,
                "serial_id": serial,
                "device_name": device,
                "metric": metric,
                "value": value,
                "ts": ts.astimezone(UTC).isoformat() if ts is not None else None,
                "message": message,
            }
        return documents

    def _notify(self, row: OutboxRow, target: NotifyTarget) -> str:
        log.info(
            "notification",
            channel=target.channel,
            subject=target.subject,
            message=target.message,
            rule_id=row.rule_id,
            event_id=row.event_id,
        )
        if self._mailer is None or target.channel != "email":
            return f"logged ({target.channel} channel)"
        recipients = target.recipients
        if not recipients:
            if not self._warned_no_recipient:
                self._warned_no_recipient = True
                log.warning(
                    "notification_not_emailed",
                    why="the action names no recipient ('to') and no default recipient is set",
                )
            return "logged; not emailed: no recipient"
        return "logged; " + self._mailer.send(recipients, target.subject, target.message)


__all__ = [
    "BadTarget",
    "DeliveryFailed",
    "Mailer",
    "MqttPublisher",
    "NotifyTarget",
    "OutboxWorker",
    "PublishTarget",
    "RefusedTarget",
    "Step",
    "WebhookSender",
    "WebhookTarget",
    "retry_delay",
]
