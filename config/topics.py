"""Telemetry topic patterns: validation, MQTT subscription filters and topic matching.

A pattern is an MQTT topic name in which one whole level may be the placeholder ``{serial_id}``
(for example ``devices/{serial_id}/telemetry``). It subscribes as the filter with ``+`` in that
level, and a received topic matches when it has the same levels, yielding the serial from the
placeholder's level. Patterns without the placeholder (``telemetry``) are the shared form: the
payload names the device.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import NamedTuple

SERIAL_PLACEHOLDER = "{serial_id}"
DEFAULT_PATTERNS = ("devices/{serial_id}/telemetry", "telemetry")
MAX_TOPIC_BYTES = 65_535  # bytes of UTF-8: the MQTT limit on a topic name or filter
_SHARE_PREFIX = "$share/"
_FORBIDDEN_IN_PATTERN = ("+", "#", "\x00")
_FORBIDDEN_IN_LEVEL = ("/", "+", "#", "\x00")  # in a share name or a serial


class TopicMatch(NamedTuple):
    """A received topic that matched a pattern, with the serial taken from the topic. A
    NamedTuple: one is made per message, at a fraction of a frozen dataclass's cost."""

    pattern: TopicPattern
    # None for the shared form. May be "" when the device published to e.g. "devices//telemetry"
    # (MQTT's "+" matches an empty level); parse_message rejects that as bad_schema so the message
    # is recorded rather than silently ignored.
    serial_id: str | None

    @property
    def per_device(self) -> bool:
        """True when the topic itself names the device."""
        return self.serial_id is not None


@dataclass(frozen=True)
class TopicPattern:
    """One validated telemetry topic pattern; build with ``TopicPattern.parse(text)``."""

    pattern: str
    has_serial: bool = field(init=False, compare=False)
    # A topic matches when it is prefix + serial + suffix with no "/" in the serial: string slicing
    # is several times faster than splitting the topic into levels, and it runs for every message.
    _prefix: str = field(init=False, repr=False, compare=False)
    _suffix: str = field(init=False, repr=False, compare=False)
    _serial_first: bool = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        pattern = self.pattern
        if not pattern:
            raise ValueError("topic pattern is empty")
        for char in _FORBIDDEN_IN_PATTERN:
            if char in pattern:
                shown = "NUL" if char == "\x00" else repr(char)
                raise ValueError(
                    f"topic pattern {pattern!r} contains {shown}: MQTT wildcards are not allowed; "
                    f"write {SERIAL_PLACEHOLDER} for the level that carries the device's serial"
                )
        if pattern.startswith("$"):
            raise ValueError(
                f"topic pattern {pattern!r} starts with '$': such topics belong to the broker; "
                "a shared subscription is configured with the group option, not in the pattern"
            )
        try:
            encoded = pattern.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError(f"topic pattern {pattern!r} is not valid Unicode text") from None
        if len(encoded) > MAX_TOPIC_BYTES:
            raise ValueError(f"topic pattern is longer than {MAX_TOPIC_BYTES} bytes of UTF-8")
        levels = pattern.split("/")
        serial_levels = [i for i, level in enumerate(levels) if level == SERIAL_PLACEHOLDER]
        if len(serial_levels) > 1:
            raise ValueError(
                f"topic pattern {pattern!r} has {SERIAL_PLACEHOLDER} {len(serial_levels)} times; "
                "it may appear at most once"
            )
        for level in levels:
            if level != SERIAL_PLACEHOLDER and ("{" in level or "}" in level):
                raise ValueError(
                    f"topic pattern {pattern!r} has level {level!r}: {SERIAL_PLACEHOLDER} must be "
                    "a whole level (between slashes) and is the only placeholder"
                )
        if serial_levels:
            index = serial_levels[0]
            prefix = "/".join(levels[:index])
            suffix = "/".join(levels[index + 1 :])
            object.__setattr__(self, "has_serial", True)
            object.__setattr__(self, "_prefix", f"{prefix}/" if index > 0 else "")
            object.__setattr__(self, "_suffix", f"/{suffix}" if index < len(levels) - 1 else "")
            object.__setattr__(self, "_serial_first", index == 0)
        else:
            object.__setattr__(self, "has_serial", False)
            object.__setattr__(self, "_prefix", pattern)
            object.__setattr__(self, "_suffix", "")
            object.__setattr__(self, "_serial_first", False)

    @classmethod
    def parse(cls, pattern: str) -> TopicPattern:
        """Validate ``pattern``; raise ValueError saying what is wrong with it."""
        return cls(pattern)

    @property
    def subscription(self) -> str:
        """The MQTT topic filter to subscribe to (the placeholder becomes ``+``)."""
        return self.pattern.replace(SERIAL_PLACEHOLDER, "+")

    def subscription_for(self, group: str | None) -> str:
        """The filter, as an MQTT shared subscription ``$share/<group>/<filter>`` when grouped."""
        if group is None:
            return self.subscription
        validate_share_group(group)
        return f"{_SHARE_PREFIX}{group}/{self.subscription}"

    def match(self, topic: str) -> TopicMatch | None:
        """The match of a received topic name, or None when it does not fit this pattern."""
        if not self.has_serial:
            return TopicMatch(self, None) if topic == self._prefix else None
        prefix, suffix = self._prefix, self._suffix
        if len(topic) < len(prefix) + len(suffix):
            return None
        if not (topic.startswith(prefix) and topic.endswith(suffix)):
            return None
        serial = topic[len(prefix) : len(topic) - len(suffix)]
        if "/" in serial:
            return None
        # MQTT: a wildcard in the first level never matches topics starting with "$" ($SYS/...).
        if self._serial_first and serial.startswith("$"):
            return None
        return TopicMatch(self, serial)

    def topic_for(self, serial_id: str | None = None) -> str:
        """The topic name a device publishes to (for simulators and tests)."""
        if not self.has_serial:
            return self.pattern
        if serial_id is None:
            raise ValueError(f"topic pattern {self.pattern!r} needs a serial_id")
        if not serial_id or any(char in serial_id for char in _FORBIDDEN_IN_LEVEL):
            raise ValueError(f"serial_id {serial_id!r} cannot be one MQTT topic level")
        return self.pattern.replace(SERIAL_PLACEHOLDER, serial_id)


