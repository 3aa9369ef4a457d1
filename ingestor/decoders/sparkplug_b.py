"""Sparkplug B (Eclipse Sparkplug 3.0): protobuf on ``spBv1.0/{group}/{type}/{node}[/{device}]``.

The source's topic is the Sparkplug namespace with placeholders (config.sources checks its
shape); the decoder rebuilds the received topic from the pattern and the placeholders' values,
so it reads the group, message type, edge node and device whatever the placeholders are called.

- ``NBIRTH``/``DBIRTH`` define each metric's name, alias and datatype for their scope (the edge
  node, or one device of it); their values are readings too. The decoder returns the birth as
  ``ParseResult.births``; ``batch.prepare`` applies it to the ``AliasStore`` this decoder reads,
  and the writer stores it (``ingestor.aliases``).
- ``NDATA``/``DDATA`` name metrics by alias (or by name). An alias no kept birth defined is
  ``unknown_alias``, never a reading under an invented name.
- ``NDEATH``/``DDEATH``/``NCMD``/``DCMD`` are not telemetry: acknowledged, neither stored nor
  recorded. ``bdSeq`` of an NBIRTH (the session number) is no reading either.
- Int8/16/32 arrive in ``int_value`` (uint32) sign-extended: 4294967209 is Int8 -87. Int64 is
  two's complement in ``long_value``. An integer type that arrives in the other integer field is
  read from that one (sign-extended by its width) and range-checked like any other. The
  datatype is the birth's (DATA usually omits it). Float is the shortest decimal that is the
  same float32 (12.3, not 12.300000190734863). DateTime (ms since the epoch) is stored as
  RFC 3339 text. DataSet, Template, Bytes, File, PropertySet and the array types are refused
  (bad_schema) with the datatype named.
- A metric with ``is_null`` is no reading; one with ``is_transient`` (the specification: not to
  be historized) is no reading either. The time is the metric's ``timestamp``, else the
  payload's, else receipt.
"""

from __future__ import annotations

import enum
import functools
import math
import struct
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any, Final, NamedTuple

from google.protobuf.message import DecodeError

from config.sources import Source
from ingestor import payload
from ingestor.aliases import AliasStore, Birth, Definition, Scope
from ingestor.decoders import base
from ingestor.decoders import sparkplug_b_pb2 as pb
from ingestor.payload import Extracted, Limits, ParseResult, Rejection, finish
from ingestor.reasons import Reason

NAMESPACE = "spBv1.0"
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_NOTHING = ParseResult((), ())


class DataType(enum.IntEnum):
    """Sparkplug 3.0 datatypes (the ``datatype`` of a metric)."""

    Int8 = 1
    Int16 = 2
    Int32 = 3
    Int64 = 4
    UInt8 = 5
    UInt16 = 6
    UInt32 = 7
    UInt64 = 8
    Float = 9
    Double = 10
    Boolean = 11
    String = 12
    DateTime = 13
    Text = 14
    UUID = 15
    DataSet = 16
    Bytes = 17
    File = 18
    Template = 19
    PropertySet = 20
    PropertySetList = 21
    Int8Array = 22
    Int16Array = 23
    Int32Array = 24
    Int64Array = 25
    UInt8Array = 26
    UInt16Array = 27
    UInt32Array = 28
    UInt64Array = 29
    FloatArray = 30
    DoubleArray = 31
    BooleanArray = 32
    StringArray = 33
    DateTimeArray = 34


BIRTHS = ("NBIRTH", "DBIRTH")
DATA = ("NDATA", "DDATA")
NOT_TELEMETRY = ("NDEATH", "DDEATH", "NCMD", "DCMD")
# (value field, bits, signed) of the integer types
_INTEGERS = {
    DataType.Int8: ("int_value", 8, True),
    DataType.Int16: ("int_value", 16, True),
    DataType.Int32: ("int_value", 32, True),
    DataType.Int64: ("long_value", 64, True),
    DataType.UInt8: ("int_value", 8, False),
    DataType.UInt16: ("int_value", 16, False),
    DataType.UInt32: ("int_value", 32, False),
    DataType.UInt64: ("long_value", 64, False),
}
_FIELDS = {
    DataType.Float: "float_value",
    DataType.Double: "double_value",
    DataType.Boolean: "boolean_value",
    DataType.String: "string_value",
    DataType.Text: "string_value",
    DataType.UUID: "string_value",
    DataType.DateTime: "long_value",
}
_WIDTH = {"int_value": 32, "long_value": 64}  # bits of the wire field
_BY_NUMBER = {int(kind): kind for kind in DataType}  # DataType(n) costs a microsecond


