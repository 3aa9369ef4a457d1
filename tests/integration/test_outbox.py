"""The outbox worker against real receivers: an HTTP server, Mosquitto, an SMTP sink."""

from __future__ import annotations

import contextlib
import email
import ipaddress
import json
import socket
import socketserver
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import psycopg
import pytest
import structlog
from prometheus_client import CollectorRegistry
from psycopg.types.json import Jsonb

from config.settings import Settings
from ingestor import mqtt as mqttclient
from iothub.daemon.observe import ServiceMetrics
from iothub.daemon.service import IngestService
from rules_engine.actions import egress, outbox
from rules_engine.actions.email import Mailer
from rules_engine.actions.exceptions import DeliveryFailed, RefusedTarget
from rules_engine.actions.outbox import OutboxWorker, retry_delay
from rules_engine.actions.targets import WebhookTarget
from rules_engine.actions.webhook import WebhookSender
from rules_engine.evaluate import step as evaluator
from rules_engine.evaluate.compile import compile_rule
from rules_engine.events import outbox_rows
from rules_engine.metrics import RuleMetrics
from rules_engine.rule_cache import RuleEntry
from schema import db
from tests.support.daemon import running
from tests.support.fleet import make_fleet, wait_for
from tests.support.paho_api import client as mqtt

FAST_RETRY = 0.05  # seconds: the first retry delay in these tests
LOOPBACK = "127.0.0.1/32"  # where the test receivers listen


# --- receivers


@dataclass(frozen=True)
class Request:
    path: str
    headers: dict[str, str]
    body: Any


class WebhookServer:
    """A real HTTP server on a free port that records every POST; it answers `fail_status` to
    the first `fail_first` requests (every request when None), then 200, each after `delay`."""

    def __init__(
        self, fail_first: int | None = 0, fail_status: int = 500, delay: float = 0.0
    ) -> None:
        self.requests: list[Request] = []
        self.fail_first = fail_first
        self.fail_status = fail_status
        self.delay = delay
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as the worker's pooled client expects
            disable_nagle_algorithm = True  # headers and body go out in separate writes

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                body = json.loads(self.rfile.read(length) or b"null")
                with server.lock:
                    server.requests.append(Request(self.path, dict(self.headers), body))
                    seen = len(server.requests)
                failing = server.fail_first is None or seen <= server.fail_first
                time.sleep(server.delay)
                status, reply = (server.fail_status, b"boom") if failing else (200, b"{}")
                self.send_response(status)
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="test-webhook")
        self.thread.start()

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_port}"

    @property
    def url(self) -> str:
        return f"{self.origin}/hooks/secret-token"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)


class SmtpSink:
    """A minimal SMTP server on a free port that keeps every message it accepts and every
    command verb it was sent; `extensions` are announced in its EHLO answer (none: a bare 250).
    It never offers STARTTLS."""

    def __init__(self, extensions: tuple[str, ...] = ()) -> None:
        self.messages: list[tuple[list[str], Message]] = []
        self.commands: list[str] = []
        sink = self

        class Handler(socketserver.StreamRequestHandler):
            def reply(self, line: str) -> None:
                self.wfile.write(line.encode() + b"\r\n")

            def handle(self) -> None:
                self.reply("220 sink ready")
                recipients: list[str] = []
                while line := self.rfile.readline():
                    verb = line[:4].decode().upper()
                    sink.commands.append(verb)
                    if verb == "EHLO" and extensions:
                        self.reply("250-sink")  # the first line names the server
                        for extension in extensions:
                            self.reply(f"250-{extension}")
                    if verb == "AUTH":
                        self.reply("235 ok")
                        continue
                    if verb == "RCPT":
                        recipients.append(line.decode().split(":", 1)[1].strip().strip("<>"))
                    if verb == "DATA":
                        self.reply("354 go on")
                        data = b""
                        while (part := self.rfile.readline()) not in (b".\r\n", b""):
                            data += part[1:] if part.startswith(b"..") else part
                        sink.messages.append((recipients, email.message_from_bytes(data)))
                        recipients = []
                    elif verb == "QUIT":
                        self.reply("221 bye")
                        return
                    self.reply("250 ok")

        self.server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, name="test-smtp")
        self.thread.start()

    @property
    def url(self) -> str:
        return f"smtp://127.0.0.1:{self.server.server_address[1]}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


# --- fixtures and helpers


@pytest.fixture
def webhook() -> Iterator[Callable[..., WebhookServer]]:
    servers: list[WebhookServer] = []

    def start(
        fail_first: int | None = 0, fail_status: int = 500, delay: float = 0.0
    ) -> WebhookServer:
        servers.append(WebhookServer(fail_first, fail_status, delay))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


@pytest.fixture
def event(db_url: str, unique: str) -> tuple[int, int]:
    """(rule_id, event_id): a rule on a device's temperature, and one triggered event of it."""
    fleet = make_fleet(db_url, f"SN-{unique}", 1)
    dm = fleet.bindings[(fleet.serials[0], "temperature")]
    with psycopg.connect(db_url, autocommit=True) as conn:
        rule = conn.execute(
            "INSERT INTO rules (name, condition, action, device_metric_id) "
            "VALUES ('High temp', %s, %s, %s) RETURNING id",
            (
                Jsonb({"type": "threshold", "operator": ">", "value": 27.5}),
                Jsonb({"type": "notify", "channel": "email", "message": "hot: {value}"}),
                dm,
            ),
        ).fetchone()
        assert rule
        found = conn.execute(
            'INSERT INTO events ("timestamp", rule_id, kind, device_metric_id, context) '
            "VALUES ('2026-01-27T12:00:00Z', %s, 'triggered', %s, %s) RETURNING id",
            (
                rule[0],
                dm,
                Jsonb({"value": 28.5, "ts": "2026-01-27T12:00:00+00:00", "message": "hot: 28.5"}),
            ),
        ).fetchone()
        assert found
        return int(rule[0]), int(found[0])


@dataclass
class Started:
    worker: OutboxWorker
    metrics: RuleMetrics


