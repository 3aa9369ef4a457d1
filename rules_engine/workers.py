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
from ingestor.worker import WorkerThread
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


class EngineThread(WorkerThread):
    """A rule engine worker: the shared thread shape, with the engine's host and a pool."""

    name = "iothub-rules"  # each subclass names its thread

    def __init__(self, engine: RuleHost, pool: ConnectionPool) -> None:
        self._engine = engine
        self._pool = pool
        super().__init__()


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
