"""The outbox worker against real receivers: an HTTP server, Mosquitto, an SMTP sink."""

from __future__ import annotations

import email
import json
import socket
import socketserver
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import paho.mqtt.client as mqtt
import psycopg
import pytest
import structlog
from psycopg.types.json import Jsonb

from config.settings import Settings
from iothub import db, mqttclient
from iothub.metrics import Metrics
from rules_engine.outbox import OutboxWorker, retry_delay
from tests.support.fleet import make_fleet, wait_for

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
    """A minimal SMTP server on a free port that keeps every message it accepts."""

    def __init__(self) -> None:
        self.messages: list[tuple[list[str], Message]] = []
        sink = self

        class Handler(socketserver.StreamRequestHandler):
            def reply(self, line: str) -> None:
                self.wfile.write(line.encode() + b"\r\n")

            def handle(self) -> None:
                self.reply("220 sink ready")
                recipients: list[str] = []
                while line := self.rfile.readline():
                    verb = line[:4].decode().upper()
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
    metrics: Metrics


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
        metrics = Metrics()
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


def sample(metrics: Metrics, name: str, **labels: str) -> float:
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