@pytest.fixture
def start_worker(make_settings: Callable[..., Settings]) -> Iterator[Callable[..., Started]]:
    """Starts outbox workers on pools of their own, fast retries; stops them after the test."""
    started: list[tuple[OutboxWorker, Any]] = []

    def start(publish_timeout: float = 5.0, **overrides: Any) -> Started:
        # The test receivers listen on loopback, which webhooks may reach only when allowed.
        values: dict[str, Any] = {
            "outbox_poll_interval": 0.05,
            "webhook_timeout": 2.0,
            "action_allow_networks": [LOOPBACK],
        }
        values.update(overrides)
        settings = make_settings(**values)
        pool = db.make_pool(settings, "outbox-test", size=2)
        pool.open(wait=True)
        metrics = RuleMetrics(CollectorRegistry())
        worker = OutboxWorker(
            settings,
            pool,
            metrics,
            retry_base=FAST_RETRY,
            retry_max=0.2,
            publish_timeout=publish_timeout,
        )
        worker.start()
        started.append((worker, pool))
        return Started(worker, metrics)

    yield start
    for worker, pool in started:
        worker.stop(10)
        pool.close()


def enqueue(conn: psycopg.Connection, event: tuple[int, int], kind: str, target: Any) -> int:
    rule_id, event_id = event
    row = conn.execute(
        "INSERT INTO action_outbox (event_id, rule_id, kind, target) "
        "VALUES (%s, %s, %s, %s) RETURNING id",
        (event_id, rule_id, kind, Jsonb(target)),
    ).fetchone()
    assert row
    return int(row[0])


def outbox_row(conn: psycopg.Connection, outbox_id: int) -> tuple[str, int, str | None]:
    row = conn.execute(
        "SELECT status, attempts, last_error FROM action_outbox WHERE id = %s", (outbox_id,)
    ).fetchone()
    assert row
    return row[0], row[1], row[2]


def attempts(conn: psycopg.Connection, outbox_id: int) -> list[tuple[bool, str]]:
    return [
        (ok, detail)
        for ok, detail in conn.execute(
            "SELECT ok, detail FROM action_attempts WHERE outbox_id = %s ORDER BY id",
            (outbox_id,),
        )
    ]


def settled(conn: psycopg.Connection, outbox_id: int) -> Callable[[], bool]:
    return lambda: outbox_row(conn, outbox_id)[0] != "pending"


def sample(metrics: RuleMetrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, labels)
    return value or 0.0


def webhook_target(url: str) -> dict[str, Any]:
    return {
        "url": url,
        "headers": {"Authorization": "Bearer t0ken"},
        "body": {
            "event_id": 1,
            "kind": "triggered",
            "rule_name": "High temp",
            "value": 28.5,
            "message": "hot: 28.5",
            "notification": None,
        },
    }


# --- webhooks


def test_webhook_that_fails_then_recovers_is_delivered_with_every_attempt_recorded(
    webhook: Callable[..., WebhookServer],
    start_worker: Callable[..., Started],
    conn: psycopg.Connection,
    event: tuple[int, int],
) -> None:
    """Two 500s then a 200: two retries recorded, then 'delivered' with the JSON body posted."""
    server = webhook(fail_first=2)
    target = webhook_target(server.url)
    outbox_id = enqueue(conn, event, "webhook", target)
    started = start_worker(outbox_max_attempts=5)

    assert wait_for(settled(conn, outbox_id))
    assert outbox_row(conn, outbox_id) == (
        "delivered",
        3,
        f"HTTP 500 Internal Server Error from {server.origin}",
    )
    # Status and reason only: the receiver's body ("boom") is not stored.
    assert attempts(conn, outbox_id) == [
        (False, f"HTTP 500 Internal Server Error from {server.origin}"),
        (False, f"HTTP 500 Internal Server Error from {server.origin}"),
        (True, f"HTTP 200 from {server.origin}"),
    ]
    delivered_at = conn.execute(
        "SELECT delivered_at IS NOT NULL FROM action_outbox WHERE id = %s", (outbox_id,)
    ).fetchone()
    assert delivered_at == (True,)
    assert len(server.requests) == 3
    last = server.requests[-1]
    assert last.path == "/hooks/secret-token"
    assert last.body == target["body"]
    assert last.headers["Authorization"] == "Bearer t0ken"
    assert last.headers["X-Iothub-Delivery"] == str(outbox_id)
    assert last.headers["Content-Type"] == "application/json"
    m = started.metrics
    assert sample(m, "iothub_actions_delivered_total", kind="webhook", outcome="retry") == 2
    assert sample(m, "iothub_actions_delivered_total", kind="webhook", outcome="delivered") == 1
    assert wait_for(lambda: sample(m, "iothub_outbox_backlog") == 0)


def test_webhook_that_always_fails_is_kept_as_failed_after_max_attempts(
    webhook: Callable[..., WebhookServer],
    start_worker: Callable[..., Started],
    conn: psycopg.Connection,
    event: tuple[int, int],
) -> None:
    """After outbox_max_attempts failures the row is 'failed' (not deleted) and logged at error."""
    server = webhook(fail_first=None, fail_status=503)
    outbox_id = enqueue(conn, event, "webhook", webhook_target(server.url))
    with structlog.testing.capture_logs() as logs:
        started = start_worker(outbox_max_attempts=3)
        assert wait_for(settled(conn, outbox_id))
    error = f"HTTP 503 Service Unavailable from {server.origin}"
    assert outbox_row(conn, outbox_id) == ("failed", 3, error)
    assert attempts(conn, outbox_id) == [(False, error)] * 3
    assert len(server.requests) == 3
    failed = [e for e in logs if e["event"] == "action_failed"]
    assert len(failed) == 1
    assert failed[0]["log_level"] == "error"
    assert failed[0]["outbox_id"] == outbox_id
    assert failed[0]["why"] == "max attempts reached"
    # The URL's path can hold a secret: neither the logs nor the table show it.
    assert not any("secret-token" in json.dumps(e, default=str) for e in logs)
    m = started.metrics
    assert sample(m, "iothub_actions_delivered_total", kind="webhook", outcome="failed") == 1
    assert sample(m, "iothub_actions_delivered_total", kind="webhook", outcome="retry") == 2


