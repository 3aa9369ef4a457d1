"""Telemetry payloads: bytes from MQTT to readings and rejections (pure: no I/O, no clock).

``parse_message`` turns one MQTT payload into ``RawReading`` values (device, metric, time, value)
and ``Rejection`` values with a stable ``Reason``; it does everything that needs no database.
After the catalogue has resolved a reading's metric, ``check_value`` checks the value against the
metric's ``data_type`` and ``encode_value`` renders the ``telemetries.value_jsonb`` text.

Device input never makes these functions raise: every failure is a rejection, scoped as narrowly
as possible (a bad metric rejects that metric only, a bad array element that element only).

Decisions a device author may need to know (docs/mqtt.md states them):

- Strict UTF-8 JSON (RFC 8259). ``NaN``/``Infinity`` and duplicate keys are bad_json: a duplicate
  key is ambiguous, and whichever value Python dropped would vanish without a trace.
- A leading UTF-8 byte order mark is accepted and ignored (RFC 8259 §8.1 allows parsers to): some
  Windows tool chains add it, and it can never be confused with content.
- Unknown keys are bad_schema, in a message and in a metric's object form: a typo such as
  ``"timestamp"`` for ``"ts"`` would otherwise store the readings at the wrong time without a trace.
  ``schema_version`` exists so that the format can grow.
- An optional key whose value is ``null`` counts as absent (``"ts": null`` means "receipt time").
- Numbers are never coerced from strings, nor booleans from 0/1: the value's JSON type must fit.
- The same metric (names ignore case, like citext) twice at the same ts in one message: the second
  is bad_schema, since the telemetries unique key would otherwise drop it without a trace.
- Serials, metric names and units are 1-255 characters without NUL (devices.serial_id is
  varchar(255)); an empty serial level in the topic (``devices//telemetry``) is bad_schema.
- Array elements are named ``array[i]`` (0-based) in rejection details.
- Numbers are kept exactly: a JSON number that no double holds exactly (``1e-400``, 30 digits)
  is a Decimal of its text, bounded by ``Limits`` (value_too_large beyond). ``-0`` is stored as
  0 (``numeric`` has no negative zero). Rules get the nearest double (``rule_value``).
- Text times are RFC 3339 (``t``/``z`` in either case, a space for the ``T``, fractions cut to
  microseconds, 23:59:60 UTC as 23:59:59.999999); other ISO 8601 forms are bad_timestamp.
  docs/operations.md ("Numbers and times in payloads") lists the forms.
"""

from __future__ import annotations

import decimal
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import TYPE_CHECKING, Any, Final, NamedTuple, TypeAlias

from ingestor.reasons import Reason
from schema.types import DATA_TYPES, DataType

if TYPE_CHECKING:  # the annotation only: this module stays free of the database side
    from ingestor.aliases import Birth

# Decimal: a JSON number that no double holds exactly (see _parse_float); int and float otherwise.
Value: TypeAlias = float | int | Decimal | bool | str

MAX_PAYLOAD_BYTES = 256 * 1024  # bytes of one MQTT payload
MAX_READINGS_PER_MESSAGE = 10_000  # readings (or rejections) one message may produce
MAX_STR_LEN = 1024  # characters (code points) of a str value
MAX_ABS_NUMERIC = 1e100  # magnitude of a numeric value; see Limits for why
MAX_NUMERIC_DIGITS = 100  # significant digits of a numeric value kept exactly
MAX_NUMERIC_SCALE = 1000  # digits after the decimal point (1e-1000 is the smallest step kept)
FUTURE_TOLERANCE = timedelta(minutes=5)  # how far ahead of receipt a ts may be
MAX_AGE = timedelta(days=7)  # how far back a device may backfill
MAX_NAME_LEN = (
    255  # characters of a serial_id, metric name or unit (devices.serial_id varchar(255))
)
EPOCH_MS_ABOVE = 1e11  # epoch numbers above this are milliseconds (1e11 s is the year 5138)
SCHEMA_VERSION = 1
# Detail strings carried to logs and rejected_messages never quote more than this of device text.
_SHOW_CHARS = 60  # characters
_MAX_TS_TEXT = 64  # characters; longer ts strings are not ISO 8601 and are not parsed at all
# Enough digits for every bounded epoch in microseconds; an explicit context, not the thread's.
_DECIMAL = decimal.Context(prec=60, rounding=decimal.ROUND_HALF_EVEN)
_MAX_EPOCH_NUMBER = Decimal("1e20")  # beyond datetime's range in seconds and in milliseconds
# RFC 3339 date-time: full date, "T" (or "t", or a space), time with seconds, optional fraction
# of any length, "Z"/"z" or a numeric offset with a colon. The fields before the fraction have
# fixed widths, so the second is text[_SECOND] (60: leap): a slice is cheaper than a group.
_RFC3339 = re.compile(
    r"\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(?:\.\d+)?(?:[Zz]|[+-]\d{2}:\d{2})", re.ASCII
)
_SECOND = slice(17, 19)
# Integers with more digits than this are beyond any float (about 1.8e308, 309 digits), so they can
# only ever be value_too_large or bad_timestamp: they become +-inf instead of an int. That avoids
# CPython's ValueError beyond 4300 digits (and its quadratic conversion) and keeps the rejection
# local to the one metric. 400 also stays under the lowest int_max_str_digits setting (640).
_MAX_INT_DIGITS = 400

