"""Tasmota's ``tele/<topic>/SENSOR``, ``STATE`` and ``stat/<topic>/RESULT`` JSON.

``Epoch`` (seconds, with ``Time 4``/``SetOption`` builds that send it) wins over ``Time``, which
by default is the device's local wall clock without an offset, read in the source's
``time_zone``. ``*Unit`` keys at the top (``TempUnit``, ``PressureUnit``, ``SpeedUnit``) are the
units of the readings whose name contains their stem, never readings themselves. Nested sensor
objects flatten to ``BME280.Temperature`` and ``DS18B20-1.Temperature``.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

from config.sources import Source
from ingestor.decoders import base
from ingestor.payload import Limits, ParseResult, finish

_TIME_KEYS = frozenset({"Time", "Epoch"})
_UNIT_SUFFIX = "Unit"
# A unit's stem and the reading names it applies to besides those containing the stem.
_ALSO = {"Temp": ("DewPoint",)}


def decode(
    source: Source, fields: Mapping[str, str], data: bytes, received_at: datetime, limits: Limits
) -> ParseResult:
    """Readings of every value but the time and unit keys, at the message's time."""
    serial = source.serial_for(fields)
    document = base.json_object(data, serial, limits)
    if isinstance(document, ParseResult):
        return document
    ts: datetime | str | None = None
    if document.get("Epoch") is not None:
        ts = base.parse_time(document["Epoch"], None, "Epoch")
    elif document.get("Time") is not None:
        ts = base.parse_time(document["Time"], source.time_zone, "Time")
    units = {
        key[: -len(_UNIT_SUFFIX)]: value
        for key, value in document.items()
        if key.endswith(_UNIT_SUFFIX) and key != _UNIT_SUFFIX and isinstance(value, str)
    }
    pairs: list[tuple[str, Any]] = []
    for key, value in document.items():
        if key in _TIME_KEYS or (units and key.removesuffix(_UNIT_SUFFIX) in units):
            continue
        if isinstance(value, dict) and value:
            base.flatten(value, f"{key}.", 1, pairs)
        else:
            pairs.append((key, value))
    unit_of = _units_of(pairs, units).get if units else None
    return finish(serial, base.readings(source, pairs, ts, unit_of), received_at, limits)


def _units_of(pairs: list[tuple[str, Any]], units: Mapping[str, str]) -> dict[str, str]:
    """The unit of each key that has one, by the stem its last part contains (in one loop per
    message, as the readings are few and the stems fewer)."""
    found: dict[str, str] = {}
    for key, _ in pairs:
        leaf = key.rpartition(".")[2]
        for stem, unit in units.items():
            if stem in leaf or leaf in _ALSO.get(stem, ()):
                found[key] = unit
                break
    return found
