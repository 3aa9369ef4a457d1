"""What every decoder has in common: its protocol, key flattening and local times."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from datetime import UTC, datetime
from typing import Any, Protocol
from zoneinfo import ZoneInfo

from config.sources import Source
from ingestor import payload
from ingestor.payload import Extracted, Limits, ParseResult
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


def flatten(obj: Mapping[str, Any], prefix: str = "", depth: int = 0) -> Iterator[tuple[str, Any]]:
    """(key, value) of every non-object value; nested keys joined with "." (``BME280.Pressure``)."""
    for key, value in obj.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value and depth < _MAX_DEPTH:
            yield from flatten(value, f"{name}.", depth + 1)
        else:
            yield name, value


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
        early = naive.replace(tzinfo=zone, fold=0)
        late = naive.replace(tzinfo=zone, fold=1)
        if early.utcoffset() != late.utcoffset():
            back = early.astimezone(UTC).astimezone(zone).replace(tzinfo=None)
            if back != naive:
                return f"{subject} {raw!r} does not exist in {zone.key} (skipped at a DST change)"
            return f"{subject} {raw!r} is ambiguous in {zone.key} (repeated at a DST change)"
        return early.astimezone(UTC)
    return payload.parse_time(raw, subject)


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
) -> list[Extracted]:
    """Extracted readings of flattened keys, after include/exclude, rename and values.

    ``unit_of`` gives a key's unit from its name as sent (before ``rename``).
    """
    found = []
    for key, value in pairs:
        if source.keeps(key):
            unit = None if unit_of is None else unit_of(key)
            found.append(Extracted(source.rename.get(key, key), mapped(source, value), ts, unit))
    return found