_MESSAGE_KEYS = frozenset({"schema_version", "device", "ts", "metrics"})
_METRIC_KEYS = frozenset({"value", "ts", "unit"})
_BOM = b"\xef\xbb\xbf"
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# PostgreSQL text and jsonb refuse NUL; a lone surrogate (from a "\ud800" escape) is not Unicode
# and fails UTF-8 encoding on the way to the database.
# isinstance() against a union built once: `int | float` written in the call builds the union
# on every call, twice the cost of the check itself (0.29 against 0.14 µs), per reading here.
_CONTAINER: Final = (list, dict)
_INT_OR_FLOAT = int | float
_UNSTORABLE = re.compile(r"[\x00\ud800-\udfff]")
_NUL_PROBLEM = "contains NUL (U+0000), which PostgreSQL cannot store"
_DURATION_UNITS = (("y", 365 * 86_400), ("d", 86_400), ("h", 3_600), ("min", 60), ("s", 1))
INTERNAL_ERROR = "internal error in iothub's payload validation (please report): "


@dataclass(frozen=True)
class Limits:
    """Bounds on what one message may contain; the defaults are the documented ones.

    ``max_abs_numeric``: PostgreSQL's ``numeric`` would store far larger numbers, but magnitudes
    beyond 1e100 are never real measurements (they are overflow sentinels or corrupt frames), and
    keeping values well inside the double range keeps the rule engine's arithmetic (deltas, rates
    per minute, products with durations) finite.

    ``max_numeric_digits`` / ``max_numeric_scale``: a number is stored exactly as sent (the
    ``numeric`` column has arbitrary precision), so its length is bounded like a string's: at most
    this many significant digits, and no digit further right than this many places after the
    decimal point (PostgreSQL's own limit is 16383). Beyond either it is value_too_large.
    """

    max_payload_bytes: int = MAX_PAYLOAD_BYTES
    max_readings_per_message: int = MAX_READINGS_PER_MESSAGE
    max_str_len: int = MAX_STR_LEN
    max_abs_numeric: float = MAX_ABS_NUMERIC
    max_numeric_digits: int = MAX_NUMERIC_DIGITS
    max_numeric_scale: int = MAX_NUMERIC_SCALE
    future_tolerance: timedelta = FUTURE_TOLERANCE
    max_age: timedelta = MAX_AGE

    def __post_init__(self) -> None:
        for name in (
            "max_payload_bytes",
            "max_readings_per_message",
            "max_str_len",
            "max_numeric_digits",
            "max_numeric_scale",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if not self.max_abs_numeric > 0:
            raise ValueError("max_abs_numeric must be positive")
        if self.future_tolerance < timedelta(0) or self.max_age <= timedelta(0):
            raise ValueError("future_tolerance must be >= 0 and max_age > 0")


class RawReading(NamedTuple):
    """One (device, metric, ts, value) from a message, before the catalogue lookup. A
    NamedTuple: one is made per reading, at a fifth of a frozen dataclass's cost."""

    serial_id: str
    metric: str  # as sent; the catalogue's metric_type is citext, so lookups ignore case
    ts: datetime  # aware, UTC
    value: Value
    unit: str | None


class Rejection(NamedTuple):
    """A message, array element or reading that will not be stored, and why. A NamedTuple:
    one is made per rejected reading, at a fraction of a frozen dataclass's cost."""

    reason: Reason
    detail: str  # one line for operators; device text in it is quoted and truncated
    # Set only when storable (non-empty, <= 255 characters, no NUL): they go to table columns.
    serial_id: str | None = None
    metric: str | None = None

    @classmethod
    def for_reading(cls, reading: RawReading, reason: Reason, detail: str) -> Rejection:
        """A rejection of ``reading`` found after parsing (catalogue lookup, check_value)."""
        return cls(
            reason, f"metric {_show(reading.metric)}: {detail}", reading.serial_id, reading.metric
        )


class ParseResult(NamedTuple):
    """What one MQTT message yielded: readings to resolve and store, and rejections. A
    NamedTuple: one is made per message, at a fraction of a frozen dataclass's cost."""

    readings: tuple[RawReading, ...]
    rejections: tuple[Rejection, ...]
    # Sparkplug B births in the message: alias state for ``batch.prepare`` and the writer.
    births: tuple[Birth, ...] = ()


class _Refused(ValueError):
    """The JSON text is well-formed but uses something this service refuses."""


def _refuse_constant(name: str) -> Any:
    raise _Refused(f"{name} is not a JSON number")


def _parse_int(text: str) -> int | float:
    if len(text) > _MAX_INT_DIGITS:
        return -math.inf if text[0] == "-" else math.inf
    return int(text)


def _parse_float(text: str) -> float | Decimal:
    """A JSON number with a fraction or exponent: a float when it holds the number exactly.

    "Exactly" means the float's shortest repr has the same decimal value as the text, so the
    stored jsonb text (the float's repr) is the number the device sent. Otherwise (more digits
    than a double keeps, ``1e-400`` that would underflow to 0, ``1e400`` that would overflow) it
    is a Decimal of the text, exact by construction; check_value bounds its size. The common case
    costs one float() and one string comparison.
    """
    value = float(text)
    if repr(value) == text:
        return value
    exact = Decimal(text)
    if math.isfinite(value) and Decimal(repr(value)) == exact:
        return value  # 23.50, 1E5, 2.5e1: the same number written differently
    return exact


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _Refused(f"duplicate key {_show(key)}")
            seen.add(key)
    return obj


# One decoder for every message: json.loads(text, **hooks) would build a decoder and scanner per
# call. The hooks cost a Python call per JSON object and per integer (well under a microsecond
# each, and a message has a handful); the text is still scanned in C. Threads may share it: the
# scanner's only state between calls is a key-interning memo, which concurrent use cannot corrupt.
# Measured: about 10 us for the design's 4-metric example, about 1.5 us per reading in bulk.
# parse_float (exact numbers) and the RFC 3339 pattern added 4-15 % to parse_message on the same
# machine (best of 15: design example 17.3 -> 19.0 us, 1 metric 9.0 -> 9.4 us, 100 metrics
# 246 -> 283 us). orjson hands over doubles only; msgspec's float_hook could pass the text, but
# duplicate keys (object_pairs_hook) and the integer-digit bound (parse_int) need these hooks.
# parse_float sees the number's text, which is what keeps a value exact (_parse_float).
_DECODER = json.JSONDecoder(
    parse_int=_parse_int,
    parse_float=_parse_float,
    parse_constant=_refuse_constant,
    object_pairs_hook=_object,
)
# Built once for the same reason; compact and UTF-8 (not \u escapes) like jsonb's own text.
_ENCODER = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":"))
_JSON_WHITESPACE = " \t\n\r"  # RFC 8259's whitespace, what decode() skips around the value


