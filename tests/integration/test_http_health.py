"""HealthServer over real HTTP: /healthz follows readiness, /metrics is scrapeable."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from structlog.testing import capture_logs

from iothub.daemon.http import HealthServer
from iothub.daemon.observe import ServiceMetrics

TIMEOUT = 5.0  # seconds per request


class Readiness:
    """A readiness callable whose answers the test flips."""

    def __init__(self) -> None:
        self.state = {"mqtt": True, "database": True}
        self.error: Exception | None = None

    def __call__(self) -> dict[str, bool]:
        if self.error is not None:
            raise self.error
        return dict(self.state)


@pytest.fixture
def readiness() -> Readiness:
    return Readiness()


@pytest.fixture
def metrics() -> ServiceMetrics:
    return ServiceMetrics()


@pytest.fixture
def server(readiness: Readiness, metrics: ServiceMetrics) -> Iterator[HealthServer]:
    with HealthServer("127.0.0.1", 0, readiness=readiness, metrics=metrics) as running:
        yield running


def _get(server: HealthServer, path: str) -> httpx.Response:
    return httpx.get(f"{server.url}{path}", timeout=TIMEOUT)


def _sample(text: str, name: str, labels: dict[str, str] | None = None) -> float:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == (labels or {}):
                return float(sample.value)
    raise AssertionError(f"no sample {name}{labels or ''} in the exposition")


def test_port_zero_binds_a_real_port(server: HealthServer) -> None:
    """Asking for port 0 gives the kernel's choice, reported by .port."""
    assert server.port > 0


def test_healthz_is_200_when_everything_is_up(server: HealthServer) -> None:
    """All readiness checks true: 200 with status ok and each check named."""
    response = _get(server, "/healthz")

    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    assert response.json() == {"status": "ok", "checks": {"mqtt": True, "database": True}}


def test_healthz_is_503_naming_what_is_down(server: HealthServer, readiness: Readiness) -> None:
    """A false check turns /healthz into 503 naming it, and back to 200 when it recovers."""
    readiness.state["database"] = False

    down = _get(server, "/healthz")
    assert down.status_code == 503
    assert down.json() == {
        "status": "unavailable",
        "checks": {"mqtt": True, "database": False},
        "down": ["database"],
    }

    readiness.state["database"] = True
    assert _get(server, "/healthz").status_code == 200


def test_healthz_names_the_role_and_a_healthy_standby_is_200(
    readiness: Readiness, metrics: ServiceMetrics
) -> None:
    """With a role: a standby whose database check holds answers 200 with status standby (an
    orchestrator must not restart it), 503 when it does not; the active's body names its role;
    an active whose lock is unconfirmed or lost is 503 with the election down."""
    role = ["standby"]
    readiness.state = {"database": True}
    with HealthServer(
        "127.0.0.1", 0, readiness=readiness, metrics=metrics, role=lambda: role[0]
    ) as server:
        standby = _get(server, "/healthz")
        assert (standby.status_code, standby.json()) == (
            200,
            {"status": "standby", "role": "standby", "checks": {"database": True}},
        )
        readiness.state = {"database": False}
        lost = _get(server, "/healthz")
        assert (lost.status_code, lost.json()["role"], lost.json()["down"]) == (
            503,
            "standby",
            ["database"],
        )
        role[0] = "active"
        readiness.state = {"mqtt": True, "database": True}
        active = _get(server, "/healthz")
        assert (active.status_code, active.json()["status"], active.json()["role"]) == (
            200,
            "ok",
            "active",
        )
        role[0] = "unconfirmed"
        unconfirmed = _get(server, "/healthz")
        assert (unconfirmed.status_code, unconfirmed.json()["role"]) == (503, "unconfirmed")
        assert unconfirmed.json()["down"] == ["election"]
        role[0] = "fenced"
        fenced = _get(server, "/healthz")
        assert (fenced.status_code, fenced.json()["down"]) == (503, ["election"])


