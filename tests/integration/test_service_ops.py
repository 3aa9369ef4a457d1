"""The running daemon as operators and systemd see it: /healthz, /metrics, sd_notify."""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from config.settings import Settings
from iothub.daemon.service import IngestService
from iothub.daemon.systemd import SystemdNotifier
from tests.support.daemon import running
from tests.support.fleet import Publisher, make_fleet, wait_for
from tests.support.services import LocalMosquitto


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[tuple[str, socket.socket]]:
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(0.2)
    try:
        yield path, sock
    finally:
        sock.close()


def _collect(messages: list[str], sock: socket.socket) -> bool:
    """Appends what arrived on the socket; False, so it can lead an `or` in a wait condition."""
    messages.extend(received(sock))
    return False


def received(sock: socket.socket) -> list[str]:
    out = []
    while True:
        try:
            out.append(sock.recv(4096).decode())
        except TimeoutError:
            return out


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:  # noqa: S310 - our own local server
            return int(resp.status), bytes(resp.read())
    except urllib.error.HTTPError as exc:
        return int(exc.code), bytes(exc.read())


def test_ready_status_and_watchdog_reach_systemd(
    make_settings: Callable[..., Settings], notify_socket: tuple[str, socket.socket]
) -> None:
    """The daemon sends READY=1 once it serves, STATUS lines with its rates, WATCHDOG=1 while
    healthy, and STOPPING=1 when asked to stop."""
    path, sock = notify_socket
    notifier = SystemdNotifier(path, watchdog_usec=400_000, watchdog_pid=None)
    service = IngestService(make_settings(stats_interval=0.3), notifier=notifier)
    messages: list[str] = []
    with running(service):
        assert wait_for(
            lambda: _collect(messages, sock) or any(m.startswith("WATCHDOG=1") for m in messages),
            timeout=10,
        )
        assert wait_for(
            lambda: _collect(messages, sock) or any(m.startswith("STATUS=") for m in messages),
            timeout=10,
        )
    messages.extend(received(sock))
    assert messages.index("READY=1") < messages.index("WATCHDOG=1")
    assert any("msg/s" in m for m in messages if m.startswith("STATUS="))
    assert "STOPPING=1" in messages


def test_healthz_follows_the_broker_and_metrics_count_readings(
    make_settings: Callable[..., Settings],
    local_mosquitto: LocalMosquitto,
    db_url: str,
    unique: str,
) -> None:
    """/healthz is 200 while broker and database are connected and 503 naming the broker when
    it is gone; /metrics counts stored readings in Prometheus format."""
    fleet = make_fleet(db_url, f"SN-{unique}", 1)
    serial = fleet.serials[0]
    service = IngestService(make_settings(mqtt_url=local_mosquitto.url))
    with running(service):
        base = f"http://127.0.0.1:{service.http.port}"
        assert wait_for(lambda: get(base + "/healthz")[0] == 200)
        pub = Publisher(local_mosquitto.url, f"pub-{unique}")
        try:
            pub.publish(
                f"t{unique}/devices/{serial}/telemetry",
                {"ts": datetime.now(UTC).isoformat(), "metrics": {"temperature": 20.5}},
            )
        finally:
            pub.close()
        assert wait_for(lambda: service.totals["rows"] >= 1)
        status, body = get(base + "/metrics")
        assert status == 200
        families = {f.name: f for f in text_string_to_metric_families(body.decode())}
        stored = [
            s.value
            for s in families["iothub_readings_stored"].samples
            if s.name == "iothub_readings_stored_total"
        ]
        assert stored == [1.0]

        local_mosquitto.stop()
        assert wait_for(lambda: get(base + "/healthz")[0] == 503, timeout=15)
        status, body = get(base + "/healthz")
        assert json.loads(body)["checks"]["mqtt"] is False
        local_mosquitto.start()
        assert wait_for(lambda: get(base + "/healthz")[0] == 200, timeout=30)


def test_pending_and_connection_counters_are_exported(
    make_settings: Callable[..., Settings],
) -> None:
    """The intake's pending count, lost sessions and skipped acks are Prometheus gauges."""
    service = IngestService(make_settings())
    with running(service):
        base = f"http://127.0.0.1:{service.http.port}"
        assert wait_for(lambda: b"iothub_pending_messages" in get(base + "/metrics")[1])
        status, body = get(base + "/metrics")
        assert status == 200
    families = {f.name: f for f in text_string_to_metric_families(body.decode())}
    for name in ("iothub_pending_messages", "iothub_mqtt_sessions_lost", "iothub_stale_acks"):
        assert [s.value for s in families[name].samples] == [0.0]
