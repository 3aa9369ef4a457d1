"""Running the daemon inside the test process (fault tests run it as a subprocess instead)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from config.settings import Settings
from iothub.daemon import assemble
from iothub.daemon.observe import ServiceMetrics
from iothub.daemon.service import IngestService
from rules_engine.engine import RuleEngine


class RunningService:
    def __init__(self, service: IngestService) -> None:
        self.service = service
        self.exit_code: int | None = None
        self.thread = threading.Thread(target=self._run, name="test-service")

    def _run(self) -> None:
        self.exit_code = self.service.run()

    def stop(self, timeout: float = 30.0) -> int | None:
        self.service.request_stop("test")
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "service did not stop in time"
        return self.exit_code


def make_service(settings: Settings, rules: bool = True) -> IngestService:
    """The daemon with the rule engine as its batch hook (no outbox or timer workers: tests of
    those start them explicitly). With `settings.workers` > 1, the receiving process and its
    worker processes, each worker with its rule engine."""
    if settings.workers > 1:
        return IngestService(settings, stage=assemble.fanout(rules))
    if not rules:
        return IngestService(settings)
    metrics = ServiceMetrics()
    engine = RuleEngine(settings, metrics.rules)
    return IngestService(
        settings, hook=engine, on_catalog_change=engine.on_catalog_change, metrics=metrics
    )


@contextmanager
def running(service: IngestService, ready_timeout: float = 30.0) -> Iterator[RunningService]:
    handle = RunningService(service)
    handle.thread.start()
    try:
        assert service.wait_ready(ready_timeout), "service did not become ready"
        yield handle
    finally:
        handle.stop()
