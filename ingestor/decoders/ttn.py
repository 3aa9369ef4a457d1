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
from typing import Any, Final, NamedTuple

import msgspec

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
    fast = _fast_parts(data, serial, limits)
    parts = _strict_parts(data, serial, limits) if fast is None else fast
    return _readings(source, serial, parts, received_at, limits)


class _Parts(NamedTuple):
    """What the decoder reads of an uplink: ``decoded_payload`` (never None) and the values of
    ``uplink_message.received_at`` and ``received_at`` (None when absent)."""

    decoded: Any
    uplink_time: Any
    message_time: Any


def _readings(
    source: Source,
    serial: str | None,
    parts: _Parts | ParseResult,
    received_at: datetime,
    limits: Limits,
) -> ParseResult:
    if isinstance(parts, ParseResult):
        return parts
    decoded = parts.decoded
    if not isinstance(decoded, Mapping):
        # A formatter may return any JSON; only an object names its values.
        return _bad(f"{UPLINK}.decoded_payload is not an object of name to value", serial)
    if not decoded:
        # The Things Stack omits an empty object; sent anyway, it holds no reading to store.
        return _bad(
            f"{UPLINK}.decoded_payload is empty: the payload formatter returned no values", serial
        )
    ts = _time(parts)
    found = base.readings(source, base.flatten(decoded), ts, skip_nulls=True)
    return finish(serial, found, received_at, limits)


def _strict_parts(data: bytes, serial: str | None, limits: Limits) -> _Parts | ParseResult:
    """The parts read from the whole message parsed as every JSON payload is (load_json)."""
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
    return _Parts(decoded, uplink.get("received_at"), document.get("received_at"))


# The fast path. About 1 KB of an uplink is LoRaWAN metadata the decoder never reads (ids,
# rx_metadata, settings); parsed with load_json's hooks (duplicate keys, exact numbers) it cost
# 7 us a message, most of a ttn reading's cost over a native one (docs/performance.md). msgspec
# parses the envelope into these two structs in C, skipping every other field while checking
# its JSON syntax, and hands decoded_payload and the two times over as raw JSON text, which
# load_json then parses under the usual rules.
class _Uplink(msgspec.Struct):
    decoded_payload: msgspec.Raw = msgspec.Raw()  # empty: absent
    received_at: msgspec.Raw = msgspec.Raw()


class _Envelope(msgspec.Struct):
    uplink_message: _Uplink | None = None
    received_at: msgspec.Raw = msgspec.Raw()


_ENVELOPE: Final = msgspec.json.Decoder(_Envelope)


def _fast_parts(data: bytes, serial: str | None, limits: Limits) -> _Parts | None:
    """The parts of an ordinary uplink without parsing what the decoder does not read, or None
    when the message needs the strict path (``_strict_parts``) to be read or refused.

    None for anything unusual: too large, a byte order mark, not UTF-8, a backslash anywhere,
    JSON msgspec refuses, no uplink_message object or no decoded_payload, a read key that may be
    there twice, a part that load_json refuses. The strict path then gives the verdict and its
    reason, so both paths agree wherever this one answers. What it does not check is JSON's
    rule on duplicate keys inside the skipped metadata (a key twice in rx_metadata): those are
    stored as the strict path would store them had the key been once (docs/sources.md).
    """
    if len(data) > limits.max_payload_bytes or b"\\" in data:
        return None
    try:
        data.decode("utf-8")  # msgspec does not check the UTF-8 of what it skips
        envelope = _ENVELOPE.decode(data)
    except (UnicodeDecodeError, msgspec.DecodeError, RecursionError):
        return None
    uplink = envelope.uplink_message
    if uplink is None or not uplink.decoded_payload:
        return None
    # msgspec keeps the last of a key sent twice. Without a backslash every occurrence of the
    # text "received_at" (quotes included) is a JSON string of that value; if there are no more
    # of them than the places the key was found, none of the keys read appears twice.
    times = (1 if uplink.received_at else 0) + (1 if envelope.received_at else 0)
    if (
        data.count(b'"uplink_message"') != 1
        or data.count(b'"decoded_payload"') != 1
        or data.count(b'"received_at"') != times
    ):
        return None
    decoded = _value(uplink.decoded_payload, serial, limits)
    uplink_time = _value(uplink.received_at, serial, limits)
    message_time = _value(envelope.received_at, serial, limits)
    if decoded is None or any(v is _REFUSED for v in (decoded, uplink_time, message_time)):
        return None
    return _Parts(decoded, uplink_time, message_time)


_REFUSED: Final = object()


def _value(raw: msgspec.Raw, serial: str | None, limits: Limits) -> Any:
    """A raw part's value under load_json's rules; None when absent, _REFUSED when refused."""
    if not raw:
        return None
    text = bytes(raw)
    if text[:1] == b'"':
        return text[1:-1].decode()  # a JSON string without escapes is its own text
    value = payload.load_json(text, serial, limits)
    return _REFUSED if isinstance(value, ParseResult) else value


def _time(parts: _Parts) -> datetime | str | None:
    # The Things Stack writes UTC with "Z": the native format's RFC 3339 rule, no local times.
    if parts.uplink_time is not None:
        return payload.parse_time(parts.uplink_time, f"{UPLINK}.received_at")
    if parts.message_time is not None:
        return payload.parse_time(parts.message_time, "received_at")
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
