"""The rule engine's background workers share one shape: a thread with the engine, a pool, and
a stop event (`service.Worker`: start, stop, alive)."""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

from psycopg_pool import ConnectionPool

if TYPE_CHECKING:
    from rules_engine.engine import RuleEngine


class EngineThread:
    name = "iothub-rules"  # each subclass names its thread

    def __init__(self, engine: RuleEngine, pool: ConnectionPool) -> None:
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