def topic_levels(source: Source, fields: Mapping[str, str]) -> list[str]:
    """The received topic's levels, rebuilt from the source's pattern and its fields."""
    parts = []
    for level in source.topic.pattern.split("/"):
        if level.startswith("{") and level.endswith("}"):
            parts.append(fields.get(level[1:-1].rstrip("+"), ""))
        else:
            parts.append(level)
    return "/".join(parts).split("/")


class SparkplugDecoder:
    """The ``sparkplug_b`` decoder; it reads the aliases of ``store`` and never changes them."""

    def __init__(self, store: AliasStore) -> None:
        self.store = store
        # Per source and scope: what the scope's last birth makes of each alias (_Table).
        self._tables: dict[tuple[str, Scope], _Table] = {}
        # Per source and topic fields: the message type, scope and topic problem (_topic); a
        # device publishes on the same few topics, and reading them cost 2 us a message.
        self._topics: dict[tuple[str, tuple[tuple[str, str], ...]], _Topic] = {}

    def __call__(
        self,
        source: Source,
        fields: Mapping[str, str],
        data: bytes,
        received_at: datetime,
        limits: Limits,
    ) -> ParseResult:
        serial = source.serial_for(fields)
        hint = payload.storable(serial)
        key = (source.name, tuple(fields.items()))
        topic = self._topics.get(key)
        if topic is None:
            if len(self._topics) >= _MAX_TOPICS:
                self._topics.clear()  # hostile or churning topics: start again, never grow
            topic = self._topics[key] = _topic(source, fields)
        kind, scope, problem = topic
        if kind in NOT_TELEMETRY:
            return _NOTHING
        if problem is not None:
            return _rejected(Reason.bad_schema, problem, hint)
        message = _parse(data, limits)
        if isinstance(message, tuple):
            return _rejected(*message, hint)
        reader = _Reader(self.store, source, scope, kind in BIRTHS, hint)
        table = None if reader.birth else self._table(source, scope)
        if table is None:
            for index, metric in enumerate(message.metrics):
                reader.metric(index, metric, message)
        else:
            _read_data(reader, table, message)
        parsed = finish(serial, reader.extracted, received_at, limits, tuple(reader.rejections))
        births: tuple[Birth, ...] = ()
        if kind in BIRTHS and hint is not None:  # no usable serial: finish rejected it all
            births = (Birth(scope, hint, tuple(reader.definitions)),)
        return ParseResult(parsed.readings, parsed.rejections, births)

    def _table(self, source: Source, scope: Scope) -> _Table | None:
        """The scope's alias table for ``source``; None before any birth of the scope."""
        definitions = self.store.aliases(scope)
        if definitions is None:
            return None
        key = (source.name, scope)
        table = self._tables.get(key)
        if table is None or table.definitions is not definitions:
            if len(self._tables) >= _MAX_TABLES:
                self._tables.clear()  # scopes born and gone: start again rather than grow
            table = self._tables[key] = _Table(source, definitions)
        return table


_Topic = tuple[str, Scope, str | None]  # message type, scope, what is wrong with the topic
_MAX_TOPICS: Final = 10_000


def _topic(source: Source, fields: Mapping[str, str]) -> _Topic:
    levels = topic_levels(source, fields)
    kind = levels[2] if len(levels) > 2 else ""
    if kind in NOT_TELEMETRY:
        return kind, ("", "", ""), None
    problem = _topic_problem(levels, kind)
    if problem is not None:
        return kind, ("", "", ""), problem
    return kind, (levels[1], levels[3], levels[4] if len(levels) == 5 else ""), None