def _decode(text: str) -> Any:
    """``_DECODER.decode(text)``: the same document, or the same exception, 0.35 us sooner.

    decode() matches a whitespace regex before and after the value; most payloads have none
    before it, so raw_decode (the same scanner, from the same index 0) reads them at once.
    A text that starts with whitespace, or has more than whitespace after its value, is left
    to decode(), which skips it or names the error as it always has.
    """
    try:
        document, end = _DECODER.raw_decode(text)
    except json.JSONDecodeError:
        if text[:1] in _JSON_WHITESPACE:
            return _DECODER.decode(text)
        raise  # what decode() raises too: it would have scanned from the same index
    if end != len(text) and text[end:].strip(_JSON_WHITESPACE):
        return _DECODER.decode(text)  # extra data: decode() raises, naming where it starts
    return document


def parse_message(
    payload: bytes, topic_serial: str | None, received_at: datetime, limits: Limits
) -> ParseResult:
    """Parse and validate one MQTT payload; never raises for any payload or topic serial.

    ``topic_serial`` is the serial from a per-device topic, None on the shared topic.
    ``received_at`` (timezone-aware) is the service clock at receipt: the ts of readings that have
    none, and the reference of the time bounds. Values are checked only for being a scalar here;
    their fit to the metric's data_type is ``check_value``'s job once the catalogue is known.
    """
    # A time in UTC (what batch.prepare passes) needs neither the check nor the conversion,
    # which cost about 0.2 us per message.
    if received_at.tzinfo is not UTC:
        if received_at.utcoffset() is None:
            raise ValueError("received_at must be timezone-aware")  # a caller bug
        received_at = received_at.astimezone(UTC)
    try:
        return _parse_message(payload, topic_serial, received_at, limits)
    except Exception as exc:
        # Last line of defence: a bug here must neither stop intake nor lose the message silently.
        # The detail says it is ours; the fuzz test asserts this branch is never taken.
        return _single(
            Reason.bad_schema, f"{INTERNAL_ERROR}{type(exc).__name__}", _storable(topic_serial)
        )


def _parse_message(
    payload: bytes, topic_serial: str | None, now: datetime, limits: Limits
) -> ParseResult:
    if topic_serial is not None:
        problem = _name_problem(topic_serial)
        if problem is not None:
            return _single(
                Reason.bad_schema, f"the topic's serial_id {_show(topic_serial)} {problem}"
            )
    serial_hint = topic_serial  # None, or storable: checked just above
    document = load_json(payload, serial_hint, limits)
    if isinstance(document, ParseResult):
        return document

    elements = _elements(document, serial_hint)
    if isinstance(elements, ParseResult):
        return elements

    # Bound the output (readings + rejections) before building any of it.
    count = 0
    for element, _ in elements:
        metrics = element.get("metrics") if isinstance(element, dict) else None
        count += len(metrics) if isinstance(metrics, dict) and metrics else 1
    if count > limits.max_readings_per_message:
        return _single(
            Reason.payload_too_large,
            f"payload holds {count} readings (limit {limits.max_readings_per_message})",
            serial_hint,
        )

    parser = _MessageParser(topic_serial, now, limits)
    for element, where in elements:
        parser.element(element, where)
    return ParseResult(tuple(parser.readings), tuple(parser.rejections))


