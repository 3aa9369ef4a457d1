"""Where rule actions are delivered: the outbox worker, after the ingestion transaction committed.

The rule engine only INSERTs rows into `action_outbox` inside the ingestion transaction; this
worker, on a thread and pool connections of its own, delivers them, so a slow webhook delays other
actions but never ingestion. Each pass claims due rows with `FOR UPDATE SKIP LOCKED` (several
service instances share the outbox, each row goes to one of them), delivers them one by one and
records each outcome in the same transaction as the claim: a crash before the commit leaves the
rows pending, so delivery is at least once (webhook receivers get the outbox id in a header to
drop a repeat).

Outcomes: delivered; or a retry after a jittered exponential delay; or, after
`outbox_max_attempts` attempts (or at once when the row itself is malformed), `failed`, kept in
the table with its last error and never dropped. Every attempt leaves a row in `action_attempts`.

Deliveries: `webhook` POSTs the JSON body (2xx is success); `mqtt` publishes on a dedicated
clean-session client and waits for the broker's acknowledgement; `notify` logs the notification
and, for the email channel with `smtp_url` set, sends it to the target's `to` address(es).
"""

from __future__ import annotations

import json
import random
import smtplib
import ssl
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email.message import EmailMessage
from typing import Any, Final, Literal, TypeVar
from urllib.parse import unquote, urlsplit

import httpx
import paho.mqtt.client as mqtt
import psycopg
import structlog
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from psycopg_pool import ConnectionPool
from pydantic import BaseModel, ConfigDict, JsonValue, ValidationError

from config.settings import Settings
from ingestor.backoff import Backoff
from iothub import mqttclient
from iothub.metrics import Metrics
from schema import queries as queries_mod

log = structlog.get_logger(__name__)
queries = queries_mod.load("rules_engine", "outbox.sql")

CLAIM_BATCH: Final = 50  # rows claimed (and locked) per transaction
BATCH_BUDGET: Final = 15.0  # seconds: past this, commit what is done; the rest is claimed afresh
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
SMTP_PORT, SMTPS_PORT = 25, 465
MAX_DETAIL_CHARS: Final = 1000  # of an attempt's detail and of last_error
MAX_EXCERPT_BYTES: Final = 300  # of a failed webhook's response body, quoted in the detail
USER_AGENT: Final = "iothub-outbox"
DELIVERY_HEADER: Final = "X-Iothub-Delivery"  # the outbox id: receivers can drop a repeat

KINDS: Final = ("notify", "webhook", "mqtt")
OUTCOMES: Final = ("delivered", "retry", "failed")


class DeliveryFailed(Exception):
    """The action could not be delivered."""


class BadTarget(DeliveryFailed):
    """The outbox row's target is malformed; retrying cannot help."""


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


@dataclass(frozen=True)
class Outcome:
    ok: bool
    detail: str
    permanent: bool = False  # a failure that no retry can fix


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
    """One pooled HTTP client for every webhook: keep-alive connections are reused."""

    def __init__(self, timeout: float) -> None:
        self._timeout = timeout
        self._client = httpx.Client(
            timeout=timeout, follow_redirects=False, headers={"User-Agent": USER_AGENT}
        )

    def send(self, outbox_id: int, target: WebhookTarget) -> str:
        where = _origin(target.url)
        headers = {DELIVERY_HEADER: str(outbox_id), **(target.headers or {})}
        try:
            with self._client.stream("POST", target.url, json=target.body, headers=headers) as r:
                if r.is_success:
                    r.read()  # an unread body would cost the keep-alive connection
                    return f"HTTP {r.status_code} from {where}"
                excerpt = self._excerpt(r)
                status = f"HTTP {r.status_code} {r.reason_phrase}".rstrip()
                raise DeliveryFailed(f"{status} from {where}" + (f": {excerpt}" if excerpt else ""))
        except httpx.TimeoutException as exc:
            raise DeliveryFailed(
                f"no answer from {where} within {self._timeout:g} s ({type(exc).__name__})"
            ) from None
        except httpx.ConnectError as exc:
            raise DeliveryFailed(f"cannot connect to {where}: {exc}") from None
        except httpx.HTTPError as exc:
            raise DeliveryFailed(f"POST to {where} failed: {type(exc).__name__}: {exc}") from None
        except httpx.InvalidURL as exc:
            raise BadTarget(f"invalid webhook url: {exc}") from None

    @staticmethod
    def _excerpt(response: httpx.Response) -> str:
        data = b""
        for chunk in response.iter_bytes():
            data += chunk
            if len(data) >= MAX_EXCERPT_BYTES:
                break
        text = data[:MAX_EXCERPT_BYTES].decode("utf-8", "replace")
        return " ".join(text.split())

    def close(self) -> None:
        self._client.close()


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
        client = self._client or self._start()
        topic = target.topic
        if not self._wait_connected():
            why = f" (broker refused: {self._refused})" if self._refused else ""
            raise DeliveryFailed(
                f"not connected to the broker {self._host}:{self._port} "
                f"within {self._timeout:g} s{why}"
            )
        info = client.publish(topic, payload, qos=target.qos, retain=target.retain)
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
    """Sends notifications through the SMTP server of `smtp_url` (smtp:// or smtps://)."""

    def __init__(self, smtp_url: str, sender: str, timeout: float = SMTP_TIMEOUT) -> None:
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
        try:
            server = (
                smtplib.SMTP_SSL(self._host, self._port, timeout=self._timeout, context=context)
                if self._tls
                else smtplib.SMTP(self._host, self._port, timeout=self._timeout)
            )
            with server:
                server.ehlo()
                if not self._tls and server.has_extn("starttls"):
                    server.starttls(context=context)
                    server.ehlo()
                if self._user:
                    server.login(self._user, self._password)
                refused = server.send_message(message)
        except (smtplib.SMTPException, OSError) as exc:
            raise DeliveryFailed(
                f"smtp {self._host}:{self._port}: {type(exc).__name__}: {exc}"
            ) from None
        accepted = [address for address in recipients if address not in refused]
        detail = f"emailed to {', '.join(accepted)}"
        # Some recipients accepted: a retry would mail those again, so this counts as done.
        return detail + (f"; refused: {', '.join(refused)}" if refused else "")


