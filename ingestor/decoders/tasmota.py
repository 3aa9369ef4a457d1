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
    units: dict[str, str] = {}
    for key, value in document.items():
        if key.endswith(_UNIT_SUFFIX) and key != _UNIT_SUFFIX and isinstance(value, str):
            units[key.removesuffix(_UNIT_SUFFIX)] = value
    body = {
        key: value
        for key, value in document.items()
        if key not in _TIME_KEYS and key.removesuffix(_UNIT_SUFFIX) not in units
    }
    found = base.readings(source, base.flatten(body), ts, lambda key: _unit_of(key, units))
    return finish(serial, found, received_at, limits)


def _unit_of(key: str, units: Mapping[str, str]) -> str | None:
    leaf = key.rsplit(".", 1)[-1]
    for stem, unit in units.items():
        if stem in leaf or leaf in _ALSO.get(stem, ()):
            return unit
    return None