def load_json(payload: bytes, serial_hint: str | None, limits: Limits) -> Any | ParseResult:
    """The JSON document of a payload, or the ParseResult rejecting it (never raises).

    Every JSON decoder shares these rules (size first, strict UTF-8, strict JSON, a BOM ignored),
    so that a payload refused as native is refused the same way from any source.
    """
    size = len(payload)
    if size > limits.max_payload_bytes:
        # Checked before decoding so that an oversize payload costs nothing to refuse.
        return _single(
            Reason.payload_too_large,
            f"payload is {size} bytes (limit {limits.max_payload_bytes})",
            serial_hint,
        )
    if payload.startswith(_BOM):
        payload = payload[len(_BOM) :]
    if not payload.strip():
        return _single(Reason.bad_json, "payload is empty", serial_hint)
    try:
        # Explicit UTF-8: json.loads(bytes) would also accept UTF-16 and UTF-32.
        text = payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        return _single(
            Reason.bad_json,
            f"payload is not valid UTF-8: {exc.reason} at byte {exc.start}",
            serial_hint,
        )
    try:
        document = _decode(text)
    except json.JSONDecodeError as exc:
        detail = f"payload is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        return _single(Reason.bad_json, detail, serial_hint)
    except _Refused as exc:
        return _single(Reason.bad_json, f"payload is not valid JSON: {exc}", serial_hint)
    except RecursionError:
        return _single(Reason.bad_json, "payload nests arrays or objects too deeply", serial_hint)
    except ValueError as exc:  # any other refusal of the C scanner; keep the line short
        return _single(
            Reason.bad_json, f"payload is not valid JSON: {_brief(str(exc))}", serial_hint
        )
    return document


# (metric, value, ts, unit) as a decoder found it; Extracted names the fields, and a plain tuple
# of the same four is what a decoder's hot loop builds (several times faster than Extracted).
Found: TypeAlias = tuple[str, object, "datetime | str | None", "str | None"]


class Extracted(NamedTuple):
    """One reading a decoder found: what the message says, before any check.

    ``ts`` is None for "receipt time", or the problem with the message's time as detail text
    (the reading then becomes bad_timestamp); ``value`` is any decoded JSON value. A tuple, not
    a frozen dataclass: one is built per reading, and a tuple builds several times faster.
    """

    metric: str
    value: object
    ts: datetime | str | None = None
    unit: str | None = None


def finish(
    serial: str | None,
    extracted: Sequence[Found],
    received_at: datetime,
    limits: Limits,
    rejections: tuple[Rejection, ...] = (),
) -> ParseResult:
    """Readings and rejections from a decoder's extraction, with the native format's checks.

    Names, scalar values, time bounds and duplicates are checked exactly as for native messages;
    ``rejections`` are the decoder's own (a key it could not read), kept in order before them.
    """
    now = received_at.astimezone(UTC)
    hint = _storable(serial)
    if serial is None or (problem := _name_problem(serial)) is not None:
        what = "no serial_id" if serial is None else f"serial_id {_show(serial)} {problem}"
        return ParseResult(
            (), (*rejections, Rejection(Reason.bad_schema, f"the source gives {what}"))
        )
    if len(extracted) + len(rejections) > limits.max_readings_per_message:
        return _single(
            Reason.payload_too_large,
            f"payload holds {len(extracted) + len(rejections)} readings "
            f"(limit {limits.max_readings_per_message})",
            hint,
        )
    parser = _MessageParser(serial, now, limits)
    parser.rejections.extend(rejections)
    for metric, value, item_ts, unit in extracted:
        problem = _name_problem(metric)
        if problem is not None:
            parser.reject(Reason.bad_schema, f"metric name {_show(metric)} {problem}", serial)
            continue
        if unit is not None and (problem := _name_problem(unit)) is not None:
            parser.reject(
                Reason.bad_schema,
                f"metric {_show(metric)}: unit {_show(unit)} {problem}",
                serial,
                metric,
            )
            continue
        parser.accept(serial, metric, value, now if item_ts is None else item_ts, unit=unit)
    return ParseResult(tuple(parser.readings), tuple(parser.rejections))


def storable(name: str | None) -> str | None:
    """``name`` when a table column may hold it (1-255 characters, no NUL), else None."""
    return _storable(name)


def parse_number(text: str) -> int | float | Decimal:
    """A JSON number's text as the native format keeps it (exact, see ``_parse_float``)."""
    if any(char in text for char in ".eE"):
        return _parse_float(text)
    return _parse_int(text)


def parse_time(raw: object, subject: str) -> datetime | str:
    """A JSON time as the native format reads it (RFC 3339, or epoch s / ms), or the problem."""
    return _parse_ts(raw, subject)