# ---------------------------------------------------------------------------------------------
# The worker


class OutboxWorker:
    """Delivers the outbox on a thread of its own; `service.Worker` of `iothub run`.

    The pool is the caller's: it must be open while the worker runs, and is never closed here.
    """

    name = "iothub-outbox"

    def __init__(
        self,
        settings: Settings,
        pool: ConnectionPool,
        metrics: Metrics,
        *,
        retry_base: float = RETRY_BASE,
        retry_max: float = RETRY_MAX,
        batch_size: int = CLAIM_BATCH,
        publish_timeout: float = PUBLISH_TIMEOUT,
    ) -> None:
        self._settings = settings
        self._pool = pool
        self._metrics = metrics
        self._retry_base = retry_base
        self._retry_max = retry_max
        self._batch_size = batch_size
        self._max_attempts = settings.outbox_max_attempts
        self._stopping = threading.Event()
        self._webhooks = WebhookSender(settings.webhook_timeout)
        self._mqtt = MqttPublisher(settings, publish_timeout, self._stopping)
        self._mailer = Mailer(settings.smtp_url, settings.smtp_from) if settings.smtp_url else None
        self._warned_no_recipient = False
        self._thread: threading.Thread | None = None
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
        """Finish the row in hand (rows not attempted stay pending), then close the clients."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                # Stuck in a delivery: its transaction is not committed, so the row stays
                # pending and is delivered again later. The clients stay open for it.
                log.error("outbox_stop_timeout", timeout_s=timeout)
                return
        self._webhooks.close()
        self._mqtt.close()

    @property
    def alive(self) -> bool:
        """False only when the thread should be running and is not (it died)."""
        thread = self._thread
        return thread is None or self._stopping.is_set() or thread.is_alive()

    def _main(self) -> None:
        log.info(
            "outbox_started",
            poll_interval_s=self._settings.outbox_poll_interval,
            max_attempts=self._max_attempts,
            smtp=self._mailer is not None,
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
        """Claim due rows, deliver, record; True when more rows may be due right away."""
        started = time.monotonic()
        done: list[tuple[OutboxRow, datetime, Outcome, datetime]] = []
        with self._pool.connection() as conn:
            with conn.transaction():
                rows = [
                    OutboxRow(*found)
                    for found in conn.execute(queries["claim_due"], {"limit": self._batch_size})
                ]
                for row in rows:
                    if self._stopping.is_set() or time.monotonic() - started > BATCH_BUDGET:
                        break  # the rows left are released at commit, still pending
                    attempted_at = datetime.now(UTC)
                    outcome = self._attempt(conn, row)
                    done.append((row, attempted_at, outcome, datetime.now(UTC)))
                self._record(conn, done)
            pending = conn.execute(queries["count_pending"]).fetchone()
        self._metrics.outbox_backlog.set(pending[0] if pending else 0)
        return len(rows) == self._batch_size or len(done) < len(rows)

    def _attempt(self, conn: psycopg.Connection, row: OutboxRow) -> Outcome:
        try:
            return Outcome(ok=True, detail=self._deliver(conn, row))
        except BadTarget as exc:
            return Outcome(ok=False, detail=str(exc), permanent=True)
        except DeliveryFailed as exc:
            return Outcome(ok=False, detail=str(exc))
        except psycopg.Error:
            raise  # the transaction is lost: nothing of this batch is recorded, all stay pending
        except Exception as exc:
            # A bug in one delivery must not stop the others: record it like any failure.
            log.exception("action_delivery_crashed", outbox_id=row.id, kind=row.kind)
            return Outcome(ok=False, detail=f"internal error: {type(exc).__name__}: {exc}")

    def _record(
        self,
        conn: psycopg.Connection,
        done: Sequence[tuple[OutboxRow, datetime, Outcome, datetime]],
    ) -> None:
        """The outcomes of a pass, in the claim's transaction: one pipelined statement per kind
        of write, not two round trips per row (a storm of events means thousands of rows)."""
        attempts_rows: list[dict[str, Any]] = []
        delivered: list[dict[str, Any]] = []
        failed: list[dict[str, Any]] = []
        retries: list[dict[str, Any]] = []
        for row, attempted_at, outcome, finished_at in done:
            detail = _clip(outcome.detail)
            attempts_rows.append(
                {
                    "outbox_id": row.id,
                    "attempted_at": attempted_at,
                    "ok": outcome.ok,
                    "detail": detail,
                }
            )
            attempts = row.attempts + 1
            facts = {
                "outbox_id": row.id,
                "kind": row.kind,
                "rule_id": row.rule_id,
                "event_id": row.event_id,
                "attempts": attempts,
            }
            if outcome.ok:
                delivered.append({"outbox_id": row.id, "finished_at": finished_at})
                self._count(row.kind, "delivered")
                log.info("action_delivered", detail=detail, **facts)
            elif outcome.permanent or attempts >= self._max_attempts:
                failed.append({"outbox_id": row.id, "error": detail})
                self._count(row.kind, "failed")
                why = "malformed target" if outcome.permanent else "max attempts reached"
                log.error("action_failed", error=detail, why=why, **facts)
            else:
                delay = retry_delay(attempts, self._retry_base, self._retry_max)
                retries.append(
                    {
                        "outbox_id": row.id,
                        "error": detail,
                        "delay": delay,
                        "finished_at": finished_at,
                    }
                )
                self._count(row.kind, "retry")
                log.warning("action_retry", error=detail, retry_in=round(delay, 2), **facts)
        with conn.cursor() as cur:
            for query, params in (
                ("record_attempt", attempts_rows),
                ("mark_delivered", delivered),
                ("mark_failed", failed),
                ("schedule_retry", retries),
            ):
                if params:
                    cur.executemany(queries[query], params)

    def _count(self, kind: str, outcome: str) -> None:
        self._metrics.actions_delivered.labels(kind=kind, outcome=outcome).inc()

    # --- deliveries

    def _deliver(self, conn: psycopg.Connection, row: OutboxRow) -> str:
        if row.kind == "webhook":
            return self._webhooks.send(row.id, _parse_target(WebhookTarget, row))
        if row.kind == "mqtt":
            target = _parse_target(PublishTarget, row)
            return self._mqtt.publish(target, self._mqtt_payload(conn, row, target))
        if row.kind == "notify":
            return self._notify(row, _parse_target(NotifyTarget, row))
        raise BadTarget(f"unknown action kind {row.kind!r}; expected one of {', '.join(KINDS)}")

    def _mqtt_payload(
        self, conn: psycopg.Connection, row: OutboxRow, target: PublishTarget
    ) -> bytes:
        document = target.payload
        if document is None:
            document = self._event_document(conn, row.event_id)
        if isinstance(document, str):
            # A text payload ("High temperature on SN-1") is published as the text itself, not
            # as a JSON string in quotes: that is what a person subscribing expects to read.
            return document.encode()
        return json.dumps(document, ensure_ascii=False, separators=(",", ":")).encode()

    @staticmethod
    def _event_document(conn: psycopg.Connection, event_id: int) -> dict[str, JsonValue]:
        found = conn.execute(queries["event_document"], {"event_id": event_id}).fetchone()
        if found is None:
            raise BadTarget(f"event {event_id} no longer exists")
        event, kind, rule_id, rule_name, serial, device, metric, value, ts, message = found
        return {
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
    "WebhookSender",
    "WebhookTarget",
    "retry_delay",
]
