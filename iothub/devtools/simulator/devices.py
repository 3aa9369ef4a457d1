"""The simulated devices: generated ones, or the seed's as the database's catalogue has them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

import psycopg
import structlog

from config.settings import Settings
from ingestor import catalog
from iothub.devtools.seed import data as seed_data
from schema import db
from schema.types import DataType

log = structlog.get_logger(__name__)

DB_CONNECT_TIMEOUT: Final = 3  # seconds: the device list is optional, do not wait long for it
GENERATED_PREFIX: Final = "SIM"  # serials of generated devices: SIM-0000, SIM-0001, ...


@dataclass(frozen=True)
class SimMetric:
    name: str
    data_type: DataType


@dataclass(frozen=True)
class SimDevice:
    """A simulated device: its serial and the metrics it reports."""

    serial_id: str
    metrics: tuple[SimMetric, ...]

    def __post_init__(self) -> None:
        if not self.metrics:
            raise ValueError(f"device {self.serial_id!r} has no metrics")


DEFAULT_METRICS: Final = (
    SimMetric("temperature", "numeric"),
    SimMetric("humidity", "numeric"),
    SimMetric("status", "str"),
    SimMetric("online", "boolean"),
)


def generated_devices(
    count: int, metrics: tuple[SimMetric, ...] = DEFAULT_METRICS
) -> list[SimDevice]:
    """`count` devices SIM-0000... reporting `metrics` (no catalogue knows them)."""
    return [SimDevice(f"{GENERATED_PREFIX}-{i:04d}", metrics) for i in range(count)]


def devices_from_catalog(
    snapshot: catalog.Snapshot, serials: Sequence[str] | None = None
) -> list[SimDevice]:
    """Active devices of the catalogue with their bound metrics.

    With `serials`, those devices in that order (ones the catalogue lacks are left out);
    without, the seed's devices that the catalogue has.
    """
    wanted = list(serials) if serials is not None else [d.serial_id for d in seed_data.DEVICES]
    found = []
    for serial in wanted:
        device = snapshot.devices.get(serial)
        if device is None or not device.is_active or not device.bindings:
            continue
        metrics = tuple(
            SimMetric(b.metric_type, b.data_type)
            for b in sorted(device.bindings.values(), key=lambda b: b.device_metric_id)
        )
        found.append(SimDevice(serial, metrics))
    return found


def load_catalog(settings: Settings) -> catalog.Snapshot | None:
    """The device catalogue of the configured database, or None when it does not answer."""
    conninfo = psycopg.conninfo.make_conninfo(
        db.conninfo(settings, "simulate"), connect_timeout=DB_CONNECT_TIMEOUT
    )
    try:
        with psycopg.connect(conninfo, autocommit=True) as conn:
            return catalog.load(conn)
    except psycopg.Error as exc:
        log.info("simulate_no_catalog", error=str(exc).strip().splitlines()[0][:300])
        return None


def choose_devices(
    settings: Settings, serials: Sequence[str] | None, device_count: int
) -> tuple[list[SimDevice], str]:
    """The devices to simulate and where they came from (for the log)."""
    snapshot = load_catalog(settings)
    if serials:
        known = devices_from_catalog(snapshot, serials) if snapshot else []
        by_serial = {d.serial_id: d for d in known}
        chosen = [by_serial.get(s) or SimDevice(s, DEFAULT_METRICS) for s in serials]
        return chosen, "command line"
    if snapshot is not None:
        found = devices_from_catalog(snapshot)
        if found:
            return found, "database"
        log.info(
            "simulate_no_seed_devices",
            hint="the database has none of the seed's devices (`iothub seed`); generated "
            "serials will be rejected as unknown_device unless they exist",
        )
    return generated_devices(device_count), "generated"