def _elements(document: Any, serial_hint: str | None) -> list[tuple[Any, str]] | ParseResult:
    """The message's elements, each with the prefix of its details; or why it has none."""
    if isinstance(document, dict):
        return [(document, "")]
    if isinstance(document, list):
        if not document:
            return _single(Reason.bad_schema, "payload is an empty array", serial_hint)
        return [(element, f"array[{index}]: ") for index, element in enumerate(document)]
    return _single(
        Reason.bad_schema,
        f"payload is {_kind(document)}; expected an object or an array of objects",
        serial_hint,
    )


class _MessageParser:
    """Accumulates the readings and rejections of one message's elements.

    ``topic_serial`` is None or a storable serial (``_name_problem`` found nothing): its callers
    check it first, and it is not checked again per element.
    """

    def __init__(self, topic_serial: str | None, now: datetime, limits: Limits) -> None:
        self.topic_serial = topic_serial
        self.now = now
        self.limits = limits
        self.readings: list[RawReading] = []
        self.rejections: list[Rejection] = []
        # (serial, lower-cased metric, ts) already seen in this message: a second reading with the
        # same key would be dropped by the telemetries unique key without a trace. lower() mirrors
        # citext for the names devices use.
        self.seen: set[tuple[str, str, datetime]] = set()

    def reject(
        self, reason: Reason, detail: str, serial: str | None, metric: str | None = None
    ) -> None:
        self.rejections.append(Rejection(reason, detail, serial, metric))

    def element(self, obj: Any, where: str) -> None:
        topic_serial = self.topic_serial
        if not isinstance(obj, dict):
            self.reject(
                Reason.bad_schema,
                f"{where}element is {_kind(obj)}; expected an object",
                topic_serial,
            )
            return
        device = obj.get("device")
        hint = topic_serial if topic_serial is not None else _storable(device)

        version = obj.get("schema_version")
        if version is not None and not (type(version) is int and version == SCHEMA_VERSION):
            self.reject(
                Reason.bad_schema,
                f"{where}schema_version {_describe(version)} is not supported "
                f"(this service reads {SCHEMA_VERSION})",
                hint,
            )
            return
        # issuperset first: building the difference set costs more than the test (95 against
        # 38 ns), and a message mostly has no unknown key.
        if not _MESSAGE_KEYS.issuperset(obj):
            unknown = obj.keys() - _MESSAGE_KEYS
            self.reject(
                Reason.bad_schema,
                f"{where}unknown key(s) {_show_keys(unknown)}; "
                "a message has schema_version, device, ts and metrics",
                hint,
            )
            return

        if device is None:
            if topic_serial is None:
                self.reject(
                    Reason.bad_schema, f"{where}device is required on the shared topic", None
                )
                return
            serial = topic_serial
        elif not isinstance(device, str):
            self.reject(
                Reason.bad_schema, f"{where}device is {_kind(device)}; expected a string", hint
            )
            return
        elif (problem := _name_problem(device)) is not None:
            self.reject(Reason.bad_schema, f"{where}device {_show(device)} {problem}", hint)
            return
        elif topic_serial is not None and device != topic_serial:
            self.reject(
                Reason.device_mismatch,
                f"{where}device {_show(device)} differs from the topic's serial_id "
                f"{_show(topic_serial)}",
                hint,
            )
            return
        else:
            serial = device

        metrics = obj.get("metrics")
        if not isinstance(metrics, dict) or not metrics:
            if metrics is None:
                problem = "metrics is missing"
            elif isinstance(metrics, dict):
                problem = "metrics is empty"
            else:
                problem = f"metrics is {_kind(metrics)}; expected an object of name to value"
            self.reject(Reason.bad_schema, f"{where}{problem}", serial)
            return

        raw_ts = obj.get("ts")
        message_ts = self.now if raw_ts is None else _parse_ts(raw_ts, "message ts")
        for name, raw in metrics.items():
            self.metric(serial, name, raw, message_ts, where)

    def metric(
        self, serial: str, name: str, raw: Any, message_ts: datetime | str, where: str
    ) -> None:
        problem = _name_problem(name)
        if problem is not None:
            self.reject(Reason.bad_schema, f"{where}metric name {_show(name)} {problem}", serial)
            return
        ts = message_ts
        unit: str | None = None
        if isinstance(raw, dict):
            if not _METRIC_KEYS.issuperset(raw):  # as for the message's keys
                unknown = raw.keys() - _METRIC_KEYS
                self.reject(
                    Reason.bad_schema,
                    f"{_label(where, name)}unknown key(s) {_show_keys(unknown)}; "
                    "a metric object has value, ts and unit",
                    serial,
                    name,
                )
                return
            if "value" not in raw:
                self.reject(
                    Reason.bad_schema,
                    f"{_label(where, name)}a metric object needs a 'value'",
                    serial,
                    name,
                )
                return
            value = raw["value"]
            raw_unit = raw.get("unit")
            if raw_unit is not None:
                if not isinstance(raw_unit, str):
                    self.reject(
                        Reason.bad_schema,
                        f"{_label(where, name)}unit is {_kind(raw_unit)}; expected a string",
                        serial,
                        name,
                    )
                    return
                problem = _name_problem(raw_unit)
                if problem is not None:
                    self.reject(
                        Reason.bad_schema,
                        f"{_label(where, name)}unit {_show(raw_unit)} {problem}",
                        serial,
                        name,
                    )
                    return
                unit = raw_unit
            raw_ts = raw.get("ts")
            if raw_ts is not None:
                ts = _parse_ts(raw_ts, "ts")
        else:
            value = raw

        self.accept(serial, name, value, ts, unit=unit, where=where)

    def accept(
        self,
        serial: str,
        name: str,
        value: Any,
        ts: datetime | str,
        *,
        unit: str | None,
        where: str = "",
    ) -> None:
        """The checks every reading passes, whichever decoder found it.

        A rejection's detail starts with ``where`` (the element, ``array[i]: ``) and
        ``metric '<name>': ``, built only when the reading is rejected: most readings pass.
        """
        if value is None or isinstance(value, _CONTAINER):
            detail = f"value is {_kind(value)}; expected a number, boolean or string"
            self._refuse(Reason.type_mismatch, where, serial, name, detail)
            return
        if isinstance(ts, str):
            self._refuse(Reason.bad_timestamp, where, serial, name, ts)
            return
        ahead = ts - self.now
        if ahead > self.limits.future_tolerance:
            detail = (
                f"ts {ts.isoformat()} is {_duration(ahead)} ahead of the service clock "
                f"(limit {_duration(self.limits.future_tolerance)})"
            )
            self._refuse(Reason.ts_in_future, where, serial, name, detail)
            return
        if -ahead > self.limits.max_age:
            detail = (
                f"ts {ts.isoformat()} is {_duration(-ahead)} old "
                f"(limit {_duration(self.limits.max_age)})"
            )
            self._refuse(Reason.ts_too_old, where, serial, name, detail)
            return
        key = (serial, name.lower(), ts)
        if key in self.seen:
            detail = (
                f"a reading of this metric at {ts.isoformat()} appears earlier in the "
                "message (metric names ignore case)"
            )
            self._refuse(Reason.bad_schema, where, serial, name, detail)
            return
        self.seen.add(key)
        self.readings.append(RawReading(serial, name, ts, value, unit))

    def _refuse(self, reason: Reason, where: str, serial: str, name: str, detail: str) -> None:
        self.reject(reason, f"{_label(where, name)}{detail}", serial, name)


