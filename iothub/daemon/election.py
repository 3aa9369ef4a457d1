"""Active/standby: which of the instances sharing one `mqtt_client_id` may ingest.

The instances elect one active through a PostgreSQL session advisory lock
`(locks.STANDBY_CLASS, locks.standby_key(client_id))` taken on a connection of its own. The
others wait on the same lock (the request stays queued in the server, in `LOCK_WAIT_SLICE`
slices so that a stop request is seen) and get it the moment the active's session ends: a
kill -9 closes its socket, a lost host is found by the keepalives set below.

Fencing: the active proves its session every `standby_lock_check_interval` seconds. When no
check has succeeded for `standby_lock_lost_after` seconds (or one says the lock is gone), the
service stops acknowledging and disconnects from the broker. The timing argument, and the
broker's one-connection-per-client-id rule as the second fence, are in docs/operations.md
("Active and standby").
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Final, Literal

import psycopg
import structlog

from config.settings import Settings
from ingestor.backoff import Backoff
from schema import db, locks, sql

log = structlog.get_logger(__name__)
queries = sql.load("schema")

Role = Literal["standby", "active", "fenced"]

LOCK_WAIT_SLICE: Final = 1.0  # seconds one lock request waits before the loop looks at stop
CHECK_TIMEOUT: Final = 2.0  # seconds a lock check may run on the server
# The lock connection notices a dead peer in seconds, not the minute of db.KEEPALIVES: the
# server ends a vanished active's session (and frees the lock) after idle + interval * count,
# and the active's own socket fails as fast.
KEEPALIVES_IDLE: Final = 2  # seconds of silence before the first probe
KEEPALIVES_INTERVAL: Final = 1  # seconds between probes
KEEPALIVES_COUNT: Final = 3  # unanswered probes that end the connection
USER_TIMEOUT_MS: Final = 5000  # ms unacknowledged data may wait (Linux TCP_USER_TIMEOUT)
# Server-side session end of a dead peer: idle + interval * count = 5 s.
SERVER_DETECTS_DEAD_PEER: Final = KEEPALIVES_IDLE + KEEPALIVES_INTERVAL * KEEPALIVES_COUNT


def lock_conninfo(settings: Settings) -> str:
    """The election connection: the configured DSN with fast keepalives (client side)."""
    return psycopg.conninfo.make_conninfo(
        db.conninfo(settings, "election"),
        keepalives=1,
        keepalives_idle=KEEPALIVES_IDLE,
        keepalives_interval=KEEPALIVES_INTERVAL,
        keepalives_count=KEEPALIVES_COUNT,
        tcp_user_timeout=USER_TIMEOUT_MS,
    )


class Election:
    """The lock of one client id: wait for it, hold it and prove it, release it."""

    def __init__(self, settings: Settings, stop: threading.Event) -> None:
        self.client_id = settings.mqtt_client_id
        self.params = {"lock_class": locks.STANDBY_CLASS, "key": locks.standby_key(self.client_id)}
        self._conninfo = lock_conninfo(settings)
        self._check_interval = settings.standby_lock_check_interval
        self._lost_after = settings.standby_lock_lost_after
        self._stop = stop
        self._conn: psycopg.Connection | None = None
        self.role: Role = "standby"
        self.db_connected = False
        self.last_confirmed = 0.0  # monotonic time of the last successful check
        self.lost_why: str | None = None
        self._on_lost: Callable[[str], None] | None = None
        self._thread: threading.Thread | None = None

    # --- standby

    def acquire(self, on_wait: Callable[[], None]) -> bool:
        """Wait until this instance holds the lock (True) or stop is requested (False).
        `on_wait` runs between the slices of the wait (the systemd watchdog)."""
        backoff = Backoff(initial=0.5, maximum=5.0)
        logged_standby = False
        while not self._stop.is_set():
            try:
                conn = self._connection()
                if not logged_standby:
                    log.info("standby", client_id=self.client_id, why="waiting for the lock")
                    logged_standby = True
                conn.execute(queries["standby_lock"], self.params)
            except psycopg.errors.LockNotAvailable:
                on_wait()
                continue
            except psycopg.Error as exc:
                self._drop_connection()
                delay = backoff.next()
                log.warning(
                    "standby_db_unavailable", error=str(exc).strip(), retry_in=round(delay, 2)
                )
                on_wait()
                self._stop.wait(delay)
                continue
            self.role = "active"
            self.last_confirmed = time.monotonic()
            log.info("became_active", client_id=self.client_id)
            return True
        self._drop_connection()
        return False

    def _connection(self) -> psycopg.Connection:
        if self._conn is None or self._conn.closed:
            conn = psycopg.connect(self._conninfo, autocommit=True)
            conn.execute(
                queries["standby_session"],
                {
                    "lock_timeout": f"{int(LOCK_WAIT_SLICE * 1000)}ms",
                    "statement_timeout": f"{int(CHECK_TIMEOUT * 1000)}ms",
                    "keepalives_idle": str(KEEPALIVES_IDLE),
                    "keepalives_interval": str(KEEPALIVES_INTERVAL),
                    "keepalives_count": str(KEEPALIVES_COUNT),
                    "user_timeout": str(USER_TIMEOUT_MS),
                },
            )
            self._conn = conn
            self.db_connected = True
        return self._conn

    def _drop_connection(self) -> None:
        self.db_connected = False
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    # --- active

    def guard(self, on_lost: Callable[[str], None]) -> None:
        """Prove the lock every check interval in thread `iothub-election`; `on_lost(why)` is
        called once when it is gone (also by `overdue()` when the checks hang)."""
        self._on_lost = on_lost
        self._thread = threading.Thread(target=self._guard, name="iothub-election", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread is None or self._thread.is_alive() or self.role != "active"

    def _guard(self) -> None:
        conn = self._conn
        while self.role == "active" and not self._stop.wait(self._check_interval):
            if conn is None:
                self._lose("no lock connection")
                return
            try:
                row = conn.execute(queries["standby_check"], self.params).fetchone()
            except psycopg.Error as exc:
                self._lose(f"lock connection failed: {str(exc).strip()}")
                return
            if not (row and row[0]):
                self._lose("the lock is no longer held by this session")
                return
            self.last_confirmed = time.monotonic()

    def overdue(self) -> None:
        """Called by the main loop: a check that hangs (a silent network) fences as well."""
        if self.role == "active":
            age = time.monotonic() - self.last_confirmed
            if age > self._lost_after:
                self._lose(f"no lock check confirmed for {age:.1f}s")

    def _lose(self, why: str) -> None:
        if self.role != "active":
            return
        self.role = "fenced"
        self.lost_why = why
        self.db_connected = False
        log.error("lock_lost", client_id=self.client_id, why=why)
        if self._on_lost is not None:
            self._on_lost(why)

    def release(self) -> None:
        """Give the lock up (after the broker disconnect) so that a standby takes over now."""
        was_active = self.role == "active"
        self.role = "standby" if self.role == "active" else self.role
        if self._thread is not None:
            self._thread.join(self._check_interval + CHECK_TIMEOUT)
        if was_active and self._conn is not None and not self._conn.closed:
            try:
                self._conn.execute(queries["standby_unlock"], self.params)
                log.info("lock_released", client_id=self.client_id)
            except psycopg.Error as exc:
                # Closing the session below frees the lock all the same.
                log.warning("lock_release_failed", error=str(exc).strip())
        self._drop_connection()
