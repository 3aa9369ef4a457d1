"""The rule engine's background workers share one shape: a thread with what the engine
shares with it (`RuleHost`), a pool, and a stop event (the service's Worker: start, stop,
alive). The host is a protocol, so the workers need not import the engine that starts them."""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import datetime
from typing import Protocol
from zoneinfo import ZoneInfo

from psycopg_pool import ConnectionPool

from config.settings import Settings
from rules_engine.events import EventWriter
from rules_engine.failures import RuleFailures
from rules_engine.metrics import RuleMetrics
from rules_engine.rule_cache import RuleCache
from rules_engine.state_store import StateStore


class RuleHost(Protocol):
    """What the rule engine shares with its workers (rules_engine.engine.RuleEngine)."""

    settings: Settings
    tz: ZoneInfo
    metrics: RuleMetrics
    cache: RuleCache
    store: StateStore
    events: EventWriter
    failures: RuleFailures
    catalog_seen: threading.Event
    backlog_age: Callable[[], float]
    intake_since: Callable[[], datetime | None]


class EngineThread:
    name = "iothub-rules"  # each subclass names its thread

    def __init__(self, engine: RuleHost, pool: ConnectionPool) -> None:
        self._engine = engine
        self._pool = pool
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        """False only when the thread should be running and is not (it died)."""
        return self._thread.is_alive() or self._stop.is_set()

    def _run(self) -> None:
        raise NotImplementedError


class PoolKeeper:
    """Opens the rule engine's own pool first and closes it last (workers share it)."""

    name = "iothub-actions-pool"

    def __init__(self, pool: ConnectionPool) -> None:
        self.pool = pool

    def start(self) -> None:
        self.pool.open(wait=False)

    def stop(self, timeout: float) -> None:
        # Workers stop in reverse order of the list, so this runs after every user of the pool.
        self.pool.close(timeout=timeout)

    @property
    def alive(self) -> bool:
        return True
