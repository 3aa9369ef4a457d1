"""SystemdNotifier against real unix datagram sockets, as systemd provides them."""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from iothub.daemon.systemd import SystemdNotifier

RECV_TIMEOUT = 2.0  # seconds; datagrams on a local socket arrive at once


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[tuple[str, socket.socket]]:
    """A datagram socket bound in tmp, standing in for systemd's notify socket."""
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(RECV_TIMEOUT)
        yield str(path), sock


def _received(sock: socket.socket, count: int) -> list[bytes]:
    return [sock.recv(4096) for _ in range(count)]


def test_sends_each_state_as_one_datagram(notify_socket: tuple[str, socket.socket]) -> None:
    """ready, status, watchdog and stopping each send exactly the sd_notify assignment."""
    address, sock = notify_socket
    notifier = SystemdNotifier.from_environ({"NOTIFY_SOCKET": address})

    assert notifier.enabled
    assert notifier.ready()
    assert notifier.status("ingesting 1200 msg/s")
    assert notifier.watchdog()
    assert notifier.stopping()

    assert _received(sock, 4) == [
        b"READY=1",
        b"STATUS=ingesting 1200 msg/s",
        b"WATCHDOG=1",
        b"STOPPING=1",
    ]


def test_status_newlines_do_not_start_new_assignments(
    notify_socket: tuple[str, socket.socket],
) -> None:
    """A multi-line status is flattened, so it cannot smuggle in e.g. a READY=1 line."""
    address, sock = notify_socket
    SystemdNotifier(address).status("db down\nREADY=1")

    assert _received(sock, 1) == [b"STATUS=db down READY=1"]


def test_abstract_socket_address() -> None:
    """An '@' address is the Linux abstract namespace (leading NUL), as systemd writes it."""
    name = f"iothub-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(b"\0" + name.encode())
        sock.settimeout(RECV_TIMEOUT)
        notifier = SystemdNotifier.from_environ({"NOTIFY_SOCKET": "@" + name})

        assert notifier.ready()
        assert notifier.watchdog()

        assert _received(sock, 2) == [b"READY=1", b"WATCHDOG=1"]


def test_socket_is_read_once_at_construction(
    notify_socket: tuple[str, socket.socket], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Clearing NOTIFY_SOCKET after construction does not silence an existing notifier."""
    address, sock = notify_socket
    monkeypatch.setenv("NOTIFY_SOCKET", address)
    notifier = SystemdNotifier.from_environ()
    monkeypatch.delenv("NOTIFY_SOCKET")

    assert notifier.ready()
    assert _received(sock, 1) == [b"READY=1"]


def test_no_socket_is_a_no_op() -> None:
    """Outside systemd every call returns False and does nothing."""
    notifier = SystemdNotifier.from_environ({})

    assert not notifier.enabled
    assert not notifier.ready()
    assert not notifier.status("x")
    assert not notifier.watchdog()
    assert not notifier.stopping()
    assert notifier.watchdog_interval() is None


def test_unsupported_socket_form_is_a_no_op() -> None:
    """A NOTIFY_SOCKET that is neither a path nor '@name' disables notification with a log."""
    with capture_logs() as logs:
        notifier = SystemdNotifier("vsock:2:1234")

    assert not notifier.enabled
    assert not notifier.ready()
    assert [entry["event"] for entry in logs] == ["sd_notify_unsupported_socket"]


def test_send_failure_never_raises_and_logs_once(tmp_path: Path) -> None:
    """A notify socket that vanished makes sends return False, logged once, never an exception."""
    notifier = SystemdNotifier(str(tmp_path / "nobody-listens-here"))

    with capture_logs() as logs:
        assert not notifier.ready()
        assert not notifier.watchdog()
        assert not notifier.stopping()

    failures = [entry for entry in logs if entry["event"] == "sd_notify_failed"]
    assert len(failures) == 1
    assert failures[0]["message"] == "READY=1"
    assert failures[0]["log_level"] == "warning"


def test_watchdog_interval_is_half_of_watchdog_usec() -> None:
    """WatchdogSec=30 (WATCHDOG_USEC=30000000) means a ping every 15 seconds."""
    env = {"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}

    assert SystemdNotifier.from_environ(env).watchdog_interval() == 15.0
    assert SystemdNotifier.from_environ({"WATCHDOG_USEC": "30000000"}).watchdog_interval() == 15.0


def test_watchdog_of_another_process_is_not_ours() -> None:
    """A WATCHDOG_PID naming another process (inherited environment) disables the watchdog."""
    env = {"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid() + 1)}

    assert SystemdNotifier.from_environ(env).watchdog_interval() is None


@pytest.mark.parametrize("value", ["", "0", "-5", "soon"])
def test_unusable_watchdog_usec_means_no_watchdog(value: str) -> None:
    """An empty, zero, negative or non-numeric WATCHDOG_USEC is treated as no watchdog."""
    assert SystemdNotifier.from_environ({"WATCHDOG_USEC": value}).watchdog_interval() is None