def test_webhook_on_a_dead_port_records_connection_refused(
    start_worker: Callable[..., Started], conn: psycopg.Connection, event: tuple[int, int]
) -> None:
    """A refused connection is a failed attempt whose detail says so."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    outbox_id = enqueue(conn, event, "webhook", webhook_target(f"http://127.0.0.1:{port}/x"))
    start_worker(outbox_max_attempts=1)
    assert wait_for(settled(conn, outbox_id))
    status, tries, last_error = outbox_row(conn, outbox_id)
    assert (status, tries) == ("failed", 1)
    assert last_error is not None
    assert last_error.startswith(f"cannot connect to http://127.0.0.1:{port}: ")
    assert "refused" in last_error.lower()


def test_malformed_target_fails_at_once_without_retries(
    start_worker: Callable[..., Started], conn: psycopg.Connection, event: tuple[int, int]
) -> None:
    """A target no retry can fix (no url) is 'failed' after one attempt, naming what is wrong."""
    outbox_id = enqueue(conn, event, "webhook", {"body": {}})
    start_worker(outbox_max_attempts=5)
    assert wait_for(settled(conn, outbox_id))
    assert outbox_row(conn, outbox_id) == (
        "failed",
        1,
        "malformed webhook target: url: Field required",
    )


def test_two_workers_share_the_outbox_and_deliver_each_row_once(
    webhook: Callable[..., WebhookServer],
    start_worker: Callable[..., Started],
    conn: psycopg.Connection,
    event: tuple[int, int],
) -> None:
    """Two instances on one outbox (SKIP LOCKED) deliver every row exactly once."""
    # Slow answers keep the first worker busy with its claimed rows while the second claims.
    server = webhook(delay=0.01)
    ids = [enqueue(conn, event, "webhook", webhook_target(server.url)) for _ in range(60)]
    first, second = start_worker(), start_worker()

    def all_delivered() -> bool:
        row = conn.execute(
            "SELECT count(*) FROM action_outbox WHERE status = 'delivered'"
        ).fetchone()
        return row == (len(ids),)

    assert wait_for(all_delivered)
    delivered = sorted(int(r.headers["X-Iothub-Delivery"]) for r in server.requests)
    assert delivered == ids
    shares = [
        sample(w.metrics, "iothub_actions_delivered_total", kind="webhook", outcome="delivered")
        for w in (first, second)
    ]
    assert sum(shares) == 60
    assert min(shares) > 0, f"one worker did all the work: {shares}"


# --- mqtt


class Subscriber:
    """A real MQTT subscriber collecting what arrives on one topic filter."""

    def __init__(self, broker_url: str, client_id: str, topic: str) -> None:
        self.messages: list[mqtt.MQTTMessage] = []
        self.client = mqttclient.make_client(broker_url, client_id)
        subscribed = threading.Event()
        self.client.on_connect = lambda client, *a: client.subscribe(topic, qos=1)
        self.client.on_subscribe = lambda *a: subscribed.set()
        self.client.on_message = lambda client, userdata, message: self.messages.append(message)
        self.client.connect(*mqttclient.host_port(broker_url))
        self.client.loop_start()
        if not subscribed.wait(10):
            raise TimeoutError("subscriber could not subscribe")

    def close(self) -> None:
        self.client.disconnect()
        mqttclient.stop_loop(self.client)


def test_mqtt_action_is_published_and_acknowledged(
    start_worker: Callable[..., Started],
    conn: psycopg.Connection,
    event: tuple[int, int],
    broker_url: str,
    unique: str,
) -> None:
    """An mqtt row is published with its qos and payload; without a payload, the event itself."""
    subscriber = Subscriber(broker_url, f"sub-{unique}", f"t{unique}/alerts/#")
    try:
        given = enqueue(
            conn,
            event,
            "mqtt",
            {
                "topic": f"t{unique}/alerts/given",
                "payload": {"alert": "hot", "value": 28.5},
                "qos": 1,
                "retain": False,
            },
        )
        standard = enqueue(
            conn,
            event,
            "mqtt",
            {
                "topic": f"t{unique}/alerts/standard",
                "payload": None,
                "qos": 1,
                "retain": False,
            },
        )
        start_worker(mqtt_actions_client_id=f"actions-{unique}")
        assert wait_for(lambda: len(subscriber.messages) >= 2)
    finally:
        subscriber.close()
    by_topic = {m.topic: json.loads(m.payload) for m in subscriber.messages}
    assert by_topic[f"t{unique}/alerts/given"] == {"alert": "hot", "value": 28.5}
    rule_id, event_id = event
    document = by_topic[f"t{unique}/alerts/standard"]
    assert document == {
        "event_id": event_id,
        "kind": "triggered",
        "rule_id": rule_id,
        "rule_name": "High temp",
        "serial_id": f"SN-{unique}-0",
        "device_name": f"Device SN-{unique}-0",
        "metric": "temperature",
        "value": 28.5,
        "ts": "2026-01-27T12:00:00+00:00",
        "message": "hot: 28.5",
    }
    assert wait_for(settled(conn, given)) and wait_for(settled(conn, standard))
    assert attempts(conn, given) == [
        (True, f"published to 't{unique}/alerts/given' (qos 1, acknowledged)")
    ]
    assert outbox_row(conn, standard)[:2] == ("delivered", 1)


def test_mqtt_action_with_the_broker_away_is_a_failed_attempt(
    start_worker: Callable[..., Started], conn: psycopg.Connection, event: tuple[int, int]
) -> None:
    """Without a broker connection the attempt fails within the timeout, saying so."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    outbox_id = enqueue(conn, event, "mqtt", {"topic": "alerts/x", "payload": 1, "qos": 1})
    start_worker(publish_timeout=0.3, outbox_max_attempts=1, mqtt_url=f"mqtt://127.0.0.1:{port}")
    assert wait_for(settled(conn, outbox_id))
    assert outbox_row(conn, outbox_id) == (
        "failed",
        1,
        f"not connected to the broker 127.0.0.1:{port} within 0.3 s",
    )


# --- notifications


def test_notify_action_is_logged(
    start_worker: Callable[..., Started], conn: psycopg.Connection, event: tuple[int, int]
) -> None:
    """A notify row without SMTP configured is delivered by logging the notification."""
    outbox_id = enqueue(
        conn,
        event,
        "notify",
        {
            "channel": "email",
            "message": "High temperature in Boiler: 28.5°C",
            "subject": "High temp: triggered",
        },
    )
    with structlog.testing.capture_logs() as logs:
        start_worker()
        assert wait_for(settled(conn, outbox_id))
    rule_id, event_id = event
    notes = [e for e in logs if e["event"] == "notification"]
    assert notes == [
        {
            "event": "notification",
            "log_level": "info",
            "channel": "email",
            "subject": "High temp: triggered",
            "message": "High temperature in Boiler: 28.5°C",
            "rule_id": rule_id,
            "event_id": event_id,
        }
    ]
    assert attempts(conn, outbox_id) == [(True, "logged (email channel)")]


