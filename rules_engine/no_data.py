"""The no-data timer: fires `no_data` rules whose device_metric went silent.

A silence produces no reading, so no batch would ever evaluate it: this worker checks on a
timer, under the same per-device_metric advisory lock as the batch transaction, and writes the
event and state in one transaction. The next reading resolves it (in the batch path).

Silence is judged on the service's clock only: it counts from the later of the last receipt of
a reading of the device_metric (`rule_cursors.last_received`) and the moment this process's
intake last connected to the broker (what the broker queued for us while we were away is not a
silence), and there is no verdict at all while the intake is disconnected or the writer holds a
message older than `no_data_max_backlog` (readings still on their way are not a silence either).
"""

from __future__ import annotations

from collections import defaultdict
from datetime import UTC, datetime

import psycopg
import structlog
from psycopg_pool import ConnectionPool, PoolTimeout

from ingestor.backoff import Backoff
from rules_engine.evaluate import step as evaluator
from rules_engine.model import conditions
from rules_engine.rule_cache import RuleEntry
from rules_engine.workers import EngineThread, RuleHost

log = structlog.get_logger(__name__)


class NoDataWorker(EngineThread):
    name = "iothub-no-data"

    def __init__(self, engine: RuleHost, pool: ConnectionPool) -> None:
        super().__init__(engine, pool)
        self._deferring: str | None = None  # why the last pass gave no verdict (None: it did)

    def _run(self) -> None:
        backoff = Backoff()
        interval = self._engine.settings.no_data_check_interval
        while not self._stop.wait(backoff.next() if backoff.failing else interval):
            try:
                fired = self.check(datetime.now(UTC))
                if backoff.failing:
                    log.info("no_data_check_recovered")
                backoff.reset()
                if fired:
                    log.info("no_data_check", fired=fired)
            except (psycopg.Error, PoolTimeout) as exc:
                delay = backoff.next()
                log.warning(
                    "no_data_check_failed", error=str(exc).strip()[:300], retry_in=round(delay, 2)
                )
            except Exception:
                # A bug here must not end the thread quietly: log it and keep the timer going.
                backoff.next()
                log.exception("no_data_check_crashed")

    def _deferred(self, why: str | None, **context: object) -> bool:
        """Whether this pass gives no verdict; logs when deferring starts and ends."""
        if why != self._deferring:
            if why is None:
                log.info("no_data_check_resumed", deferred=self._deferring)
            else:
                log.info("no_data_check_deferred", why=why, **context)
            self._deferring = why
        return why is not None

    def check(self, now: datetime) -> int:
        """One pass over every no_data rule; returns how many fired."""
        engine = self._engine
        backlog = engine.backlog_age()
        limit = engine.settings.no_data_max_backlog
        connected_at = engine.intake_since()
        if connected_at is None:
            self._deferred("intake_disconnected")
            return 0
        if backlog > limit:
            self._deferred("backlog", backlog_s=round(backlog, 1), limit_s=limit)
            return 0
        self._deferred(None)
        fired = 0
        with self._pool.connection() as conn:
            rules = engine.cache.current(conn)
            watched: dict[int, list[RuleEntry]] = defaultdict(list)
            for dm, entries in rules.items():
                for entry in entries:
                    if isinstance(entry.rule.condition, conditions.NoData):
                        watched[dm].append(entry)
            if not watched:
                return 0
            with conn.transaction():
                dms = sorted(watched)
                engine.store.lock(conn, dms)
                states = engine.store.load_states(conn, dms)
                for dm in dms:
                    known = states[dm]
                    heard = known.last_received or known.last_ts
                    since = None if heard is None else max(heard, connected_at)
                    for entry in watched[dm]:
                        state = known.state_for(entry)
                        try:
                            result = evaluator.check_no_data(
                                entry.rule, state, now, engine.tz, silent_since=since
                            )
                        except Exception as exc:
                            # One rule's failure must not stop the timer for the others.
                            engine.failures.report("no_data", entry, exc, device_metric_id=dm)
                            continue
                        for transition in result.transitions:
                            engine.events.write_event(conn, entry, transition)
                            engine.metrics.events.labels(kind=transition.kind).inc()
                            fired += 1
                        if result.state != state:
                            engine.store.save_state(conn, entry, result.state)
        return fired
