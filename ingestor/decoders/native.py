"""The native format (DESIGN section 3) on a source's own topic."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime

from config.sources import Source
from ingestor import payload
from ingestor.payload import Limits, ParseResult


def decode(
    source: Source, fields: Mapping[str, str], data: bytes, received_at: datetime, limits: Limits
) -> ParseResult:
    """A native message; ``serial`` (when set) plays the part of the per-device topic's serial."""
    return payload.parse_message(data, source.serial_for(fields), received_at, limits)