def test_email_notification_goes_through_smtp_to_the_targets_recipient(
    start_worker: Callable[..., Started], conn: psycopg.Connection, event: tuple[int, int]
) -> None:
    """With smtp_url set, an email notification naming `to` is sent; one without is only logged."""
    sink = SmtpSink()
    try:
        mailed = enqueue(
            conn,
            event,
            "notify",
            {
                "channel": "email",
                "message": "High temperature in Boiler: 28.5°C",
                "subject": "High temp: triggered",
                "to": "ops@example.com",
            },
        )
        logged = enqueue(
            conn,
            event,
            "notify",
            {
                "channel": "email",
                "message": "no address",
                "subject": "High temp: triggered",
            },
        )
        start_worker(smtp_url=sink.url, smtp_from="hub@example.com")
        assert wait_for(settled(conn, mailed)) and wait_for(settled(conn, logged))
    finally:
        sink.close()
    assert attempts(conn, mailed) == [(True, "logged; emailed to ops@example.com")]
    assert attempts(conn, logged) == [(True, "logged; not emailed: no recipient")]
    assert len(sink.messages) == 1
    recipients, message = sink.messages[0]
    assert recipients == ["ops@example.com"]
    assert message["From"] == "hub@example.com"
    assert message["Subject"] == "High temp: triggered"
    assert isinstance(message, email.message.Message)
    payload = message.get_payload(decode=True)
    assert isinstance(payload, bytes)
    assert payload.decode().strip() == "High temperature in Boiler: 28.5°C"


# --- the loop itself


def test_worker_survives_a_failing_loop_and_recovers(
    start_worker: Callable[..., Started], conn: psycopg.Connection, event: tuple[int, int]
) -> None:
    """A failing pass is logged and retried; the thread stays alive and delivers afterwards."""
    conn.execute("ALTER TABLE action_outbox RENAME TO action_outbox_away")
    with structlog.testing.capture_logs() as logs:
        started = start_worker()
        assert wait_for(lambda: any(e["event"] == "outbox_loop_failed" for e in logs))
        assert started.worker.alive
        conn.execute("ALTER TABLE action_outbox_away RENAME TO action_outbox")
        outbox_id = enqueue(conn, event, "notify", {"channel": "sms", "message": "hi"})
        assert wait_for(settled(conn, outbox_id))
    assert any(e["event"] == "outbox_recovered" for e in logs)
    assert started.worker.alive
    assert outbox_row(conn, outbox_id)[:2] == ("delivered", 1)
    started.worker.stop(10)
    assert started.worker.alive  # stopped on request: not a death the service should report


def test_retry_delay_doubles_from_the_base_up_to_the_cap() -> None:
    """Delays are base·2^(n-1) within ±20 %, never beyond the cap (+20 %), even after many."""
    for attempt, expected in ((1, 1.0), (2, 2.0), (3, 4.0), (10, 300.0), (5000, 300.0)):
        delay = retry_delay(attempt)
        assert expected * 0.8 <= delay <= expected * 1.2


# --- hostile endpoints


class HostileServer:
    """A real HTTP server on a free port whose answer depends on the path: it drips its head
    or its body a byte at a time, sends a huge body, redirects, or fails with a body. It records
    every request and how many body bytes it managed to send."""

    DRIP_EVERY = 0.2  # seconds between two dripped bytes
    HUGE = 200 * 1024 * 1024  # bytes of the huge body
    REDIRECT_TO = "http://169.254.169.254/latest/meta-data/"

    def __init__(self) -> None:
        self.requests: list[Request] = []
        self.sent: dict[str, int] = {}
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                body = json.loads(self.rfile.read(length) or b"null")
                with server.lock:
                    server.requests.append(Request(self.path, dict(self.headers), body))
                # The client may hang up mid-answer: what the worker is meant to do.
                with contextlib.suppress(OSError):
                    self.answer()

            def answer(self) -> None:
                path = self.path
                if path == "/drip-head":
                    self.drip(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}", path)
                elif path == "/drip-body":
                    self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n")
                    self.drip(b"x" * 1000, path)
                elif path == "/huge":
                    self.wfile.write(
                        f"HTTP/1.1 200 OK\r\nContent-Length: {server.HUGE}\r\n\r\n".encode()
                    )
                    block = b"y" * (1024 * 1024)
                    for _ in range(server.HUGE // len(block)):
                        self.wfile.write(block)
                        server.count(path, len(block))
                elif path == "/redirect":
                    self.send_response(302)
                    self.send_header("Location", server.REDIRECT_TO)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                else:
                    reply = b"secret-body-text " * 40
                    self.send_response(500)
                    self.send_header("Content-Length", str(len(reply)))
                    self.end_headers()
                    self.wfile.write(reply)

            def drip(self, data: bytes, path: str) -> None:
                for i in range(len(data)):
                    self.wfile.write(data[i : i + 1])
                    server.count(path, 1)
                    time.sleep(server.DRIP_EVERY)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="test-hostile")
        self.thread.start()

    def count(self, path: str, n: int) -> None:
        with self.lock:
            self.sent[path] = self.sent.get(path, 0) + n

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_port}{path}"

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_port}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)


@pytest.fixture
def hostile() -> Iterator[HostileServer]:
    server = HostileServer()
    yield server
    server.close()


def idle_in_transaction(conn: psycopg.Connection) -> int:
    row = conn.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
        "AND state = 'idle in transaction' AND pid <> pg_backend_pid()"
    ).fetchone()
    assert row
    return int(row[0])


def settle_time(conn: psycopg.Connection, outbox_id: int) -> float:
    started = time.monotonic()
    assert wait_for(settled(conn, outbox_id), timeout=30)
    return time.monotonic() - started


