"""The operations endpoint of `iothub run`: GET /healthz and GET /metrics.

A stdlib threaded HTTP server in a named daemon thread: it must answer while the ingestion
threads are busy, and a hung scrape must never keep the process from exiting.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Mapping
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import structlog

from iothub.daemon.observe import CONTENT_TYPE, ServiceMetrics

log = structlog.get_logger(__name__)

Readiness = Callable[[], Mapping[str, bool]]
"""Returns each dependency's state, e.g. {"mqtt": True, "database": False}."""
RoleOf = Callable[[], str]
"""Returns the instance's role in its active/standby pair: active, standby or fenced."""

THREAD_NAME = "iothub-http"
REQUEST_TIMEOUT = 10.0  # seconds a client may take to send its request before we hang up
POLL_INTERVAL = 0.2  # seconds: how quickly serve_forever notices stop()
STOP_TIMEOUT = 5.0  # seconds to wait for the server thread on stop()
JSON_TYPE = "application/json"


class HealthServer:
    """Serves /healthz (200 when every readiness check is true, else 503) and /metrics.

    With `role`, the body names it; a standby whose checks pass answers 200 with status
    "standby": it is healthy, and an orchestrator must not restart it for not ingesting.
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        readiness: Readiness,
        metrics: ServiceMetrics,
        role: RoleOf | None = None,
    ) -> None:
        self._host = host
        self._requested_port = port
        self._readiness = readiness
        self._role = role
        self._metrics = metrics
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def started(self) -> bool:
        return self._server is not None

    @property
    def port(self) -> int:
        """The port actually bound (the kernel's choice when 0 was asked for)."""
        if self._server is None:
            return self._requested_port
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        """Base URL of the server, for logs and tests."""
        host = "127.0.0.1" if self._host in ("", "0.0.0.0") else self._host  # noqa: S104
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}"

    def start(self) -> None:
        """Bind and serve in the background; OSError (port in use) propagates to the caller."""
        if self._server is not None:
            raise RuntimeError("HealthServer already started")
        server = _Server((self._host, self._requested_port), _Handler)
        server.readiness = self._readiness
        server.role = self._role
        server.metrics = self._metrics
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": POLL_INTERVAL},
            name=THREAD_NAME,
            daemon=True,
        )
        self._thread.start()
        log.info("http_server_started", host=self._host, port=self.port)

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """Stop serving and release the port; safe to call twice or before start()."""
        server, thread = self._server, self._thread
        if server is None or thread is None:
            return
        # shutdown() waits for serve_forever to return, which only happens if it is running.
        if thread.is_alive():
            server.shutdown()
        server.server_close()
        thread.join(timeout)
        if thread.is_alive():
            log.warning("http_server_stop_timeout", timeout=timeout)
        self._server = None
        self._thread = None
        log.info("http_server_stopped")

    def __enter__(self) -> HealthServer:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    # Without this a restart within TIME_WAIT of the old socket fails with "address in use".
    allow_reuse_address = True
    readiness: Readiness
    role: RoleOf | None
    metrics: ServiceMetrics


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    timeout = REQUEST_TIMEOUT
    server_version = "iothub"
    sys_version = ""

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/healthz":
            self._healthz()
        elif path == "/metrics":
            self._send(HTTPStatus.OK, CONTENT_TYPE, self.server.metrics.render())
        else:
            self._send_json(HTTPStatus.NOT_FOUND, {"status": "not_found", "path": path})

    def _healthz(self) -> None:
        try:
            checks = {name: bool(up) for name, up in self.server.readiness().items()}
            role = self.server.role() if self.server.role is not None else None
        except Exception as exc:
            # A broken check must read as "not ready", never as a crashed endpoint.
            log.warning("readiness_check_failed", error=repr(exc))
            self._send_json(
                HTTPStatus.SERVICE_UNAVAILABLE,
                {"status": "unavailable", "checks": {}, "down": [], "error": repr(exc)},
            )
            return
        down = sorted(name for name, up in checks.items() if not up)
        if role in ("fenced", "unconfirmed"):
            # It lost the election lock and is stopping, or cannot prove it holds the lock (no
            # acknowledgements then): never healthy, whatever else holds.
            down.append("election")
        extra = {} if role is None else {"role": role}
        if down:
            body = {"status": "unavailable", "checks": checks, "down": down, **extra}
            self._send_json(HTTPStatus.SERVICE_UNAVAILABLE, body)
        else:
            status = "standby" if role == "standby" else "ok"
            self._send_json(HTTPStatus.OK, {"status": status, "checks": checks, **extra})

    def _send_json(self, status: HTTPStatus, body: Mapping[str, Any]) -> None:
        self._send(status, JSON_TYPE, json.dumps(body, sort_keys=True).encode("utf-8"))

    def _send(self, status: HTTPStatus, content_type: str, payload: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(payload)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(payload)

    # The base class writes every request to stderr; route it through structlog instead.
    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:  # noqa: ARG002, RUF100 (the base class's signature)
        status = code.value if isinstance(code, HTTPStatus) else code
        log.debug(
            "http_request",
            method=self.command,
            path=self.path,
            status=status,
            client=self.client_address[0],
        )

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("http_server_message", message=format % args, client=self.client_address[0])
