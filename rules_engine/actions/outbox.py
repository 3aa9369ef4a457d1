"""Where rule actions are delivered: the outbox worker, after the ingestion transaction committed.

The rule engine only INSERTs rows into `action_outbox` inside the ingestion transaction; this
worker, on a thread and pool connections of its own, delivers them, so a slow webhook delays other
actions but never ingestion. A pass claims due rows in a short transaction (`FOR UPDATE SKIP
LOCKED`, several service instances share the outbox) that gives them a lease and a claim token and
commits; it then delivers them one by one with no transaction open, and records each outcome in a
short transaction of its own that only counts while the claim token is still the row's. A worker
that crashes or hangs leaves its rows leased; once the lease runs out they are due again, so
delivery is at least once (webhook receivers get the outbox id in a header to drop a repeat).

Outcomes: delivered; or a retry after a jittered exponential delay; or, after
`outbox_max_attempts` attempts (or at once when the row itself is malformed or its destination
refused), `failed`, kept in the table with its last error and never dropped. Every attempt leaves
a row in `action_attempts`.

Every delivery has a wall-clock deadline, and the worker keeps a heartbeat of the step it is in:
`health()` (the service's /healthz) reports it stuck when a step overruns its deadline by more
than `outbox_stuck_after`.

Each row's target is read through the target contract (targets.py) and handed to the sender of
its kind, one per kind behind sender.Sender: `webhook` POSTs the JSON body (2xx is success) to
public addresses only, unless allow-listed (webhook.py, egress.py); `mqtt` publishes on a
dedicated clean-session client and waits for the broker's acknowledgement (mqtt.py); `notify`
logs the notification and, for the email channel with `smtp_url` set, sends it to the target's
`to` address(es) (email.py).
"""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final, Literal

import psycopg
import structlog
from psycopg_pool import ConnectionPool
from pydantic import JsonValue

from config.settings import Settings
from ingestor import backoff
from ingestor.backoff import Backoff
from rules_engine.actions import egress, email, exceptions, mqtt, sender, targets, webhook
from rules_engine.metrics import RuleMetrics
from schema import sql as queries_mod

log = structlog.get_logger(__name__)
queries = queries_mod.load("rules_engine.actions", "outbox.sql")

CLAIM_BATCH: Final = 50  # rows claimed (and leased) per pass
BATCH_BUDGET: Final = 15.0  # seconds: past this no row is started; the rest is released
LEASE_MARGIN: Final = 30.0  # seconds a lease outlasts the longest a pass should take
RETRY_BASE: Final = 1.0  # seconds before the first retry; doubles with each failed attempt
RETRY_MAX: Final = 300.0  # seconds: the longest wait between two attempts (5 minutes)
RETRY_JITTER: Final = 0.2  # ±20 %: rows that failed together do not all retry together
LOOP_RETRY_MIN: Final = 0.5  # seconds: first wait after the loop itself failed
LOOP_RETRY_MAX: Final = 30.0  # seconds
KINDS: Final = targets.KINDS
OUTCOMES: Final = ("delivered", "retry", "failed")


@dataclass(frozen=True)
class OutboxRow:
    id: int
    event_id: int
    rule_id: int
    kind: str
    target: Any
    attempts: int  # before this attempt
    lost: bool = False  # a previous claim ran out without an outcome (counted in attempts)


@dataclass(frozen=True)
class Outcome:
    ok: bool
    detail: str
    permanent: str | None = None  # why no retry can fix this failure


def retry_delay(attempts: int, base: float = RETRY_BASE, maximum: float = RETRY_MAX) -> float:
    """Seconds before the next attempt, after `attempts` failed ones (jittered, capped): the
    one retry policy, asked directly because the attempt count is kept in the row."""
    return backoff.delay_after(attempts, initial=base, maximum=maximum, jitter=RETRY_JITTER)


# ---------------------------------------------------------------------------------------------
# The worker


@dataclass(frozen=True)
class Step:
    """What the worker is doing now, since when, and how long it may take (its heartbeat)."""

    name: Literal["claim", "deliver", "record"]
    started: float  # time.monotonic()
    allowed: float  # seconds; database steps have none of their own
    outbox_id: int | None = None
    kind: str | None = None