def test_a_webhook_that_drips_its_body_is_held_no_longer_than_the_deadline(
    hostile: HostileServer,
    start_worker: Callable[..., Started],
    conn: psycopg.Connection,
    event: tuple[int, int],
) -> None:
    """A 200 whose body comes a byte every 0.2 s is delivered once the deadline (1 s) ends it,
    with no transaction open meanwhile, and the next action is not held up behind it."""
    dripping = enqueue(conn, event, "webhook", webhook_target(hostile.url("/drip-body")))
    behind = enqueue(conn, event, "notify", {"channel": "sms", "message": "next"})
    start_worker(webhook_timeout=1.0)
    assert wait_for(lambda: hostile.sent.get("/drip-body", 0) >= 2)
    # The delivery is under way: the claim committed, nothing waits idle in a transaction.
    assert idle_in_transaction(conn) == 0
    assert settle_time(conn, dripping) < 3.0
    assert attempts(conn, dripping) == [
        (True, f"HTTP 200 from {hostile.origin}; rest of the body discarded")
    ]
    assert hostile.sent["/drip-body"] < 20
    assert wait_for(settled(conn, behind))
    assert outbox_row(conn, behind)[0] == "delivered"


def test_a_webhook_that_drips_its_head_fails_at_the_deadline(
    hostile: HostileServer,
    start_worker: Callable[..., Started],
    conn: psycopg.Connection,
    event: tuple[int, int],
) -> None:
    """A status line sent a byte every 0.2 s (each read well within any per-read timeout) is a
    failed attempt when the wall-clock deadline passes, not a minute later."""
    outbox_id = enqueue(conn, event, "webhook", webhook_target(hostile.url("/drip-head")))
    start_worker(webhook_timeout=1.0, outbox_max_attempts=1)
    assert settle_time(conn, outbox_id) < 3.0
    assert outbox_row(conn, outbox_id) == (
        "failed",
        1,
        f"no complete answer from {hostile.origin} within 1 s",
    )


def _clear_peak_rss() -> None:
    # Writing 5 to clear_refs resets the peak resident set size (VmHWM) of this process.
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")


def _peak_rss() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM in /proc/self/status")


def test_a_huge_success_body_is_not_read_into_memory(
    hostile: HostileServer,
    start_worker: Callable[..., Started],
    conn: psycopg.Connection,
    event: tuple[int, int],
) -> None:
    """A 200 with a 200 MB body is delivered after a few KiB are read: the connection is closed,
    the body never sent in full, and the process's peak memory grows by far less than it."""
    start_worker(webhook_timeout=5.0)
    _clear_peak_rss()
    before = _peak_rss()
    outbox_id = enqueue(conn, event, "webhook", webhook_target(hostile.url("/huge")))
    assert wait_for(settled(conn, outbox_id), timeout=30)
    grown = _peak_rss() - before
    assert grown < 50 * 1024 * 1024, f"peak RSS grew by {grown / 2**20:.0f} MiB"
    assert attempts(conn, outbox_id) == [
        (True, f"HTTP 200 from {hostile.origin}; rest of the body discarded")
    ]
    assert hostile.sent.get("/huge", 0) < HostileServer.HUGE


def test_a_failed_webhook_stores_its_status_not_its_body(
    hostile: HostileServer,
    start_worker: Callable[..., Started],
    conn: psycopg.Connection,
    event: tuple[int, int],
) -> None:
    """An error answer is recorded as status and reason; its body is neither stored nor logged."""
    outbox_id = enqueue(conn, event, "webhook", webhook_target(hostile.url("/error")))
    with structlog.testing.capture_logs() as logs:
        start_worker(outbox_max_attempts=1)
        assert wait_for(settled(conn, outbox_id))
    error = f"HTTP 500 Internal Server Error from {hostile.origin}"
    assert outbox_row(conn, outbox_id) == ("failed", 1, error)
    assert attempts(conn, outbox_id) == [(False, error)]
    assert not any("secret-body-text" in json.dumps(e, default=str) for e in logs)


def test_a_redirect_is_not_followed(
    hostile: HostileServer,
    start_worker: Callable[..., Started],
    conn: psycopg.Connection,
    event: tuple[int, int],
) -> None:
    """A 302 to the metadata address is a failed attempt; nothing is sent where it points."""
    outbox_id = enqueue(conn, event, "webhook", webhook_target(hostile.url("/redirect")))
    start_worker(outbox_max_attempts=1)
    assert wait_for(settled(conn, outbox_id))
    assert outbox_row(conn, outbox_id) == (
        "failed",
        1,
        f"HTTP 302 Found from {hostile.origin} (redirects are not followed)",
    )
    assert [r.path for r in hostile.requests] == ["/redirect"]


# --- where webhooks may go


@pytest.mark.parametrize(
    "case",
    [
        ("127.0.0.1", "127.0.0.1 (loopback)"),
        ("localhost", "(loopback)"),
        ("[::ffff:127.0.0.1]", "::ffff:7f00:1 (loopback)"),
    ],
)
def test_a_webhook_to_loopback_is_refused_unless_allowed(
    webhook: Callable[..., WebhookServer],
    start_worker: Callable[..., Started],
    conn: psycopg.Connection,
    event: tuple[int, int],
    case: tuple[str, str],
) -> None:
    """Without an allow-list a loopback receiver gets nothing: the row fails at once, naming the
    address and the setting; with its network allowed the same row is delivered."""
    host, shown = case
    server = webhook()
    url = f"http://{host}:{server.httpd.server_port}/hooks/secret-token"
    refused = enqueue(conn, event, "webhook", webhook_target(url))
    with structlog.testing.capture_logs() as logs:
        first = start_worker(outbox_max_attempts=5, action_allow_networks=[])
        assert wait_for(settled(conn, refused))
    first.worker.stop(10)
    failed = [e for e in logs if e["event"] == "action_failed"]
    assert [e["why"] for e in failed] == ["target refused"]
    status, tries, error = outbox_row(conn, refused)
    assert (status, tries) == ("failed", 1)
    assert error is not None
    assert error.startswith(f"refused http://{host}:{server.httpd.server_port}: ")
    assert shown in error and "action_allow_networks" in error
    assert server.requests == []

    allowed = enqueue(conn, event, "webhook", webhook_target(url))
    start_worker(action_allow_networks=["127.0.0.0/8", "::1/128"])
    assert wait_for(settled(conn, allowed))
    assert outbox_row(conn, allowed)[0] == "delivered"
    assert len(server.requests) == 1


def test_the_metadata_address_is_refused_before_any_connection(
    start_worker: Callable[..., Started], conn: psycopg.Connection, event: tuple[int, int]
) -> None:
    """169.254.169.254 (link-local, the cloud metadata service) is refused as a bad target."""
    outbox_id = enqueue(
        conn, event, "webhook", webhook_target("http://169.254.169.254/latest/meta-data/")
    )
    start_worker(outbox_max_attempts=5)
    assert wait_for(settled(conn, outbox_id))
    status, tries, error = outbox_row(conn, outbox_id)
    assert (status, tries) == ("failed", 1)
    assert error is not None and "169.254.169.254 (link-local)" in error


