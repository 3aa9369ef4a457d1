"""SenML JSON packs (RFC 8428): an array of records with base fields that carry forward.

Each record's base fields (``bn``, ``bt``, ``bu``, ``bv``, ``bver``) apply to it and to every
later record until one changes them (RFC 8428 section 4.1). The device is the base name with a
trailing ``:`` or ``/`` dropped (``urn:dev:ow:10e2073a01080063:``), or the source's ``serial``
(which may use ``{bn}``); the metric is ``n``, else the unit. Time is ``bt + t`` in seconds;
below 2**28 it is relative to now (section 4.5.3: "values less than 2**28 represent time
relative to the current time"), so ``t: -5`` is five seconds before receipt.

``v`` (plus ``bv``), ``vs`` and ``vb`` are readings; ``vd`` (binary data) and ``s`` (a sum) are
not stored: such a record is bad_schema with the reason, never dropped. A record with a field
ending in ``_`` (must-understand, section 4.4) or a pack with ``bver`` above 10 is refused.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from config.sources import Source
from ingestor import payload
from ingestor.decoders import base
from ingestor.payload import Extracted, Limits, ParseResult, Rejection, finish
from ingestor.reasons import Reason

RELATIVE_BELOW = 2**28  # seconds: smaller times are relative to now (RFC 8428 section 4.5.3)
SENML_VERSION = 10  # the version of RFC 8428; a pack declaring a higher one is refused
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_NUMBER = int | float | Decimal  # built once: a union in isinstance() is built on every call
_BASE = ("bn", "bt", "bu", "bv", "bs", "bver")
_KNOWN = frozenset({*_BASE, "n", "u", "v", "vs", "vb", "vd", "s", "t", "ut"})


def decode(
    source: Source, fields: Mapping[str, str], data: bytes, received_at: datetime, limits: Limits
) -> ParseResult:
    """Readings of every record, grouped by device; a bad record rejects that record only."""
    hint = source.serial_for({**fields, "bn": ""}) if source.serial else None
    document = payload.load_json(data, hint, limits)
    if isinstance(document, ParseResult):
        return document
    if not isinstance(document, list) or not document:
        detail = "payload is not a SenML pack (a non-empty JSON array of records)"
        return ParseResult((), (Rejection(Reason.bad_schema, detail, hint),))
    now = received_at.astimezone(UTC)
    context: dict[str, Any] = {}
    by_device: dict[str | None, list[Extracted]] = {}
    problems: dict[str | None, list[Rejection]] = {}
    for index, record in enumerate(document):
        where = f"record[{index}]: "
        if not isinstance(record, dict):
            problems.setdefault(hint, []).append(
                Rejection(Reason.bad_schema, f"{where}is not an object", hint)
            )
            continue
        context.update({key: record[key] for key in _BASE if key in record})
        serial = serial_of(source, fields, context.get("bn"))
        problem = _record_problem(record, context)
        if problem is not None:
            problems.setdefault(serial, []).append(
                Rejection(Reason.bad_schema, f"{where}{problem}", payload.storable(serial))
            )
            continue
        extracted = _reading(record, context, now, where)
        if isinstance(extracted, Rejection):
            problems.setdefault(serial, []).append(
                Rejection(extracted.reason, extracted.detail, payload.storable(serial))
            )
            continue
        if source.keeps(extracted.metric):
            metric = source.rename.get(extracted.metric, extracted.metric)
            by_device.setdefault(serial, []).append(
                extracted._replace(metric=metric, value=base.mapped(source, extracted.value))
            )
    readings: list[payload.RawReading] = []
    rejections: list[Rejection] = []
    for serial in {**problems, **by_device}:
        if serial is None and not by_device.get(serial):
            rejections.extend(problems.get(serial, []))
            continue
        parsed = finish(
            serial, by_device.get(serial, []), received_at, limits, tuple(problems.get(serial, []))
        )
        readings.extend(parsed.readings)
        rejections.extend(parsed.rejections)
    return ParseResult(tuple(readings), tuple(rejections))


def serial_of(source: Source, fields: Mapping[str, str], bn: object) -> str | None:
    """The device of a record under base name ``bn`` (what the receiving process routes by)."""
    name = bn.rstrip(":/") if isinstance(bn, str) else ""
    if source.serial is not None:
        return source.serial_for({**fields, "bn": name})
    return name or None


def _record_problem(record: Mapping[str, Any], context: Mapping[str, Any]) -> str | None:
    must_understand = sorted(k for k in record if k.endswith("_"))
    if must_understand:
        return f"must-understand field(s) {', '.join(must_understand)} are not supported"
    version = context.get("bver", SENML_VERSION)
    if type(version) is not int or version > SENML_VERSION:
        return f"bver {version!r} is not supported (this service reads SenML version 10)"
    if "vd" in record:
        return "vd (a data value) is not supported; send v, vs or vb"
    if "s" in record and not any(k in record for k in ("v", "vs", "vb")):
        return "s (a sum) alone is not supported; send v, vs or vb"
    for key, kind in (("bn", str), ("bu", str), ("n", str), ("u", str)):
        if key in record and not isinstance(record[key], kind):
            return f"{key} must be a string"
    for key in ("bt", "t", "bv"):
        if key in context or key in record:
            value = record.get(key, context.get(key))
            if isinstance(value, bool) or not isinstance(value, _NUMBER):
                return f"{key} must be a number"
    present = [k for k in ("v", "vs", "vb") if k in record]
    if len(present) != 1:
        return "a record needs exactly one of v, vs and vb"
    return None


def _reading(
    record: Mapping[str, Any], context: Mapping[str, Any], now: datetime, where: str
) -> Extracted | Rejection:
    name = record.get("n")
    unit = record.get("u", context.get("bu"))
    metric = name if isinstance(name, str) and name else unit
    if not isinstance(metric, str) or not metric:
        return Rejection(Reason.bad_schema, f"{where}a record needs n (or a unit to name it)")
    value: object
    if "v" in record:
        value = record["v"]
        if isinstance(value, bool) or not isinstance(value, _NUMBER):
            return Rejection(Reason.type_mismatch, f"{where}v must be a number")
        if "bv" in context:
            value = _add(context["bv"], value)
    elif "vs" in record:
        value = record["vs"]
        if not isinstance(value, str):
            return Rejection(Reason.type_mismatch, f"{where}vs must be a string")
    else:
        value = record["vb"]
        if not isinstance(value, bool):
            return Rejection(Reason.type_mismatch, f"{where}vb must be a boolean")
    # Decimal of each number's shortest text: bt 1764582504.429 is .429000 s exactly, where
    # float arithmetic would give .428999 (the native ms epoch is exact too).
    seconds = Decimal(str(context.get("bt", 0))) + Decimal(str(record.get("t", 0)))
    try:
        delta = timedelta(microseconds=round(seconds * 1_000_000))
        ts = now + delta if abs(seconds) < RELATIVE_BELOW else _EPOCH + delta
    except (OverflowError, ValueError, ArithmeticError):
        return Rejection(Reason.bad_timestamp, f"{where}time {seconds} is out of range")
    return Extracted(metric, value, ts, unit if isinstance(unit, str) else None)


def _add(left: object, right: object) -> int | float | Decimal:
    if isinstance(left, Decimal) or isinstance(right, Decimal):
        return Decimal(str(left)) + Decimal(str(right))
    assert isinstance(left, int | float) and isinstance(right, int | float)
    return left + right
