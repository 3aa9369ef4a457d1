"""What every decoder has in common: its protocol, key flattening and local times."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime
from typing import Any, Protocol
from zoneinfo import ZoneInfo

from config.sources import Source
from ingestor import payload
from ingestor.payload import Found, Limits, ParseResult
from ingestor.reasons import Reason

# An ISO 8601 local date-time without an offset, as Tasmota (and Z2M's ISO_8601_local before
# 1.17) write it: the wall clock of the device's time zone.
_LOCAL = re.compile(r"\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}:\d{2}(?:\.\d{1,9})?", re.ASCII)
_MAX_DEPTH = 16  # levels of nested objects flattened; deeper ones are not sensor readings


class Decoder(Protocol):
    """Turns one message of a source into readings and rejections; never raises."""

    def __call__(
        self,
        source: Source,
        fields: Mapping[str, str],
        data: bytes,
        received_at: datetime,
        limits: Limits,
    ) -> ParseResult: ...


def flatten(
    obj: Mapping[str, Any],
    prefix: str = "",
    depth: int = 0,
    into: list[tuple[str, Any]] | None = None,
) -> list[tuple[str, Any]]:
    """(key, value) of every non-object value; nested keys joined with "." (``BME280.Pressure``).

    A list built in one pass, not a generator: a message's keys are few, and each yield through
    nested generators cost more than the reading's own checks. JSON objects are dicts here
    (``payload.load_json``), hence the exact ``dict`` test.
    """
    found: list[tuple[str, Any]] = [] if into is None else into
    for key, value in obj.items():
        if isinstance(value, dict) and value and depth < _MAX_DEPTH:
            flatten(value, f"{prefix}{key}.", depth + 1, found)
        else:
            found.append((f"{prefix}{key}" if prefix else key, value))
    return found


def at_path(document: Any, path: tuple[str, ...]) -> Any:
    """The value at a dotted path from the top of the message, or None when absent."""
    for part in path:
        if not isinstance(document, Mapping):
            return None
        document = document.get(part)
    return document


def mapped(source: Source, value: Any) -> Any:
    """A string the source's ``values`` table maps (``ON = true``), else the value unchanged."""
    if isinstance(value, str) and value in source.values:
        return source.values[value]
    return value


def parse_time(raw: object, zone: ZoneInfo | None, subject: str) -> datetime | str:
    """A device's time: RFC 3339 or epoch (s / ms) as native, or a local time in ``zone``.

    A local time that does not exist (the hour skipped in spring) or exists twice (the hour
    repeated in autumn) is a problem, never a guess: Python's zoneinfo would map either to a UTC
    time silently (fold=0), so both folds are compared and the nonexistent case is found by its
    failed round trip.
    """
    if isinstance(raw, str) and _LOCAL.fullmatch(raw):
        if zone is None:
            return (
                f"{subject} {raw!r} has no UTC offset and the source sets no time_zone "
                "(set time_zone, or make the device send UTC)"
            )
        # Tasmota and others may send nanoseconds; datetime keeps microseconds.
        text = raw.replace(" ", "T")
        if "." in text:
            whole, fraction = text.split(".")
            text = f"{whole}.{fraction[:6].ljust(6, '0')}"
        try:
            naive = datetime.fromisoformat(text)
        except ValueError:
            return f"{subject} {raw!r} is not a valid date and time"
        # The zone reads a naive time's wall clock and fold; datetime.replace(tzinfo=...) costs
        # several times more than these calls, and this runs once per message.
        offset = zone.utcoffset(naive)
        n = naive
        late = datetime(n.year, n.month, n.day, n.hour, n.minute, n.second, n.microsecond, fold=1)
        if offset is None or offset != zone.utcoffset(late):
            return _dst_problem(raw, naive, zone, subject)
        try:
            return datetime.fromisoformat(f"{text}+00:00") - offset
        except OverflowError:
            return f"{subject} {raw!r} is out of range in UTC"
    return payload.parse_time(raw, subject)


def _dst_problem(raw: str, naive: datetime, zone: ZoneInfo, subject: str) -> str:
    early = naive.replace(tzinfo=zone)
    try:
        back = early.astimezone(UTC).astimezone(zone).replace(tzinfo=None)
    except OverflowError:
        return f"{subject} {raw!r} is out of range in UTC"
    if back != naive:
        return f"{subject} {raw!r} does not exist in {zone.key} (skipped at a DST change)"
    return f"{subject} {raw!r} is ambiguous in {zone.key} (repeated at a DST change)"


def json_object(data: bytes, serial: str | None, limits: Limits) -> dict[str, Any] | ParseResult:
    """The payload as a JSON object, or the rejection saying why it is not one."""
    document = payload.load_json(data, serial, limits)
    if isinstance(document, ParseResult):
        return document
    if not isinstance(document, dict):
        kind = "an array" if isinstance(document, list) else "not an object"
        return ParseResult(
            (),
            (
                payload.Rejection(
                    Reason.bad_schema, f"payload is {kind}; expected a JSON object", serial
                ),
            ),
        )
    return document


def readings(
    source: Source,
    pairs: Iterable[tuple[str, Any]],
    ts: datetime | str | None,
    unit_of: Callable[[str], str | None] | None = None,
    *,
    skip_nulls: bool = False,
    skip_key: str | None = None,
) -> list[Found]:
    """The readings of flattened keys, after include/exclude, rename and values.

    ``unit_of`` gives a key's unit from its name as sent (before ``rename``). ``skip_nulls``
    drops ``null`` values (no reading, no rejection); ``skip_key`` is a key that is no reading
    (the time field). One loop per message with the source's tables looked up once: this is
    where a decoded reading costs more than a native one (docs/performance.md).
    """
    keep = None if source.include is None and not source.exclude else source.keeps
    rename, values = source.rename, source.values
    found: list[Found] = []
    append = found.append
    for key, raw in pairs:
        if (skip_nulls and raw is None) or key == skip_key:
            continue
        if keep is not None and not keep(key):
            continue
        value = values[raw] if values and isinstance(raw, str) and raw in values else raw
        append(
            (
                rename.get(key, key) if rename else key,
                value,
                ts,
                None if unit_of is None else unit_of(key),
            )
        )
    return found