def _label(where: str, name: str) -> str:
    """The start of a metric's rejection detail: ``array[2]: metric 'temp': ``."""
    return f"{where}metric {_show(name)}: "


def _parse_ts(raw: object, subject: str) -> datetime | str:
    """The UTC time of a JSON ts, or the problem with it as detail text."""
    if isinstance(raw, str):
        if len(raw) <= _MAX_TS_TEXT:
            return _parse_rfc3339(raw, subject)
        return _not_a_time(raw, subject)
    if isinstance(raw, bool):
        return f"{subject} is {_describe(raw)}; expected an ISO 8601 string or an epoch number"
    if isinstance(raw, Decimal):
        # More digits than a double holds (nanoseconds): round to microseconds exactly, after a
        # bound that keeps the arithmetic small (1e20 ms is far beyond datetime's range anyway).
        if raw.copy_abs() > _MAX_EPOCH_NUMBER:
            return _epoch_out_of_range(raw, subject)
        scale = 1000 if raw.copy_abs() > EPOCH_MS_ABOVE else 1_000_000
        micros = _DECIMAL.multiply(raw, scale)
        try:
            return _EPOCH + timedelta(microseconds=int(_DECIMAL.to_integral_value(micros)))
        except (OverflowError, ValueError):
            return _epoch_out_of_range(raw, subject)
    if isinstance(raw, _INT_OR_FLOAT):
        try:
            # timedelta arithmetic is exact for integers (fromtimestamp would go through a float).
            if abs(raw) > EPOCH_MS_ABOVE:
                return _EPOCH + timedelta(milliseconds=raw)
            return _EPOCH + timedelta(seconds=raw)
        except (OverflowError, ValueError):
            return _epoch_out_of_range(raw, subject)
    return f"{subject} is {_kind(raw)}; expected an ISO 8601 string or an epoch number"


def _parse_rfc3339(text: str, subject: str) -> datetime | str:
    """RFC 3339 section 5.6 (date-time), with a space allowed for the "T" as its note permits.

    fromisoformat alone would also take ISO 8601 week and ordinal dates, basic and reduced forms
    ("2026-W05-2T12:00Z", "20260127T1200Z") and refuse RFC 3339's lower-case "t" and "z"; the
    pattern fixes the form, fromisoformat (on upper-cased text) checks the ranges.
    """
    if _RFC3339.fullmatch(text) is None:
        return _not_rfc3339(text, subject)
    leap = text[_SECOND] == "60"
    normalized = text.upper()
    if leap:
        # datetime has no second 60: parse it as :59, then keep it only where UTC has leap
        # seconds (23:59:60Z), as the last microsecond of that minute.
        normalized = f"{normalized[: _SECOND.start]}59{normalized[_SECOND.stop :]}"
    try:
        parsed = datetime.fromisoformat(normalized)
        if parsed.tzinfo is not UTC:  # "Z" and "+00:00" give UTC itself: nothing to convert
            parsed = parsed.astimezone(UTC)
    except ValueError:
        return _not_a_time(text, subject)
    except OverflowError:
        return f"{subject} {_show(text)} is out of range in UTC"
    if leap:
        if (parsed.hour, parsed.minute) != (23, 59):
            return f"{subject} {_show(text)} has second 60 outside a leap second (23:59:60Z)"
        return parsed.replace(microsecond=999_999)
    return parsed