def _rejected(reason: Reason, detail: str, serial: str | None) -> ParseResult:
    return ParseResult((), (Rejection(reason, detail, serial),))


def _topic_problem(levels: list[str], kind: str) -> str | None:
    topic = "/".join(levels)
    shown = topic if len(topic) <= 120 else f"{topic[:120]}..."
    if len(levels) not in (4, 5) or levels[0] != NAMESPACE:
        return f"topic {shown!r} is not spBv1.0/group/type/edge_node[/device]"
    if kind not in BIRTHS + DATA:
        known = ", ".join(BIRTHS + DATA + NOT_TELEMETRY)
        return f"topic {shown!r}: {kind[:40]!r} is not a Sparkplug message type ({known})"
    device_level = kind.startswith("D")
    if device_level != (len(levels) == 5):
        return f"topic {shown!r}: {kind} " + (
            "needs a device level" if device_level else "has no device level"
        )
    for what, name in zip(("group_id", "edge_node_id", "device_id"), levels[1:], strict=False):
        if payload.storable(name) is None:
            return f"topic {shown!r}: {what} must be 1-255 characters"
    return None


def _parse(data: bytes, limits: Limits) -> pb.Payload | tuple[Reason, str]:
    if len(data) > limits.max_payload_bytes:
        detail = f"payload is {len(data)} bytes (limit {limits.max_payload_bytes})"
        return Reason.payload_too_large, detail
    if not data:
        return Reason.bad_schema, "payload is empty; expected a Sparkplug B protobuf message"
    try:
        message = pb.Payload.FromString(data)
    except DecodeError as exc:
        return Reason.bad_schema, f"payload is not a Sparkplug B protobuf message ({exc})"[:300]
    if len(message.metrics) > limits.max_readings_per_message:
        detail = (
            f"payload holds {len(message.metrics)} metrics "
            f"(limit {limits.max_readings_per_message})"
        )
        return Reason.payload_too_large, detail
    return message


class _Reader:
    """The readings, rejections and (for a birth) definitions of one message's metrics."""

    def __init__(
        self, store: AliasStore, source: Source, scope: Scope, birth: bool, serial: str | None
    ) -> None:
        self.store = store
        self.serial = serial
        self.source = source
        self.scope = scope
        self.birth = birth
        self.extracted: list[payload.Found] = []
        self.rejections: list[Rejection] = []
        self.definitions: list[Definition] = []
        self._names: set[str] = set()
        self._aliases: set[int] = set()

    def label(self) -> str:
        """The scope as an operator reads it: group/edge_node[/device]."""
        return "/".join(part for part in self.scope if part)[:200]

    def reject(self, reason: Reason, detail: str, metric: str | None = None) -> None:
        self.rejections.append(Rejection(reason, detail, self.serial, payload.storable(metric)))

    def metric(self, index: int, metric: pb.Payload.Metric, message: pb.Payload) -> None:
        where = f"metric[{index}]"
        found = self._define(where, metric) if self.birth else self._resolve(where, metric)
        if found is None:
            return
        name, datatype = found
        if metric.is_null or metric.is_transient or (self.birth and _session(self.scope, name)):
            return
        value = _value(metric, datatype)
        if isinstance(value, _Problem):
            self.reject(Reason.bad_schema, f"{where} {name[:60]!r}: {value.detail}", name)
            return
        if not self.source.keeps(name):
            return
        ts = _time(metric, message)
        self.extracted.append(
            Extracted(self.source.rename.get(name, name), base.mapped(self.source, value), ts)
        )

    def _define(self, where: str, metric: pb.Payload.Metric) -> tuple[str, int] | None:
        """A birth's metric: its definition (kept for data to come) and what to read."""
        name = metric.name
        if not isinstance(name, str) or payload.storable(name) is None:
            self.reject(
                Reason.bad_schema, f"{where}: a birth metric needs a name of 1-255 characters"
            )
            return None
        datatype = metric.datatype
        if datatype not in _BY_NUMBER:
            self.reject(
                Reason.bad_schema,
                f"{where} {name!r}: datatype {datatype} is not a Sparkplug datatype",
                name,
            )
            return None
        alias = metric.alias if metric.HasField("alias") else None
        if name in self._names or (alias is not None and alias in self._aliases):
            what = f"name {name!r}" if name in self._names else f"alias {alias}"
            self.reject(Reason.bad_schema, f"{where}: {what} is defined twice in this birth", name)
            return None
        self._names.add(name)
        if alias is not None:
            self._aliases.add(alias)
        self.definitions.append(Definition(name, alias, datatype))
        return name, datatype

    def _resolve(self, where: str, metric: pb.Payload.Metric) -> tuple[str, int] | None:
        """A data metric's name and datatype: from its alias (or name) and the kept birth."""
        definition: Definition | None = None
        if metric.HasField("alias"):
            definition = self.store.by_alias(self.scope, metric.alias)
            if definition is None and not metric.name:
                self.reject(
                    Reason.unknown_alias,
                    f"{where}: alias {metric.alias} is not defined by a birth of {self.label()!r} "
                    "(births are kept for devices in the catalogue; ask the edge node for a "
                    "rebirth)",
                )
                return None
        name = definition.name if definition is not None else metric.name
        if not isinstance(name, str) or not name:
            self.reject(Reason.bad_schema, f"{where}: a metric needs an alias or a name")
            return None
        if definition is None:
            definition = self.store.by_name(self.scope, name)
        if definition is not None:
            return name, definition.datatype
        if metric.HasField("datatype"):
            return name, metric.datatype
        self.reject(
            Reason.unknown_alias,
            f"{where} {name[:60]!r}: no datatype, and no birth of {self.label()!r} defined it",
            name,
        )
        return None