@pytest.mark.parametrize("name", ["Host", "X-Iothub-Delivery", "Transfer-Encoding"])
def test_an_outbox_row_cannot_override_the_services_headers(
    webhook: Callable[..., WebhookServer],
    start_worker: Callable[..., Started],
    conn: psycopg.Connection,
    event: tuple[int, int],
    name: str,
) -> None:
    """A row whose headers set Host, the delivery id or the framing (written before the rule
    check refused them, or by hand) fails at once and sends nothing."""
    server = webhook()
    target = webhook_target(server.url)
    target["headers"] = {name: "chunked" if name == "Transfer-Encoding" else "evil.example"}
    outbox_id = enqueue(conn, event, "webhook", target)
    start_worker(outbox_max_attempts=5)
    assert wait_for(settled(conn, outbox_id))
    assert outbox_row(conn, outbox_id) == (
        "failed",
        1,
        f"webhook header {name!r} is set by the service and cannot be overridden",
    )
    assert server.requests == []


# --- mqtt targets a device's value chose


def test_a_wildcard_topic_fails_at_once_as_a_bad_target(
    start_worker: Callable[..., Started], conn: psycopg.Connection, event: tuple[int, int]
) -> None:
    """A rendered topic holding a wildcard is refused before paho sees it: one attempt, a
    precise reason, no 'internal error' and no retries."""
    outbox_id = enqueue(
        conn, event, "mqtt", {"topic": "alerts/bad/#/level", "payload": 1, "qos": 1}
    )
    with structlog.testing.capture_logs() as logs:
        start_worker(outbox_max_attempts=5)
        assert wait_for(settled(conn, outbox_id))
    assert outbox_row(conn, outbox_id) == (
        "failed",
        1,
        "mqtt topic must not contain wildcards (+, #) or NUL, got 'alerts/bad/#/level'",
    )
    assert not any(e["event"] == "action_delivery_crashed" for e in logs)


def test_a_value_that_adds_topic_levels_is_never_published(
    start_worker: Callable[..., Started],
    conn: psycopg.Connection,
    event: tuple[int, int],
    broker_url: str,
    unique: str,
) -> None:
    """`alerts/{value}` with the value 'x/y' (no wildcard, a valid topic) is refused as the
    engine wrote it: nothing arrives, and the row fails once naming the placeholder."""
    action = {"type": "mqtt", "topic": f"t{unique}/alerts/{{value}}", "payload": "hot"}
    rule = compile_rule(
        7, "Status", {"type": "string_match", "operator": "!=", "value": "OK"}, action, "str"
    )
    entry = RuleEntry(rule, 3, "fp", "SN-1", "Boiler", "status")
    ts = datetime(2026, 1, 27, 12, 0, tzinfo=UTC)
    ((kind, target),) = outbox_rows(
        entry, 1, "triggered", evaluator.Transition("triggered", ts, "x/y", "changed"), "m"
    )
    subscriber = Subscriber(broker_url, f"sub-{unique}", f"t{unique}/alerts/#")
    try:
        outbox_id = enqueue(conn, event, kind, target)
        start_worker(outbox_max_attempts=5, mqtt_actions_client_id=f"actions-{unique}")
        assert wait_for(settled(conn, outbox_id))
        time.sleep(0.3)  # anything published would have arrived by now
    finally:
        subscriber.close()
    assert subscriber.messages == []
    status, tries, error = outbox_row(conn, outbox_id)
    assert (status, tries) == ("failed", 1)
    assert error == (
        "the value of {value} ('x/y') holds /: a substituted value may not add topic "
        "levels or wildcards"
    )


# --- smtp


def test_no_login_in_clear_to_a_server_without_starttls(
    start_worker: Callable[..., Started], conn: psycopg.Connection, event: tuple[int, int]
) -> None:
    """With credentials on smtp:// and a server that offers AUTH but not STARTTLS, the password
    is never sent: the attempt fails saying why, and the password is in no log line."""
    sink = SmtpSink(extensions=("AUTH PLAIN LOGIN", "8BITMIME"))
    host, port = str(sink.server.server_address[0]), int(sink.server.server_address[1])
    try:
        outbox_id = enqueue(
            conn,
            event,
            "notify",
            {"channel": "email", "message": "hot", "to": "ops@example.com"},
        )
        with structlog.testing.capture_logs() as logs:
            start_worker(smtp_url=f"smtp://hub:s3cr3t-pw@{host}:{port}", outbox_max_attempts=1)
            assert wait_for(settled(conn, outbox_id))
    finally:
        sink.close()
    assert outbox_row(conn, outbox_id) == (
        "failed",
        1,
        f"smtp {host}:{port} does not offer STARTTLS: refusing to send the password in clear "
        "(use smtps:// or a server that offers STARTTLS)",
    )
    assert "AUTH" not in sink.commands
    assert sink.messages == []
    assert not any("s3cr3t-pw" in json.dumps(e, default=str) for e in logs)
    assert any(e["event"] == "smtp_starttls_missing" for e in logs)


def test_an_smtp_server_that_drips_is_cut_off_at_the_deadline() -> None:
    """A greeting sent a byte every 0.2 s holds one email no longer than the mailer's deadline."""
    stop = threading.Event()

    class Drip(socketserver.StreamRequestHandler):
        def handle(self) -> None:
            for byte in b"220 " + b"x" * 1000:
                if stop.is_set():
                    return
                try:
                    self.wfile.write(bytes([byte]))
                except OSError:
                    return
                time.sleep(0.2)

    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Drip)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name="test-smtp-drip")
    thread.start()
    try:
        mailer = Mailer(
            f"smtp://127.0.0.1:{server.server_address[1]}", "hub@example.com", deadline=1.0
        )
        started = time.monotonic()
        with pytest.raises(DeliveryFailed, match="no complete conversation within 1 s"):
            mailer.send(["ops@example.com"], "subject", "body")
        assert time.monotonic() - started < 2.5
    finally:
        stop.set()
        server.shutdown()
        server.server_close()
        thread.join(5)


# --- leases and the worker's heartbeat


