"""Active/standby: which of the instances sharing one `mqtt_client_id` may ingest.

The instances elect one active through a PostgreSQL session advisory lock
`(locks.STANDBY_CLASS, locks.standby_key(client_id))` taken on a connection of its own. The
others wait on the same lock (the request stays queued in the server, in `LOCK_WAIT_SLICE`
slices so that a stop request is seen) and get it the moment the active's session ends: a
kill -9 closes its socket, a lost host is found by the keepalives set below.

Fencing: the active proves its session every `standby_lock_check_interval` seconds. When its
lock connection fails, or no check has succeeded for `standby_lock_lost_after` seconds, the lock
is *unconfirmed*: the service holds its acknowledgements and makes no broker connection attempt,
and the guard tries to take the lock back on a new session (`pg_try_advisory_lock`, at once,
then with backoff) until the database answers. Taken: the held acknowledgements go out and
ingestion goes on, so a database restart costs a lone active nothing. Held by another session
(or a live session says it is no longer ours): the lock is lost, the service leaves the broker
and stops (exit 69; restarted, it comes back as a standby). The timing argument, and the
broker's one-connection-per-client-id rule as the second fence, are in docs/operations.md
("Active and standby").
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Final, Literal, Protocol

import psycopg
import structlog

from config.settings import Settings
from ingestor.backoff import Backoff
from schema import db, locks, sql

log = structlog.get_logger(__name__)
queries = sql.load("schema")

Role = Literal["standby", "active", "unconfirmed", "fenced"]
GUARDED: Final = ("active", "unconfirmed")  # the roles the guard thread watches

RETRY_INITIAL: Final = 0.25  # seconds before the second attempt to take the lock back
# seconds at most between attempts: the active tries sooner than a standby (5 s), so that it
# usually keeps the lock through a database restart and nothing has to be redelivered
RETRY_MAXIMUM: Final = 1.0

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


class LockWatcher(Protocol):
    """What the service does when the lock changes hands (each called once per change)."""

    def lock_unconfirmed(self, why: str) -> None:
        """The lock cannot be proven now: acknowledge nothing, connect to nothing."""

    def lock_regained(self) -> int:
        """The lock is proven again: go on (returns the acknowledgements sent that waited)."""

    def lock_lost(self, why: str) -> None:
        """Another instance may hold the lock: leave the broker, stop."""


def first_line(exc: Exception) -> str:
    """A database error for a log line: libpq's messages run over several lines."""
    lines = str(exc).strip().splitlines()
    return lines[0][:300] if lines else type(exc).__name__


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
        self._watcher: LockWatcher | None = None
        self._thread: threading.Thread | None = None
        # Role changes, and the watcher calls that go with them (the guard thread, the main loop).
        self._mutex = threading.Lock()
        self._unconfirmed_since = 0.0

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

    def guard(self, watcher: LockWatcher) -> None:
        """Prove the lock every check interval in thread `iothub-election`, and tell
        `watcher` when it turns unconfirmed, is held again, or is lost."""
        self._watcher = watcher
        self._thread = threading.Thread(target=self._guard, name="iothub-election", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread is None or self._thread.is_alive() or self.role not in GUARDED

    def _guard(self) -> None:
        backoff = Backoff(initial=RETRY_INITIAL, maximum=RETRY_MAXIMUM)
        wait = self._check_interval
        while self.role in GUARDED and not self._stop.wait(wait):
            if self._conn is not None:
                # A live session answers for itself: still ours (also after `overdue()`, when
                # a check only hung), or gone for good.
                failure = self._check()
                wait = 0.0 if failure else self._check_interval  # retry the lock at once
                continue
            failure = self._try_lock()
            if failure is None:
                backoff.reset()
                wait = self._check_interval
                continue
            wait = backoff.next()
            log.warning(
                "lock_retry", client_id=self.client_id, error=failure, retry_in=round(wait, 2)
            )

    def _check(self) -> str | None:
        """One check on the lock's own session; the error when the session failed."""
        conn = self._conn
        assert conn is not None
        try:
            row = conn.execute(queries["standby_check"], self.params).fetchone()
        except psycopg.Error as exc:
            self._drop_connection()
            why = f"lock connection failed: {first_line(exc)}"
            self._unconfirm(why)
            return why
        if not (row and row[0]):
            self._lose("the lock is no longer held by this session")
            return None
        self._confirm()
        return None

    def _try_lock(self) -> str | None:
        """On a new session: take the lock if it is free. The error when the database does
        not answer; held by another session, the lock is lost."""
        try:
            conn = self._connection()
            row = conn.execute(queries["standby_try_lock"], self.params).fetchone()
        except psycopg.Error as exc:
            self._drop_connection()
            return first_line(exc)
        if row and row[0]:
            self._confirm()
            if self.role not in GUARDED:
                self._drop_connection()  # released meanwhile (the stop): give it up again
        else:
            self._lose("another instance holds the lock")
        return None

    def overdue(self) -> None:
        """Called by the main loop: a check that hangs (a silent network) unconfirms too."""
        if self.role == "active":
            age = time.monotonic() - self.last_confirmed
            if age > self._lost_after:
                self._unconfirm(f"no lock check confirmed for {age:.1f}s")

    def _unconfirm(self, why: str) -> None:
        with self._mutex:
            if self.role != "active":
                return
            self.role = "unconfirmed"
            self._unconfirmed_since = time.monotonic()
            self.db_connected = False
            # Hold first, log after: nothing may be acknowledged past this point. Under the
            # mutex, so that a check confirming at this moment cannot resume before we hold.
            self._watch().lock_unconfirmed(why)
        log.warning(
            "lock_unconfirmed",
            client_id=self.client_id,
            why=why,
            effect="acknowledgements held, no broker reconnects, retrying the lock",
        )

    def _confirm(self) -> None:
        with self._mutex:
            self.last_confirmed = time.monotonic()
            if self.role != "unconfirmed":
                return
            self.role = "active"
            self.db_connected = True
            unconfirmed_s = time.monotonic() - self._unconfirmed_since
            acks = self._watch().lock_regained()
        log.info(
            "lock_regained",
            client_id=self.client_id,
            unconfirmed_s=round(unconfirmed_s, 2),
            acks_sent=acks,
        )

    def _lose(self, why: str) -> None:
        with self._mutex:
            if self.role not in GUARDED:
                return
            self.role = "fenced"
            self.lost_why = why
            self.db_connected = False
            log.error("lock_lost", client_id=self.client_id, why=why)
            self._watch().lock_lost(why)

    def _watch(self) -> LockWatcher:
        assert self._watcher is not None, "guard() sets the watcher before any check"
        return self._watcher

    def release(self) -> None:
        """Give the lock up (after the broker disconnect) so that a standby takes over now."""
        with self._mutex:
            was_active = self.role == "active"
            # Unconfirmed: nothing to unlock that closing the session would not free.
            self.role = "standby" if self.role in GUARDED else self.role
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