def _not_rfc3339(text: str, subject: str) -> str:
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        return _not_a_time(text, subject)
    if parsed.utcoffset() is None:
        return f"{subject} {_show(text)} has no UTC offset (append 'Z' or '+HH:MM')"
    return (
        f"{subject} {_show(text)} is ISO 8601 but not RFC 3339 "
        "(YYYY-MM-DDTHH:MM:SS[.fraction] then Z or +HH:MM)"
    )


def _not_a_time(text: str, subject: str) -> str:
    return f"{subject} {_show(text)} is neither ISO 8601 with a UTC offset nor an epoch number"


def _epoch_out_of_range(raw: float | Decimal, subject: str) -> str:
    return (
        f"{subject} {_number(raw)} is out of range as a Unix epoch "
        f"(seconds, or milliseconds above {EPOCH_MS_ABOVE:g})"
    )


def check_value(value: object, data_type: DataType, limits: Limits) -> tuple[Reason, str] | None:
    """Why ``value`` cannot be stored as ``data_type``: (type_mismatch or value_too_large, detail).

    None when it fits. Never raises. The detail has no metric prefix; ``Rejection.for_reading``
    adds it.
    """
    try:
        return _check_value(value, data_type, limits)
    except Exception as exc:  # same last line of defence as parse_message
        return Reason.type_mismatch, f"{INTERNAL_ERROR}{type(exc).__name__}"


def _check_value(value: object, data_type: str, limits: Limits) -> tuple[Reason, str] | None:
    if data_type == "numeric":
        if isinstance(value, Decimal):
            return _check_decimal(value, limits)
        if isinstance(value, bool) or not isinstance(value, _INT_OR_FLOAT):
            return Reason.type_mismatch, f"{_describe(value)} is not a number (data_type numeric)"
        if isinstance(value, float) and not math.isfinite(value):
            if math.isnan(value):
                return Reason.type_mismatch, "NaN is not a number (data_type numeric)"
            return Reason.value_too_large, "number is beyond the range of a double (about 1.8e308)"
        if abs(value) > limits.max_abs_numeric:
            return (
                Reason.value_too_large,
                f"number {_number(value)} exceeds the magnitude limit {limits.max_abs_numeric:g}",
            )
        return None
    if data_type == "boolean":
        if not isinstance(value, bool):
            return Reason.type_mismatch, f"{_describe(value)} is not a boolean (data_type boolean)"
        return None
    if data_type == "str":
        if not isinstance(value, str):
            return Reason.type_mismatch, f"{_describe(value)} is not a string (data_type str)"
        if len(value) > limits.max_str_len:
            return (
                Reason.value_too_large,
                f"string of {len(value)} characters exceeds the limit of {limits.max_str_len}",
            )
        problem = _text_problem(value)
        if problem is not None:
            return Reason.type_mismatch, f"string {_show(value)} {problem}"
        return None
    return Reason.type_mismatch, f"data_type {_describe(data_type)} is not one of {DATA_TYPES}"


def _check_decimal(value: Decimal, limits: Limits) -> tuple[Reason, str] | None:
    # Only exact operations here (copy_abs, as_tuple, comparisons): arithmetic would round to
    # the thread's decimal context.
    if not value.is_finite():
        return Reason.type_mismatch, "NaN is not a number (data_type numeric)"  # not from JSON
    if value.copy_abs() > Decimal(limits.max_abs_numeric):
        return (
            Reason.value_too_large,
            f"number {_number(value)} exceeds the magnitude limit {limits.max_abs_numeric:g}",
        )
    _, digits, exponent = value.as_tuple()
    assert isinstance(exponent, int)  # finite
    zeros = len(digits) - len(bytes(digits).rstrip(b"\x00"))
    significant, scale = len(digits) - zeros, -(exponent + zeros)
    if significant > limits.max_numeric_digits:
        return (
            Reason.value_too_large,
            f"number {_number(value)} has {significant} significant digits "
            f"(limit {limits.max_numeric_digits})",
        )
    if significant and scale > limits.max_numeric_scale:
        return (
            Reason.value_too_large,
            f"number {_number(value)} has a digit {scale} places after the decimal point "
            f"(limit {limits.max_numeric_scale})",
        )
    return None


def rule_value(value: Value) -> float | int | bool | str:
    """The value as the rule engine takes it: the nearest double for an exact Decimal.

    Conditions compare doubles (thresholds are JSON numbers too); only the stored value is exact.
    """
    return float(value) if isinstance(value, Decimal) else value