def test_a_row_leased_by_a_worker_that_died_is_delivered_once_the_lease_runs_out(
    start_worker: Callable[..., Started], conn: psycopg.Connection, event: tuple[int, int]
) -> None:
    """A row another worker claimed is left alone while its lease lasts, and delivered by this
    one when it has run out (the claimer crashed mid-delivery)."""
    outbox_id = enqueue(conn, event, "notify", {"channel": "sms", "message": "hi"})
    conn.execute(
        "UPDATE action_outbox SET claimed_by = 'gone:1:abc', "
        "lease_until = now() + interval '1.5 seconds' WHERE id = %s",
        (outbox_id,),
    )
    with structlog.testing.capture_logs() as logs:
        start_worker()
        time.sleep(1.0)
        assert outbox_row(conn, outbox_id)[0] == "pending"  # still leased
        assert wait_for(settled(conn, outbox_id), timeout=5)
    # The lost claim may have delivered: it counts as an attempt, recorded with the new one.
    lost = "no outcome recorded by gone:1:abc before its lease ran out"
    assert outbox_row(conn, outbox_id) == ("delivered", 2, lost)
    assert attempts(conn, outbox_id) == [(False, lost), (True, "logged (sms channel)")]
    assert [e["outbox_id"] for e in logs if e["event"] == "action_lease_expired"] == [outbox_id]
    lease = conn.execute(
        "SELECT lease_until, claimed_by FROM action_outbox WHERE id = %s", (outbox_id,)
    ).fetchone()
    assert lease == (None, None)


def test_a_row_whose_claims_keep_getting_lost_is_failed_not_delivered_for_ever(
    start_worker: Callable[..., Started], conn: psycopg.Connection, event: tuple[int, int]
) -> None:
    """A row that brought down the worker holding it (claimed, then nothing recorded) as often
    as outbox_max_attempts allows is failed, not delivered yet again."""
    outbox_id = enqueue(conn, event, "notify", {"channel": "sms", "message": "hi"})
    conn.execute(
        "UPDATE action_outbox SET claimed_by = 'gone:2:def', attempts = 2, "
        "lease_until = now() - interval '1 second' WHERE id = %s",
        (outbox_id,),
    )
    with structlog.testing.capture_logs() as logs:
        started = start_worker(outbox_max_attempts=3)
        assert wait_for(settled(conn, outbox_id))
    lost = "no outcome recorded by gone:2:def before its lease ran out"
    assert outbox_row(conn, outbox_id) == ("failed", 3, lost)
    assert attempts(conn, outbox_id) == [(False, lost)]
    assert not any(e["event"] == "notification" for e in logs)
    failed = [e for e in logs if e["event"] == "action_failed"]
    assert [(e["why"], e["attempts"]) for e in failed] == [("max attempts reached", 3)]
    m = started.metrics
    assert sample(m, "iothub_actions_delivered_total", kind="notify", outcome="failed") == 1


def test_an_outcome_is_recorded_only_by_the_claim_that_holds_the_row(
    conn: psycopg.Connection, event: tuple[int, int]
) -> None:
    """A worker whose lease was taken over records nothing, and a repeated recording is a no-op:
    one outcome and one attempt row per claim."""
    outbox_id = enqueue(conn, event, "notify", {"channel": "sms", "message": "hi"})
    claimed = conn.execute(
        outbox.queries["claim_due"], {"limit": 10, "lease": 60.0, "token": "new:1:b"}
    ).fetchall()
    assert [row[0] for row in claimed] == [outbox_id]
    now = datetime.now(UTC)
    params = {
        "outbox_id": outbox_id,
        "attempted_at": now,
        "finished_at": now,
        "detail": "late",
        "delay": 1.0,
    }
    for query in ("record_delivered", "record_retry", "record_failed"):
        stale = conn.execute(outbox.queries[query], {**params, "token": "old:1:a"}).fetchone()
        assert stale is None
    assert outbox_row(conn, outbox_id) == ("pending", 0, None)
    assert attempts(conn, outbox_id) == []
    held = {**params, "token": "new:1:b", "detail": "delivered"}
    assert conn.execute(outbox.queries["record_delivered"], held).fetchone() == (outbox_id,)
    assert conn.execute(outbox.queries["record_delivered"], held).fetchone() is None
    assert outbox_row(conn, outbox_id) == ("delivered", 1, None)
    assert attempts(conn, outbox_id) == [(True, "delivered")]


def test_a_worker_held_up_past_its_deadline_reports_itself_stuck(
    start_worker: Callable[..., Started],
    conn: psycopg.Connection,
    db_url: str,
    event: tuple[int, int],
) -> None:
    """While a lock on the outbox holds the worker's claim beyond outbox_stuck_after, health()
    says so (log line, gauge); once the lock goes, it delivers and reports itself well again."""
    outbox_id = enqueue(conn, event, "notify", {"channel": "sms", "message": "hi"})
    with structlog.testing.capture_logs() as logs:
        with psycopg.connect(db_url) as locker:
            locker.execute("LOCK TABLE action_outbox IN ACCESS EXCLUSIVE MODE")
            started = start_worker(outbox_stuck_after=0.3)
            worker, metrics = started.worker, started.metrics
            assert worker.health() == {"outbox": True}
            assert wait_for(lambda: worker.health() == {"outbox": False}, timeout=5)
            assert sample(metrics, "iothub_outbox_worker_stuck") == 1
            assert worker.alive
            locker.rollback()
        assert wait_for(settled(conn, outbox_id))
        assert wait_for(lambda: worker.health() == {"outbox": True})
    stuck = [e for e in logs if e["event"] == "outbox_worker_stuck"]
    assert len(stuck) == 1
    assert stuck[0]["log_level"] == "error" and stuck[0]["step"] == "claim"
    assert any(e["event"] == "outbox_worker_unstuck" for e in logs)
    assert sample(metrics, "iothub_outbox_worker_stuck") == 0


