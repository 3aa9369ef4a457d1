"""The device catalogue: (serial_id, metric_type) → device_metric, cached in memory.

The catalogue is small (devices × metrics) and read for every reading, so it is loaded whole
into an immutable snapshot and replaced whole when the database says it changed
(`iothub_catalog` notifications from triggers on devices, metrics, device_metrics, rules).
Readers never lock: they take the current snapshot reference.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import psycopg
import structlog

from ingestor.backoff import Backoff
from schema import sql as queries_mod
from schema.types import DataType

log = structlog.get_logger(__name__)
queries = queries_mod.load("ingestor")

CHANNEL = "iothub_catalog"
LISTEN_POLL = 0.5  # seconds: how often the listener looks at its stop flag
RETRY_MIN, RETRY_MAX = 0.5, 30.0  # seconds: backoff of the listener's reconnect loop
DEBOUNCE = 0.05  # seconds: a burst of changes (a script editing 100 rows) reloads once


@dataclass(frozen=True)
class Binding:
    """One device_metric with what a reading needs to be stored and evaluated."""

    device_metric_id: int
    metric_type: str
    data_type: DataType


@dataclass(frozen=True)
class Device:
    device_id: int
    serial_id: str
    name: str
    is_active: bool
    bindings: dict[str, Binding]  # by lower-cased metric type (metric_type is citext)


@dataclass(frozen=True)
class Snapshot:
    devices: dict[str, Device] = field(default_factory=dict)
    metric_types: frozenset[str] = frozenset()  # lower-cased, every metric that exists
    loaded_at: float = 0.0

    def by_binding(self) -> dict[int, tuple[Device, Binding]]:
        return {
            b.device_metric_id: (d, b) for d in self.devices.values() for b in d.bindings.values()
        }


def load(conn: psycopg.Connection) -> Snapshot:
    """Read the whole catalogue in one query."""
    raw: dict[str, tuple[int, str, bool, dict[str, Binding]]] = {}
    for serial, dev_id, name, active, metric_type, data_type, dm_id in conn.execute(
        queries["load_catalog"]
    ):
        entry = raw.setdefault(serial, (dev_id, name, active, {}))
        if dm_id is not None:
            entry[3][metric_type.lower()] = Binding(dm_id, metric_type, data_type)
    metric_types = frozenset(row[0].lower() for row in conn.execute(queries["load_metric_types"]))
    devices = {
        serial: Device(dev_id, serial, name, active, bindings)
        for serial, (dev_id, name, active, bindings) in raw.items()
    }
    return Snapshot(devices, metric_types, time.time())


class CatalogListener:
    """Keeps a snapshot current: LISTEN on its own connection, reload on every notification.

    After a lost connection it reloads on reconnect, since notifications sent while it was away
    are gone. Subscribers (the rule cache) get the set of tables that changed.
    """

    def __init__(
        self,
        conninfo: str,
        on_change: Callable[[Snapshot, frozenset[str]], None],
        stop: threading.Event,
    ) -> None:
        self._conninfo = conninfo
        self._on_change = on_change
        self._stop = stop
        self._snapshot = Snapshot()
        self._ready = threading.Event()
        self.thread = threading.Thread(target=self._run, name="iothub-catalog", daemon=True)
        self.connected = False

    @property
    def snapshot(self) -> Snapshot:
        return self._snapshot

    def start(self) -> None:
        self.thread.start()

    def wait_ready(self, timeout: float) -> bool:
        return self._ready.wait(timeout)

    def _publish(self, snapshot: Snapshot, tables: frozenset[str]) -> None:
        self._snapshot = snapshot
        self._on_change(snapshot, tables)
        self._ready.set()

    def _run(self) -> None:
        backoff = Backoff(initial=RETRY_MIN, maximum=RETRY_MAX)
        while not self._stop.is_set():
            try:
                with psycopg.connect(self._conninfo, autocommit=True) as conn:
                    conn.execute(queries["listen_catalog"])
                    snapshot = load(conn)
                    self.connected = True
                    log.info(
                        "catalog_loaded",
                        devices=len(snapshot.devices),
                        bindings=sum(len(d.bindings) for d in snapshot.devices.values()),
                    )
                    self._publish(snapshot, frozenset({"*"}))
                    backoff.reset()
                    self._listen(conn)
            except psycopg.Error as exc:
                self.connected = False
                delay = backoff.next()
                log.warning(
                    "catalog_listener_retry", error=str(exc).strip(), retry_in=round(delay, 1)
                )
                self._stop.wait(delay)
            except Exception:
                # Never let the thread die quietly: the service checks `thread.is_alive()`.
                self.connected = False
                log.exception("catalog_listener_crashed")
                raise
        self.connected = False

    def _listen(self, conn: psycopg.Connection) -> None:
        while not self._stop.is_set():
            tables: set[str] = set()
            for notify in conn.notifies(timeout=LISTEN_POLL):
                tables.add(notify.payload)
                break
            if not tables:
                continue
            # Gather the rest of a burst before reloading once.
            for notify in conn.notifies(timeout=DEBOUNCE):
                tables.add(notify.payload)
            snapshot = load(conn)
            log.info("catalog_reloaded", tables=sorted(tables), devices=len(snapshot.devices))
            self._publish(snapshot, frozenset(tables))