def check_reading(reading: RawReading, data_type: DataType, limits: Limits) -> Rejection | None:
    """``check_value`` for a parsed reading, as a ready Rejection."""
    problem = check_value(reading.value, data_type, limits)
    if problem is None:
        return None
    return Rejection.for_reading(reading, problem[0], problem[1])


def encode_value(value: Value, data_type: DataType, unit: str | None = None) -> str:
    """The ``telemetries.value_jsonb`` text ``{"t": data_type, "v": value}`` (+ ``"u": unit``).

    Call only with a value ``check_value`` accepted; a non-finite float raises ValueError.
    """
    if unit is None and data_type in DATA_TYPES:
        # The common case without the encoder's machinery (a tenth of the per-reading cost):
        # JSON renders int and float with their repr, exactly as _ENCODER does.
        kind = type(value)
        if kind is int or (isinstance(value, float) and kind is float and math.isfinite(value)):
            return f'{{"t":"{data_type}","v":{value!r}}}'
        if kind is bool:
            return f'{{"t":"{data_type}","v":{"true" if value else "false"}}}'
    if isinstance(value, Decimal):
        # str() of a finite Decimal is a valid JSON number with every digit ("1E-400"); the
        # encoder cannot write a Decimal, and going through a float is what lost digits.
        unit_part = "" if unit is None else f',"u":{_ENCODER.encode(unit)}'
        return f'{{"t":{_ENCODER.encode(data_type)},"v":{value}{unit_part}}}'
    document: dict[str, float | int | bool | str] = {"t": data_type, "v": value}
    if unit is not None:
        document["u"] = unit
    return _ENCODER.encode(document)


def _single(reason: Reason, detail: str, serial: str | None = None) -> ParseResult:
    return ParseResult((), (Rejection(reason, detail, serial),))


def _text_problem(text: str) -> str | None:
    # It runs for every serial, metric name and unit. An ASCII string holds no surrogate, and
    # CPython keeps that flag (isascii() reads it): NUL is all that is left to find, and `in`
    # finds it in a third of the pattern search's time.
    if text.isascii():
        return None if "\x00" not in text else _NUL_PROBLEM
    found = _UNSTORABLE.search(text)
    if found is None:
        return None
    if found.group() == "\x00":
        return _NUL_PROBLEM
    return "contains an unpaired surrogate (a \\uD800-\\uDFFF escape), which is not Unicode text"


def _name_problem(name: str) -> str | None:
    """What makes a serial_id, metric name or unit unusable, or None."""
    if not name:
        return "is empty"
    if len(name) > MAX_NAME_LEN:
        return f"is longer than {MAX_NAME_LEN} characters"
    return _text_problem(name)


def _storable(name: object) -> str | None:
    """``name`` when it may go into a text column of rejected_messages, else None."""
    if isinstance(name, str) and _name_problem(name) is None:
        return name
    return None


def _brief(text: str) -> str:
    """``text`` cut to a short single line (it may quote device input)."""
    line = repr(text)[1:-1]
    return line if len(line) <= 2 * _SHOW_CHARS else f"{line[: 2 * _SHOW_CHARS]}..."


def _show(text: str) -> str:
    """Device text quoted for a detail: repr escapes NUL, surrogates and line breaks."""
    if len(text) > _SHOW_CHARS:
        return f"{text[:_SHOW_CHARS]!r}... ({len(text)} characters)"
    return repr(text)


def _show_keys(keys: set[str]) -> str:
    shown = ", ".join(_show(key) for key in sorted(keys)[:5])
    return shown if len(keys) <= 5 else f"{shown} and {len(keys) - 5} more"


def _number(number: float | Decimal) -> str:
    if isinstance(number, Decimal):
        text = str(number)
        if len(text) > _SHOW_CHARS:
            return f"{text[:20]}...{text[-12:]} ({len(number.as_tuple().digits)} digits)"
        return text
    if isinstance(number, int) and number.bit_length() > _MAX_INT_DIGITS * 3:
        # repr of a huge int costs quadratic time and raises beyond int_max_str_digits.
        digits = int(number.bit_length() * math.log10(2))
        return f"{'-' if number < 0 else ''}<integer of about {digits} digits>"
    return repr(number)


def _kind(value: object) -> str:
    """The JSON type of a decoded value, with an article, for details."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float | Decimal):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return f"a {type(value).__name__}"


def _describe(value: object) -> str:
    """A short rendering of a scalar for details (containers only by type: no recursion)."""
    if isinstance(value, bool):
        return f"boolean {'true' if value else 'false'}"
    if isinstance(value, int | float | Decimal):
        return f"number {_number(value)}"
    if isinstance(value, str):
        return f"string {_show(value)}"
    return _kind(value)


def _duration(span: timedelta) -> str:
    """``span`` in its largest whole unit with one decimal: '5 min', '4.9 y', '0.3 s'."""
    seconds = span.total_seconds()
    for unit, size in _DURATION_UNITS:
        if seconds >= size or unit == "s":
            amount = f"{seconds / size:.1f}".removesuffix(".0")
            return f"{amount} {unit}"
    raise AssertionError("unreachable: the last unit always matches")