# An alias's entry: (stored name or None when the source excludes it, value field, convert);
# convert is None for a value stored as it is, else it returns the value or _SLOW.
_Entry = tuple[str | None, str, Callable[[Any], object] | None]
_SLOW: Final = object()  # "take the general path": it says what is wrong, or reads the odd case
_MAX_TABLES: Final = 10_000  # source-scope tables kept; more means scopes come and go


class _Table(dict[int, "_Entry | None"]):
    """What a DATA metric of one scope's alias becomes for one source, derived once per birth.

    The common metric (by alias, a value in its datatype's field, not null or transient) is then
    a few lookups; every other one, and every value a converter doubts, takes the general path
    (``_Reader.metric``), so both give the same readings and rejections. Entries exist only for
    aliases the birth defined: aliases a device makes up cannot grow the table.
    """

    def __init__(self, source: Source, definitions: Mapping[int, Definition]) -> None:
        super().__init__()
        self.source = source
        self.definitions = definitions

    def __missing__(self, alias: int) -> _Entry | None:
        definition = self.definitions.get(alias)
        if definition is None:
            return None
        entry = _entry(self.source, definition)
        self[alias] = entry
        return entry


def _entry(source: Source, definition: Definition) -> _Entry | None:
    kind = _BY_NUMBER.get(definition.datatype)
    name = definition.name
    stored = source.rename.get(name, name) if source.keeps(name) else None
    if kind in _INTEGERS:
        field = _INTEGERS[kind][0]
        return stored, field, functools.partial(_fast_integer, kind, field)
    if kind is DataType.Float:
        return stored, "float_value", _float32
    if kind in (DataType.Double, DataType.Boolean):
        return stored, _FIELDS[kind], None
    if kind in (DataType.String, DataType.Text, DataType.UUID):
        return stored, "string_value", _fast_text
    return None  # DateTime, the unsupported types: the general path


def _fast_integer(kind: DataType, field: str, raw: int) -> object:
    value = _integer(kind, field, raw)
    return _SLOW if isinstance(value, _Problem) else value


def _fast_text(value: object) -> object:
    return _SLOW if isinstance(value, bytes) else value