class OutboxWorker:
    """Delivers the outbox on a thread of its own; `service.Worker` of `iothub run`.

    The pool is the caller's: it must be open while the worker runs, and is never closed here.
    """

    name = "iothub-outbox"

    def __init__(
        self,
        settings: Settings,
        pool: ConnectionPool,
        metrics: RuleMetrics,
        *,
        retry_base: float = RETRY_BASE,
        retry_max: float = RETRY_MAX,
        batch_size: int = CLAIM_BATCH,
        publish_timeout: float = mqtt.PUBLISH_TIMEOUT,
        smtp_deadline: float = email.SMTP_DEADLINE,
    ) -> None:
        self._settings = settings
        self._pool = pool
        self._metrics = metrics
        self._retry_base = retry_base
        self._retry_max = retry_max
        self._batch_size = batch_size
        self._max_attempts = settings.outbox_max_attempts
        self._stopping = threading.Event()
        policy = egress.AddressPolicy(egress.parse_networks(settings.action_allow_networks))
        self._mailer = (
            email.Mailer(settings.smtp_url, settings.smtp_from, deadline=smtp_deadline)
            if settings.smtp_url
            else None
        )
        # One sender per action kind (the `kind` of the target model it delivers).
        self._senders: Mapping[str, sender.Sender] = {
            targets.WebhookTarget.kind: webhook.WebhookSender(settings.webhook_timeout, policy),
            targets.PublishTarget.kind: mqtt.MqttPublisher(
                settings, publish_timeout, self._stopping
            ),
            targets.NotifyTarget.kind: email.Notifier(self._mailer),
        }
        # The longest each kind of delivery may take: its own timeouts bound it.
        self._deadlines: Mapping[str, float] = {
            "webhook": settings.webhook_timeout,
            "mqtt": 2 * publish_timeout,  # to be connected, then for the acknowledgement
            "notify": smtp_deadline,
        }
        # A claim's lease outlasts the longest a pass can take: rows are started only within
        # BATCH_BUDGET, and the last one started ends by its deadline.
        self._lease = BATCH_BUDGET + max(self._deadlines.values()) + LEASE_MARGIN
        self._claimer = f"{socket.gethostname()}:{os.getpid()}"
        self._thread: threading.Thread | None = None
        self._step: Step | None = None
        self._health_lock = threading.Lock()
        self._reported_stuck: Step | None = None
        metrics.outbox_worker_stuck.set(0)
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
        """Finish the row in hand (rows not attempted are released), then close the clients."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                # Stuck past every deadline: its rows keep their lease, which runs out, and
                # they are delivered again later. The clients stay open for it.
                log.error("outbox_stop_timeout", timeout_s=timeout)
                return
        for each in self._senders.values():
            each.close()

    @property
    def alive(self) -> bool:
        """False only when the thread should be running and is not (it died)."""
        thread = self._thread
        return thread is None or self._stopping.is_set() or thread.is_alive()

    def health(self) -> dict[str, bool]:
        """`{"outbox": False}` while the current step has overrun its deadline by more than
        `outbox_stuck_after` (a hung receiver the deadlines did not catch, a lock on the
        outbox). Called from other threads (the service's main loop, /healthz); it logs
        `outbox_worker_stuck` once per stuck step and keeps the gauge."""
        step = self._step
        now = time.monotonic()
        stuck = (
            step is not None
            and now - step.started > step.allowed + self._settings.outbox_stuck_after
        )
        with self._health_lock:
            if stuck and step is not None and self._reported_stuck is not step:
                self._reported_stuck = step
                self._metrics.outbox_worker_stuck.set(1)
                log.error(
                    "outbox_worker_stuck",
                    step=step.name,
                    outbox_id=step.outbox_id,
                    kind=step.kind,
                    running_s=round(now - step.started, 1),
                    deadline_s=step.allowed,
                )
            elif not stuck and self._reported_stuck is not None:
                self._reported_stuck = None
                self._metrics.outbox_worker_stuck.set(0)
                log.info("outbox_worker_unstuck")
        return {"outbox": not stuck}

    @contextmanager
    def _doing(
        self, name: Literal["claim", "deliver", "record"], row: OutboxRow | None = None
    ) -> Iterator[None]:
        allowed = self._deadlines.get(row.kind, 0.0) if row and name == "deliver" else 0.0
        self._step = Step(
            name,
            time.monotonic(),
            allowed,
            outbox_id=row.id if row else None,
            kind=row.kind if row else None,
        )
        try:
            yield
        finally:
            self._step = None

    def _main(self) -> None:
        log.info(
            "outbox_started",
            poll_interval_s=self._settings.outbox_poll_interval,
            max_attempts=self._max_attempts,
            smtp=self._mailer is not None,
            lease_s=self._lease,
            allow_networks=list(self._settings.action_allow_networks),
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
        """Claim due rows, deliver, record; True when more rows may be due right away.

        No transaction is open while a row is delivered: the claim and each outcome commit in
        transactions of their own, a few milliseconds each."""
        started = time.monotonic()
        token = f"{self._claimer}:{uuid.uuid4().hex[:12]}"
        attempted = 0
        with self._pool.connection() as conn:
            with self._doing("claim"), conn.transaction():
                found = conn.execute(
                    queries["claim_due"],
                    {"limit": self._batch_size, "lease": self._lease, "token": token},
                ).fetchall()
                rows = sorted((OutboxRow(*values) for values in found), key=lambda r: r.id)
                documents = self._event_documents(conn, rows)
            for row in rows:
                if row.lost:
                    log.warning(
                        "action_lease_expired",
                        why="claimed before and no outcome recorded: counted as a failed attempt",
                        outbox_id=row.id,
                        kind=row.kind,
                        attempts=row.attempts,
                    )
            try:
                for row in rows:
                    if self._stopping.is_set() or time.monotonic() - started > BATCH_BUDGET:
                        break
                    if row.lost and row.attempts >= self._max_attempts:
                        with self._doing("record", row), conn.transaction():
                            self._give_up(conn, token, row)
                        attempted += 1
                        continue
                    attempted_at = datetime.now(UTC)
                    with self._doing("deliver", row):
                        outcome = self._attempt(row, documents)
                    finished_at = datetime.now(UTC)
                    with self._doing("record", row), conn.transaction():
                        self._record(
                            conn,
                            token,
                            row,
                            outcome,
                            attempted_at=attempted_at,
                            finished_at=finished_at,
                        )
                    attempted += 1
            finally:
                if attempted < len(rows) and not conn.broken:
                    with self._doing("record"), conn.transaction():
                        conn.execute(queries["release_claim"], {"token": token})
            with self._doing("record"), conn.transaction():
                pending = conn.execute(queries["count_pending"]).fetchone()
        self._metrics.outbox_backlog.set(pending[0] if pending else 0)
        return len(rows) == self._batch_size or attempted < len(rows)

    def _attempt(self, row: OutboxRow, documents: Mapping[int, dict[str, JsonValue]]) -> Outcome:
        try:
            return Outcome(ok=True, detail=self._deliver(row, documents))
        except exceptions.BadTarget as exc:
            return Outcome(ok=False, detail=str(exc), permanent=exc.why)
        except exceptions.DeliveryFailed as exc:
            return Outcome(ok=False, detail=str(exc))
        except Exception as exc:
            # A bug in one delivery must not stop the others: record it like any failure.
            log.exception("action_delivery_crashed", outbox_id=row.id, kind=row.kind)
            return Outcome(ok=False, detail=f"internal error: {type(exc).__name__}: {exc}")

    def _record(
        self,
        conn: psycopg.Connection,
        token: str,
        row: OutboxRow,
        outcome: Outcome,
        *,
        attempted_at: datetime,
        finished_at: datetime,
    ) -> None:
        """One outcome, with its attempt row, if the claim is still ours."""
        detail = sender.clip(outcome.detail)
        attempts = row.attempts + 1
        facts = {
            "outbox_id": row.id,
            "kind": row.kind,
            "rule_id": row.rule_id,
            "event_id": row.event_id,
            "attempts": attempts,
        }
        params: dict[str, Any] = {
            "outbox_id": row.id,
            "token": token,
            "attempted_at": attempted_at,
            "finished_at": finished_at,
            "detail": detail,
        }
        if outcome.ok:
            query, result = "record_delivered", "delivered"
        elif outcome.permanent or attempts >= self._max_attempts:
            query, result = "record_failed", "failed"
        else:
            query, result = "record_retry", "retry"
            params["delay"] = retry_delay(attempts, self._retry_base, self._retry_max)
        if conn.execute(queries[query], params).fetchone() is None:
            # The lease ran out and another claim took the row: its outcome is the one that
            # counts (this attempt is not recorded; the receiver may see the action twice).
            log.warning("action_outcome_dropped", why="lease lost", outcome=result, **facts)
            return
        self._count(row.kind, result)
        if result == "delivered":
            log.info("action_delivered", detail=detail, **facts)
        elif result == "failed":
            why = outcome.permanent or "max attempts reached"
            log.error("action_failed", error=detail, why=why, **facts)
        else:
            delay = params["delay"]
            log.warning("action_retry", error=detail, retry_in=round(delay, 2), **facts)

    def _give_up(self, conn: psycopg.Connection, token: str, row: OutboxRow) -> None:
        found = conn.execute(queries["give_up"], {"outbox_id": row.id, "token": token}).fetchone()
        if found is None:
            return  # another claim holds it now: its outcome counts
        self._count(row.kind, "failed")
        log.error(
            "action_failed",
            error=found[0],
            why="max attempts reached",
            outbox_id=row.id,
            kind=row.kind,
            rule_id=row.rule_id,
            event_id=row.event_id,
            attempts=row.attempts,
        )

    def _count(self, kind: str, outcome: str) -> None:
        self._metrics.actions_delivered.labels(kind=kind, outcome=outcome).inc()

    # --- deliveries

    def _deliver(self, row: OutboxRow, documents: Mapping[int, dict[str, JsonValue]]) -> str:
        target = targets.read(row.kind, row.target)
        delivery = sender.Delivery(
            row.id, row.event_id, row.rule_id, target, documents.get(row.event_id)
        )
        return self._senders[target.kind].deliver(delivery)

    @staticmethod
    def _event_documents(
        conn: psycopg.Connection, rows: Sequence[OutboxRow]
    ) -> dict[int, dict[str, JsonValue]]:
        """The standard event documents the claimed mqtt rows without a payload publish."""
        wanted = sorted(
            {
                row.event_id
                for row in rows
                if row.kind == "mqtt"
                and isinstance(row.target, dict)
                and row.target.get("payload") is None
            }
        )
        if not wanted:
            return {}
        documents: dict[int, dict[str, JsonValue]] = {}
        for found in conn.execute(queries["event_documents"], {"event_ids": wanted}):
            event, kind, rule_id, rule_name, serial, device, metric, value, ts, message = found
            documents[event] = {
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
        return documents
