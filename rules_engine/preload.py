"""The rule preloader: loads the rule cache while the service starts, so that compiling
thousands of rules is not the first batch's work and an invalid rule is reported at start."""

from __future__ import annotations

from typing import Final

import structlog

from rules_engine.workers import EngineThread

log = structlog.get_logger(__name__)

PRELOAD_TIMEOUT: Final = 30.0  # seconds to get a connection for loading the rules at start
CATALOG_POLL: Final = 0.1  # seconds between checks for a stop while awaiting the catalogue


class RulePreloader(EngineThread):
    """Loads the rule cache while the service starts (the broker connection, the rest of the
    start-up), so that compiling thousands of rules is not the first batch's work, and an
    invalid rule is reported at start. It waits for the catalogue listener's first load: that
    marks the cache stale (changes before LISTEN could be missed), and a load after it is kept
    until a notification says otherwise. One attempt: on failure the first batch loads them."""

    name = "iothub-rules-preload"

    @property
    def alive(self) -> bool:
        return True  # done after one attempt, by design

    def _run(self) -> None:
        while not self._engine.catalog_seen.wait(CATALOG_POLL):
            if self._stop.is_set():
                return
        try:
            with self._pool.connection(timeout=PRELOAD_TIMEOUT) as conn:
                self._engine.cache.current(conn)
        except Exception as exc:
            log.warning("rules_preload_failed", error=" ".join(str(exc).split())[:300])