def validate_share_group(group: str) -> None:
    """Raise ValueError unless ``group`` is a valid MQTT shared-subscription name."""
    if not group:
        raise ValueError("shared subscription group is empty")
    for char in _FORBIDDEN_IN_LEVEL:
        if char in group:
            shown = "NUL" if char == "\x00" else repr(char)
            raise ValueError(
                f"shared subscription group {group!r} contains {shown}, "
                "which MQTT forbids in a share name"
            )


@dataclass(frozen=True)
class TopicRouter:
    """Several patterns, tried in order; build with ``TopicRouter.from_strings(texts)``."""

    patterns: tuple[TopicPattern, ...]

    def __post_init__(self) -> None:
        if not self.patterns:
            raise ValueError("at least one telemetry topic pattern is required")
        seen: set[str] = set()
        for pattern in self.patterns:
            # Two patterns with the same filter would make the broker deliver every message twice.
            if pattern.subscription in seen:
                raise ValueError(
                    f"topic pattern {pattern.pattern!r} subscribes to the same filter "
                    f"{pattern.subscription!r} as an earlier one"
                )
            seen.add(pattern.subscription)

    @classmethod
    def from_strings(cls, patterns: Iterable[str]) -> TopicRouter:
        """Parse each pattern (ValueError names the bad one) and keep their order."""
        return cls(tuple(TopicPattern.parse(text) for text in patterns))

    def subscriptions(self, group: str | None = None) -> tuple[str, ...]:
        """The MQTT filters to subscribe to, shared under ``group`` when given."""
        return tuple(pattern.subscription_for(group) for pattern in self.patterns)

    def match(self, topic: str) -> TopicMatch | None:
        """The first pattern's match for ``topic``, or None when no pattern fits it."""
        for pattern in self.patterns:
            found = pattern.match(topic)
            if found is not None:
                return found
        return None
