"""The Things Stack (v3) application uplinks, as its MQTT server publishes them.

The readings are the keys of ``uplink_message.decoded_payload`` (what the device's payload
formatter made of ``frm_payload``), nested objects flattened with "." as in flat_json; a ``null``
is no reading. iothub never decodes ``frm_payload`` itself: an uplink without
``decoded_payload`` (no formatter, a formatter that failed or returned nothing: The Things Stack
omits empty fields) is bad_schema with that reason, never a silent drop.

A message carries three times: ``received_at`` (the Application Server's), ``uplink_message.
received_at`` (the Network Server's receipt, the earliest time every uplink has) and the
gateways' ``rx_metadata[].time`` (absent or wrong on gateways without GPS). The readings' time is
``uplink_message.received_at``, else ``received_at``, else the receipt by iothub. Its nanosecond
fraction is cut to microseconds, as every RFC 3339 time is (``payload.parse_time``).

The other messages of The Things Stack's topics (``join``, ``down/*``, ``service/data``,
``location/solved``) carry no uplink; on a source whose topic reaches them they are ignored like
``exclude_topics`` (no reading, no rejection). docs/sources.md has the worked example.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any, Final

from config.sources import Source
from ingestor import payload
from ingestor.decoders import base
from ingestor.payload import Limits, ParseResult, Rejection, finish, storable
from ingestor.reasons import Reason

UPLINK: Final = "uplink_message"
# Top-level keys of The Things Stack's other application messages (its "Data Formats" page and
# the MQTT server's topics): events about the device, not readings.
NOT_UPLINKS: Final = frozenset(
    {
        "join_accept",
        "downlink_ack",
        "downlink_nack",
        "downlink_queued",
        "downlink_sent",
        "downlink_failed",
        "downlinks",  # a down/push or down/replace body, if a topic reaches those
        "service_data",
        "location_solved",
    }
)
_NOTHING: Final = ParseResult((), ())


def decode(
    source: Source, fields: Mapping[str, str], data: bytes, received_at: datetime, limits: Limits
) -> ParseResult:
    """Readings of ``decoded_payload`` at the Network Server's receipt of the uplink."""
    serial = source.serial_for(fields)
    document = base.json_object(data, serial, limits)
    if isinstance(document, ParseResult):
        return document
    uplink = document.get(UPLINK)
    if uplink is None:
        if not NOT_UPLINKS.isdisjoint(document):
            return _NOTHING
        return _bad(f"no {UPLINK} in the message (not a The Things Stack uplink)", serial)
    if not isinstance(uplink, Mapping):
        return _bad(f"{UPLINK} is not an object", serial)
    decoded = uplink.get("decoded_payload")
    if decoded is None:
        return _bad(_undecoded(uplink), serial)
    if not isinstance(decoded, Mapping):
        # A formatter may return any JSON; only an object names its values.
        return _bad(f"{UPLINK}.decoded_payload is not an object of name to value", serial)
    if not decoded:
        # The Things Stack omits an empty object; sent anyway, it holds no reading to store.
        return _bad(
            f"{UPLINK}.decoded_payload is empty: the payload formatter returned no values", serial
        )
    ts = _time(uplink, document)
    found = base.readings(source, base.flatten(decoded), ts, skip_nulls=True)
    return finish(serial, found, received_at, limits)


def _time(uplink: Mapping[str, Any], document: Mapping[str, Any]) -> datetime | str | None:
    # The Things Stack writes UTC with "Z": the native format's RFC 3339 rule, no local times.
    raw = uplink.get("received_at")
    if raw is not None:
        return payload.parse_time(raw, f"{UPLINK}.received_at")
    raw = document.get("received_at")
    if raw is not None:
        return payload.parse_time(raw, "received_at")
    return None


def _undecoded(uplink: Mapping[str, Any]) -> str:
    if uplink.get("frm_payload") is None:
        # f_port 0 (MAC commands only) or an empty frame: The Things Stack omits both fields.
        return f"{UPLINK} has no frm_payload and no decoded_payload: no application data"
    return (
        f"{UPLINK} has no decoded_payload: set a payload formatter for the device in The Things "
        "Stack (iothub does not decode frm_payload)"
    )


def _bad(detail: str, serial: str | None) -> ParseResult:
    return ParseResult((), (Rejection(Reason.bad_schema, detail, storable(serial)),))
