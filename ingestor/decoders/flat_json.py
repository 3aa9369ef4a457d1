"""A flat JSON object of name to value (Zigbee2MQTT, Shelly Gen2, OwnTracks).

Nested objects are flattened with "." below ``root``. A ``null`` value is no reading and no
rejection: Shelly's NotifyStatus sends ``null`` for a key that vanished, Zigbee2MQTT for an
attribute it has not seen yet. ``time_field`` is read from the top of the message and is never a
reading itself; without it (or when it is absent) the reading's time is its receipt.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime

from config.sources import Source
from ingestor.decoders import base
from ingestor.payload import Limits, ParseResult, Rejection, finish
from ingestor.reasons import Reason


def decode(
    source: Source, fields: Mapping[str, str], data: bytes, received_at: datetime, limits: Limits
) -> ParseResult:
    """Readings of every non-null value below ``root`` that include/exclude keep."""
    serial = source.serial_for(fields)
    document = base.json_object(data, serial, limits)
    if isinstance(document, ParseResult):
        return document
    values = base.at_path(document, source.root) if source.root else document
    if not isinstance(values, Mapping):
        where = ".".join(source.root)
        detail = f"no object at root {where!r} of the message"
        return ParseResult((), (Rejection(Reason.bad_schema, detail, serial),))
    ts: datetime | str | None = None
    time_key: str | None = None
    if source.time_field:
        raw = base.at_path(document, source.time_field)
        if raw is not None:
            ts = base.parse_time(raw, source.time_zone, ".".join(source.time_field))
        # The time field below root is the readings' time, not a reading of its own.
        if source.time_field[: len(source.root)] == source.root:
            time_key = ".".join(source.time_field[len(source.root) :])
    found = base.readings(source, base.flatten(values), ts, skip_nulls=True, skip_key=time_key)
    return finish(serial, found, received_at, limits)