def test_healthz_is_503_when_the_check_itself_fails(
    server: HealthServer, readiness: Readiness
) -> None:
    """A readiness callable that raises reads as unavailable, not as a broken endpoint."""
    readiness.error = RuntimeError("pool closed")

    response = _get(server, "/healthz")

    assert response.status_code == 503
    assert response.json()["status"] == "unavailable"
    assert "pool closed" in response.json()["error"]


def test_metrics_serves_the_registry_in_prometheus_text_format(
    server: HealthServer, metrics: ServiceMetrics
) -> None:
    """/metrics parses as Prometheus text and shows counters as they are incremented."""
    before = _get(server, "/metrics")
    assert before.status_code == 200
    assert before.headers["content-type"].startswith("text/plain; version=0.0.4")
    assert _sample(before.text, "iothub_messages_received_total") == 0
    # Known reason codes exist at 0 before the first rejection.
    assert _sample(before.text, "iothub_readings_rejected_total", {"reason": "bad_json"}) == 0

    metrics.ingest.messages_received.inc(3)
    metrics.ingest.rejected.labels(reason="bad_json").inc()
    metrics.ingest.batch_seconds.observe(0.004)
    metrics.ingest.mqtt_connected.set(1)

    text = _get(server, "/metrics").text
    assert _sample(text, "iothub_messages_received_total") == 3
    assert _sample(text, "iothub_readings_rejected_total", {"reason": "bad_json"}) == 1
    assert _sample(text, "iothub_batch_seconds_count") == 1
    assert _sample(text, "iothub_batch_seconds_bucket", {"le": "0.005"}) == 1
    assert _sample(text, "iothub_batch_seconds_bucket", {"le": "0.0025"}) == 0
    assert _sample(text, "iothub_mqtt_connected") == 1


def test_unknown_path_is_404(server: HealthServer) -> None:
    """Anything but /healthz and /metrics is 404."""
    assert _get(server, "/admin").status_code == 404


def test_requests_are_logged_through_structlog_not_stderr(
    server: HealthServer, capfd: pytest.CaptureFixture[str]
) -> None:
    """Each request is a debug `http_request` event; nothing is written to stderr."""
    with capture_logs() as logs:
        _get(server, "/healthz?verbose=1")

    requests = [entry for entry in logs if entry["event"] == "http_request"]
    assert requests == [
        {
            "event": "http_request",
            "log_level": "debug",
            "method": "GET",
            "path": "/healthz?verbose=1",
            "status": 200,
            "client": "127.0.0.1",
        }
    ]
    assert capfd.readouterr().err == ""


def test_two_instances_in_one_process_do_not_clash(readiness: Readiness) -> None:
    """Each ServiceMetrics has its own registry, so two services count independently."""
    first, second = ServiceMetrics(), ServiceMetrics()
    with (
        HealthServer("127.0.0.1", 0, readiness=readiness, metrics=first) as a,
        HealthServer("127.0.0.1", 0, readiness=readiness, metrics=second) as b,
    ):
        first.ingest.messages_received.inc(5)

        assert _sample(_get(a, "/metrics").text, "iothub_messages_received_total") == 5
        assert _sample(_get(b, "/metrics").text, "iothub_messages_received_total") == 0


def test_stop_releases_the_port(readiness: Readiness, metrics: ServiceMetrics) -> None:
    """After stop() nothing listens on the port any more, and a second stop() is harmless."""
    server = HealthServer("127.0.0.1", 0, readiness=readiness, metrics=metrics)
    server.start()
    port = server.port
    assert _get(server, "/healthz").status_code == 200

    server.stop()
    server.stop()

    with pytest.raises(ConnectionRefusedError), socket.create_connection(("127.0.0.1", port), 1):
        pass


def test_server_thread_is_named_and_daemonic(server: HealthServer) -> None:
    """The serving thread has a name (for thread dumps) and never blocks interpreter exit."""
    threads = [t for t in threading.enumerate() if t.name == "iothub-http"]
    assert threads
    assert all(t.daemon for t in threads)