def test_the_daemons_healthz_says_when_the_outbox_worker_is_stuck(
    make_settings: Callable[..., Settings], conn: psycopg.Connection, db_url: str
) -> None:
    """In a running service, a stuck outbox worker turns /healthz into 503 naming `outbox`, and
    /metrics shows it; when it moves again, /healthz is 200."""
    settings = make_settings(outbox_stuck_after=0.3, outbox_poll_interval=0.05)
    metrics = ServiceMetrics()
    pool = db.make_pool(settings, "outbox-test", size=2)
    pool.open(wait=True)
    worker = OutboxWorker(settings, pool, metrics.rules)
    service = IngestService(settings, workers=[worker], metrics=metrics)
    try:
        with running(service):
            healthz = f"{service.http.url}/healthz"
            assert httpx.get(healthz, timeout=5).status_code == 200
            with psycopg.connect(db_url) as locker:
                locker.execute("LOCK TABLE action_outbox IN ACCESS EXCLUSIVE MODE")
                assert wait_for(lambda: httpx.get(healthz, timeout=5).status_code == 503)
                answer = httpx.get(healthz, timeout=5).json()
                assert answer["down"] == ["outbox"]
                text = httpx.get(f"{service.http.url}/metrics", timeout=5).text
                assert "iothub_outbox_worker_stuck 1.0" in text
                locker.rollback()
            assert wait_for(lambda: httpx.get(healthz, timeout=5).status_code == 200)
    finally:
        pool.close()


# --- name resolution (no DNS server can run here: getaddrinfo answers as a resolver would)


def _resolving(answers: list[list[str]], port: int) -> Callable[..., list[tuple[Any, ...]]]:
    """A getaddrinfo that gives `answers` for a name in turn, as a rebinding DNS server would;
    an address literal resolves to itself, as with the real one (no DNS is asked)."""
    calls = iter(answers)

    def getaddrinfo(host: str, *args: Any, **kwargs: Any) -> list[tuple[Any, ...]]:
        try:
            found = [str(ipaddress.ip_address(host))]
        except ValueError:
            found = next(calls)
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, port)) for address in found]

    return getaddrinfo


def test_a_name_with_one_private_address_among_public_ones_is_refused(
    webhook: Callable[..., WebhookServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every resolved address is checked: a public one first does not let a private one pass."""
    server = webhook()
    port = server.httpd.server_port
    monkeypatch.setattr(socket, "getaddrinfo", _resolving([["8.8.8.8", "127.0.0.1"]], port))
    sender = WebhookSender(2.0, egress.AddressPolicy())
    try:
        with pytest.raises(RefusedTarget, match=r"127\.0\.0\.1 \(loopback\)"):
            sender.send(1, WebhookTarget(url=f"http://hooks.example:{port}/x", body={}))
    finally:
        sender.close()
    assert server.requests == []


def test_the_connection_goes_to_the_address_that_was_checked(
    webhook: Callable[..., WebhookServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A name is resolved once per connection and the checked address is the one connected to:
    a second answer pointing elsewhere (DNS rebinding) is never asked for."""
    server = webhook()
    port = server.httpd.server_port
    monkeypatch.setattr(
        socket, "getaddrinfo", _resolving([["127.0.0.1"], ["10.9.9.9"], ["10.9.9.9"]], port)
    )
    policy = egress.AddressPolicy(egress.parse_networks(["127.0.0.1/32"]))
    sender = WebhookSender(2.0, policy)
    try:
        detail = sender.send(1, WebhookTarget(url=f"http://hooks.example:{port}/x", body={}))
    finally:
        sender.close()
    assert detail == f"HTTP 200 from http://hooks.example:{port}"
    assert len(server.requests) == 1
    assert server.requests[0].headers["Host"] == f"hooks.example:{port}"


def test_a_resolver_that_hangs_costs_no_more_than_the_deadline(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """getaddrinfo has no timeout of its own: a name whose resolution hangs fails the delivery
    at the deadline."""

    def hanging(*args: Any, **kwargs: Any) -> list[tuple[Any, ...]]:
        time.sleep(3)
        return []

    monkeypatch.setattr(socket, "getaddrinfo", hanging)
    sender = WebhookSender(0.5, egress.AddressPolicy())
    try:
        started = time.monotonic()
        with pytest.raises(DeliveryFailed, match=r"no complete answer from http://slow\.example"):
            sender.send(1, WebhookTarget(url="http://slow.example/x", body={}))
        assert time.monotonic() - started < 1.5
    finally:
        sender.close()


def test_an_https_receiver_that_never_finishes_the_handshake_fails_at_the_deadline(
    start_worker: Callable[..., Started], conn: psycopg.Connection, event: tuple[int, int]
) -> None:
    """The TLS handshake is held to the same deadline: a server that accepts and then says
    nothing costs one delivery its deadline, and the attempt says so."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        port = silent.getsockname()[1]
        outbox_id = enqueue(conn, event, "webhook", webhook_target(f"https://127.0.0.1:{port}/x"))
        start_worker(webhook_timeout=1.0, outbox_max_attempts=1)
        assert settle_time(conn, outbox_id) < 3.0
    assert outbox_row(conn, outbox_id) == (
        "failed",
        1,
        f"no complete answer from https://127.0.0.1:{port} within 1 s",
    )


@pytest.mark.parametrize(
    ("url", "headers"),
    [
        ("http://hub:s3cret@{host}:{port}/x", {}),  # user-info becomes Basic auth
        ("http://{host}:{port}/x", {"Authorization": "Bearer t0ken"}),
        ("http://{host}:{port}/x", {"Cookie": "session=s3cret"}),
    ],
)
def test_credentials_never_go_over_plain_http_to_the_internet(
    webhook: Callable[..., WebhookServer],
    monkeypatch: pytest.MonkeyPatch,
    url: str,
    headers: dict[str, str],
) -> None:
    """Credentials over http:// would travel in clear: refused at once, before any connection,
    unless every address of the host lies in action_allow_networks (the receivers of the other
    tests, on 127.0.0.1, do)."""
    server = webhook()
    port = server.httpd.server_port
    # hooks.example resolves to a public address: allowed without credentials, never with.
    monkeypatch.setattr(socket, "getaddrinfo", _resolving([["93.184.216.34"]], port))
    sender = WebhookSender(2.0, egress.AddressPolicy(egress.parse_networks(["127.0.0.1/32"])))
    try:
        public = WebhookTarget(
            url=url.format(host="hooks.example", port=port), body={}, headers=headers
        )
        with pytest.raises(RefusedTarget, match="would travel in clear"):
            sender.send(1, public)
        assert server.requests == []
        opened = WebhookTarget(
            url=url.format(host="127.0.0.1", port=port), body={}, headers=headers
        )
        sender.send(2, opened)
    finally:
        sender.close()
    assert len(server.requests) == 1
