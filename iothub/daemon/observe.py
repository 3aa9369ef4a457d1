"""What the daemon shows of itself: its metrics (one registry, each part's instruments), the
hooks that feed them, and the periodic stats line."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, exposition

from ingestor.metrics import IngestMetrics
from rules_engine.metrics import RuleMetrics

# Every name here is a plain Prometheus name, so the body is the same in text format 0.0.4 and
# 1.0.0; announcing 0.0.4 keeps older Prometheus servers and other scrapers happy.
CONTENT_TYPE = exposition.CONTENT_TYPE_PLAIN_0_0_4


class ServiceMetrics:
    """All instruments of one service instance, in a registry of their own, served on /metrics
    by `iothub.daemon.http.HealthServer`.

    A registry per instance (not prometheus_client's global one) lets tests and the demo run
    several services in one process without "Duplicated timeseries" errors.
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.ingest = IngestMetrics(self.registry)
        self.rules = RuleMetrics(self.registry)

    def render(self) -> bytes:
        """The registry in the Prometheus text exposition format (see CONTENT_TYPE)."""
        return exposition.generate_latest(self.registry)
