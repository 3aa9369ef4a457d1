"""Tell systemd about the service's state (sd_notify protocol), without a dependency.

systemd passes a unix datagram socket in NOTIFY_SOCKET to a `Type=notify` service; the service
sends newline-separated `KEY=value` assignments to it: `READY=1` once it really serves, `STATUS=`
for `systemctl status`, `WATCHDOG=1` at least every `WatchdogSec`, `STOPPING=1` on shutdown.
When the service does not run under systemd (no NOTIFY_SOCKET), every call is a no-op.
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Mapping

import structlog

log = structlog.get_logger(__name__)

MICROSECONDS = 1_000_000
# systemd's own advice (sd_watchdog_enabled(3)): ping at half the interval, so one late ping
# caused by a busy moment does not get the service killed.
WATCHDOG_FRACTION = 0.5


class SystemdNotifier:
    """Sends sd_notify messages to the socket systemd named at construction time.

    The address is read once: a notifier built from the environment keeps working even if
    something later clears NOTIFY_SOCKET. Sending never raises; the first failure is logged as
    `sd_notify_failed` and later ones are silent, because a broken notify socket must not take
    the service down (systemd will act on the missing READY or WATCHDOG itself).
    """

    def __init__(
        self,
        notify_socket: str | None,
        *,
        watchdog_usec: int | None = None,
        watchdog_pid: int | None = None,
    ) -> None:
        self._address = _socket_address(notify_socket)
        self._watchdog_usec = watchdog_usec if watchdog_usec and watchdog_usec > 0 else None
        self._watchdog_pid = watchdog_pid
        self._failure_logged = False
        self._lock = threading.Lock()

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> SystemdNotifier:
        """A notifier from NOTIFY_SOCKET, WATCHDOG_USEC, WATCHDOG_PID of `environ` or os.environ."""
        env = os.environ if environ is None else environ
        return cls(
            env.get("NOTIFY_SOCKET") or None,
            watchdog_usec=_int_or_none(env.get("WATCHDOG_USEC")),
            watchdog_pid=_int_or_none(env.get("WATCHDOG_PID")),
        )

    @property
    def enabled(self) -> bool:
        """Whether there is a socket to notify (the process runs under systemd)."""
        return self._address is not None

    def ready(self) -> bool:
        """Startup is complete: systemd now considers the unit started."""
        return self.notify("READY=1")

    def status(self, text: str) -> bool:
        """A one-line status shown by `systemctl status`."""
        # A newline would end the assignment and start a new (bogus) one.
        return self.notify("STATUS=" + " ".join(text.splitlines()))

    def watchdog(self) -> bool:
        """Keep-alive ping; without one within WatchdogSec systemd kills and restarts us."""
        return self.notify("WATCHDOG=1")

    def stopping(self) -> bool:
        """Shutdown has begun, so systemd does not mistake the drain for a hang."""
        return self.notify("STOPPING=1")

    def watchdog_interval(self) -> float | None:
        """Seconds between watchdog pings (half of WatchdogSec), or None when not requested.

        WATCHDOG_PID names the process systemd watches; when it is another process (an
        inherited environment), the watchdog is not ours to ping.
        """
        if self._watchdog_usec is None:
            return None
        if self._watchdog_pid is not None and self._watchdog_pid != os.getpid():
            return None
        return self._watchdog_usec / MICROSECONDS * WATCHDOG_FRACTION

    def notify(self, message: str) -> bool:
        """Send raw assignments (`KEY=value` lines); True when the datagram was sent."""
        if self._address is None:
            return False
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.sendto(message.encode("utf-8", "replace"), self._address)
        except OSError as exc:
            self._log_failure_once(message, exc)
            return False
        return True

    def _log_failure_once(self, message: str, exc: OSError) -> None:
        with self._lock:
            if self._failure_logged:
                return
            self._failure_logged = True
        log.warning(
            "sd_notify_failed",
            socket=_printable(self._address),
            message=message.split("\n", 1)[0],
            error=str(exc),
        )


def _socket_address(notify_socket: str | None) -> str | bytes | None:
    if not notify_socket:
        return None
    if notify_socket.startswith("@"):
        # Linux abstract namespace: systemd writes '@', the kernel wants a leading NUL byte.
        return b"\0" + notify_socket[1:].encode("utf-8")
    if notify_socket.startswith("/"):
        return notify_socket
    # Other forms (systemd 254's vsock:CID:PORT) are not spoken here; say so once, then no-op.
    log.warning("sd_notify_unsupported_socket", socket=notify_socket)
    return None


def _printable(address: str | bytes | None) -> str:
    if isinstance(address, bytes):
        return "@" + address[1:].decode("utf-8", "replace")
    return address or ""


def _int_or_none(value: str | None) -> int | None:
    if value is None or not value.strip():
        return None
    try:
        return int(value)
    except ValueError:
        return None
