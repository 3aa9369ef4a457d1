"""One plain value per topic (ESPHome, Homie, Shelly Gen1): the payload is the value.

The text is a number when it is a JSON number, a boolean when it is ``true``/``false`` (Homie's
booleans), and a string otherwise, after the source's ``values`` table (``ON = true``). So
``nan`` and ``None`` (what ESPHome and others print for a failed read) are strings, which a
numeric metric refuses as type_mismatch: never a zero, never a silent drop.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import datetime

from config.sources import Source
from ingestor import payload
from ingestor.payload import Extracted, Limits, ParseResult, Rejection, finish
from ingestor.reasons import Reason

_JSON_NUMBER = re.compile(r"-?(?:0|[1-9]\d*)(?:\.\d+)?(?:[eE][+-]?\d+)?", re.ASCII)
_BOOLEANS = {"true": True, "false": False}
_MAX_NUMBER_CHARS = 400  # longer digit strings are no measurement; they stay strings


def decode(
    source: Source, fields: Mapping[str, str], data: bytes, received_at: datetime, limits: Limits
) -> ParseResult:
    """One reading of the topic's metric at receipt time."""
    serial = source.serial_for(fields)
    metric = source.metric_for(fields) or ""
    if len(data) > limits.max_payload_bytes:
        detail = f"payload is {len(data)} bytes (limit {limits.max_payload_bytes})"
        return ParseResult((), (Rejection(Reason.payload_too_large, detail, serial),))
    try:
        text = data.decode("utf-8").strip()
    except UnicodeDecodeError as exc:
        detail = f"payload is not valid UTF-8: {exc.reason} at byte {exc.start}"
        return ParseResult((), (Rejection(Reason.bad_json, detail, serial),))
    if not text:
        return ParseResult((), (Rejection(Reason.bad_json, "payload is empty", serial),))
    value: object
    if text in source.values:
        value = source.values[text]
    elif len(text) <= _MAX_NUMBER_CHARS and _JSON_NUMBER.fullmatch(text):
        # The native parser's number rules (exact Decimal where a double is not exact).
        value = payload.parse_number(text)
    elif text in _BOOLEANS:
        value = _BOOLEANS[text]
    else:
        value = text
    return finish(serial, [Extracted(metric, value)], received_at, limits)