def _read_data(reader: _Reader, table: _Table, message: pb.Payload) -> None:
    """DATA metrics through ``table``, each exactly as ``_Reader.metric`` would read it."""
    values = reader.source.values
    base_ms = message.timestamp if message.HasField("timestamp") else None
    base_ts = None if base_ms is None else _at(base_ms, "payload timestamp")
    last_ms, last_ts = base_ms, base_ts
    append = reader.extracted.append
    for index, metric in enumerate(message.metrics):
        entry = table[metric.alias] if metric.HasField("alias") else None
        if entry is None or metric.is_null or metric.is_transient:
            reader.metric(index, metric, message)
            continue
        name, field, convert = entry
        if metric.WhichOneof("value") != field:
            reader.metric(index, metric, message)
            continue
        value = getattr(metric, field)
        if convert is not None:
            value = convert(value)
            if value is _SLOW:
                reader.metric(index, metric, message)
                continue
        if name is None:
            continue  # excluded by the source
        if values and isinstance(value, str) and value in values:
            value = values[value]
        if metric.HasField("timestamp"):
            millis = metric.timestamp
            if millis != last_ms:
                last_ms, last_ts = millis, _at(millis, "metric timestamp")
            ts = last_ts
        else:
            ts = base_ts
        append((name, value, ts, None))


def _session(scope: Scope, name: str) -> bool:
    """``bdSeq`` of an edge node's birth: the session number, not a measurement."""
    return scope[2] == "" and name == "bdSeq"


def _time(metric: pb.Payload.Metric, message: pb.Payload) -> datetime | str | None:
    if metric.HasField("timestamp"):
        millis, subject = metric.timestamp, "metric timestamp"
    elif message.HasField("timestamp"):
        millis, subject = message.timestamp, "payload timestamp"
    else:
        return None
    return _at(millis, subject)


def _at(millis: int, subject: str) -> datetime | str:
    try:
        return _EPOCH + timedelta(milliseconds=millis)
    except OverflowError:
        return f"{subject} {millis} (ms since the epoch) is out of range"


class _Problem(NamedTuple):
    """Why a metric's value cannot be read (a bad_schema rejection)."""

    detail: str


def _value(metric: pb.Payload.Metric, datatype: int) -> object:
    """The metric's value as stored, or the ``_Problem`` with it."""
    kind = _BY_NUMBER.get(datatype)
    if kind is None:
        return _Problem(f"datatype {datatype} is not a Sparkplug datatype")
    carried = metric.WhichOneof("value")
    wanted = _INTEGERS[kind][0] if kind in _INTEGERS else _FIELDS.get(kind)
    if wanted is None:
        return _Problem(
            f"datatype {kind.name} is not supported "
            "(iothub stores integers, floats, booleans, text and DateTime)"
        )
    if kind in _INTEGERS and carried in _WIDTH:
        # The expected field, or the other integer field (an encoder's choice that loses
        # nothing): sign extension follows the field that carries it, then the range check.
        return _integer(kind, carried, getattr(metric, carried))
    if carried != wanted:
        return _Problem(f"a {kind.name} metric carries {carried or 'no value'}; expected {wanted}")
    if kind is DataType.Float:
        return _float32(metric.float_value)
    if kind is DataType.DateTime:
        try:
            return (_EPOCH + timedelta(milliseconds=metric.long_value)).isoformat()
        except OverflowError:
            return _Problem(f"DateTime {metric.long_value} (ms since the epoch) is out of range")
    value = getattr(metric, wanted)
    if isinstance(value, bytes):  # upb hands proto2 strings that are not UTF-8 over as bytes
        return _Problem(f"{wanted} is not valid UTF-8")
    return value


def _integer(kind: DataType, field: str, raw: int) -> int | _Problem:
    _, bits, signed = _INTEGERS[kind]
    width = _WIDTH[field]
    value = raw - (1 << width) if signed and raw >= 1 << (width - 1) else raw
    low, high = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
    if not low <= value <= high:
        return _Problem(f"{field} {raw} is outside {kind.name} ({low} to {high})")
    return value


def _float32(value: float) -> float:
    """The shortest decimal that is the same float32: what the device meant, not its binary."""
    if not math.isfinite(value):
        return value
    packed = struct.pack("<f", value)
    for digits in range(1, 10):
        candidate = float(f"{value:.{digits}g}")
        try:
            if struct.pack("<f", candidate) == packed:
                return candidate
        except OverflowError:  # near the float32 maximum, a short decimal may round past it
            continue
    return value
