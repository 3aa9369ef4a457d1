"""The ``sources`` setting: per topic pattern, which decoder turns a message into readings.

DESIGN section 3b fixes the outside. A source's ``topic`` is an MQTT topic name in which whole
levels may be placeholders: ``{x}`` is one level, ``{x+}`` one or more levels (only the last
placeholder may be ``+``, since MQTT's ``#`` ends a filter). It subscribes with ``+``/``#`` and
matches received topics by their levels, yielding the placeholders' values for ``serial`` and
``metric`` templates. Everything here is validated at start, one line per mistake.
"""

from __future__ import annotations

import fnmatch
import functools
import re
import zoneinfo
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

# Every decoder name DESIGN 3b defines; IMPLEMENTED are those this build has. A configured
# decoder outside IMPLEMENTED stops start-up rather than dropping its messages.
DECODERS = ("native", "flat_json", "tasmota", "value", "senml", "sparkplug_b", "ttn")
IMPLEMENTED = ("native", "flat_json", "tasmota", "value", "senml", "sparkplug_b", "ttn")
SENML_BASE_NAME = "bn"  # the one placeholder a senml serial may use that no topic level defines
_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)(\+?)\}")
_TEMPLATE_FIELD = re.compile(r"\{([^{}]*)\}")
_PLAIN_TEMPLATE = re.compile(r"(?:[^{}]|\{[A-Za-z_][A-Za-z0-9_]*\})*")
_KEYS = frozenset(
    {
        "name",
        "topic",
        "decoder",
        "serial",
        "time_zone",
        "metric",
        "root",
        "time_field",
        "include",
        "exclude",
        "rename",
        "values",
        "exclude_topics",
    }
)
# Options that only some decoders read; set on another they would be silently ignored.
_ONLY_FOR = {
    "metric": ("value",),
    "root": ("flat_json",),
    "time_field": ("flat_json",),
    "time_zone": ("flat_json", "tasmota"),
}
_NO_KEYS = ("value", "native")  # decoders whose messages have no keys for include/exclude


@dataclass(frozen=True)
class SourceTopic:
    """A validated source topic pattern; ``match`` gives the placeholders' values or None."""

    pattern: str
    names: tuple[str, ...] = field(init=False, compare=False)
    subscription: str = field(init=False, compare=False)
    _regex: re.Pattern[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        pattern = self.pattern
        if not pattern:
            raise ValueError("topic is empty")
        if pattern.startswith("$"):
            raise ValueError(f"topic {pattern!r} starts with '$': such topics belong to the broker")
        if "\x00" in pattern or "+" in _PLACEHOLDER.sub("", pattern) or "#" in pattern:
            raise ValueError(
                f"topic {pattern!r} contains an MQTT wildcard or NUL: write a placeholder such "
                "as {node} for a level"
            )
        names: list[str] = []
        filters: list[str] = []
        regex: list[str] = []
        levels = pattern.split("/")
        multi_at: int | None = None
        for index, level in enumerate(levels):
            found = _PLACEHOLDER.fullmatch(level)
            if found is None:
                if "{" in level or "}" in level:
                    raise ValueError(
                        f"topic {pattern!r} has level {level!r}: a placeholder ({{x}} or {{x+}}) "
                        "must be a whole level"
                    )
                filters.append(level)
                regex.append(re.escape(level))
                continue
            name, multi = found.group(1), found.group(2) == "+"
            if name in names:
                raise ValueError(f"topic {pattern!r} uses {{{name}}} twice")
            names.append(name)
            if multi:
                multi_at = index
                regex.append(rf"(?!\$)(?P<{name}>.+)" if index == 0 else f"(?P<{name}>.+)")
                filters.append("#")
            else:
                regex.append(rf"(?!\$)(?P<{name}>[^/]*)" if index == 0 else f"(?P<{name}>[^/]*)")
                filters.append("+")
        if multi_at is not None:
            later = [lv for lv in levels[multi_at + 1 :] if _PLACEHOLDER.fullmatch(lv)]
            if later:
                raise ValueError(
                    f"topic {pattern!r}: only the last placeholder may be {{x+}} (several levels)"
                )
            # MQTT's "#" ends a filter: subscribe to everything below the "+" level; the regex
            # then keeps only topics that end with the literal levels after it.
            filters = filters[: multi_at + 1]
        object.__setattr__(self, "names", tuple(names))
        object.__setattr__(self, "subscription", "/".join(filters))
        object.__setattr__(self, "_regex", re.compile("/".join(regex)))

    def match(self, topic: str) -> dict[str, str] | None:
        """The placeholders' values when ``topic`` fits this pattern, else None."""
        found = self._regex.fullmatch(topic)
        return None if found is None else found.groupdict()


def filter_matches(topic_filter: str, topic: str) -> bool:
    """MQTT filter matching: ``+`` one level, ``#`` the rest, no wildcard over ``$`` topics."""
    f_levels = topic_filter.split("/")
    t_levels = topic.split("/")
    if topic.startswith("$") and f_levels[0] in ("+", "#"):
        return False
    for index, level in enumerate(f_levels):
        if level == "#":
            return True
        if index >= len(t_levels):
            return False
        if level != "+" and level != t_levels[index]:
            return False
    return len(f_levels) == len(t_levels)


def _valid_filter(text: str) -> bool:
    levels = text.split("/")
    for index, level in enumerate(levels):
        if level == "#" and index != len(levels) - 1:
            return False
        if level not in ("+", "#") and ("+" in level or "#" in level):
            return False
    return bool(text) and "\x00" not in text


@dataclass(frozen=True)
class Source:
    """One validated ``[[sources]]`` entry."""

    name: str
    topic: SourceTopic
    decoder: str
    serial: str | None = None
    time_zone: zoneinfo.ZoneInfo | None = None
    metric: str | None = None
    root: tuple[str, ...] = ()
    time_field: tuple[str, ...] = ()
    include: tuple[str, ...] | None = None
    exclude: tuple[str, ...] = ()
    rename: Mapping[str, str] = field(default_factory=dict)
    values: Mapping[str, bool | int | float | str] = field(default_factory=dict)
    exclude_topics: tuple[str, ...] = ()

    def keeps(self, key: str) -> bool:
        """Whether a key (below root, nested keys joined with ".") passes include/exclude."""
        if self.include is None and not self.exclude:
            return True  # the common case, once per key of every message
        if self.include is not None and globs(self.include).match(key) is None:
            return False
        return not (self.exclude and globs(self.exclude).match(key))

    def ignores(self, topic: str) -> bool:
        """Whether ``topic`` is one of ``exclude_topics`` (noise such as bridge state)."""
        return bool(self.exclude_topics) and any(
            filter_matches(f, topic) for f in self.exclude_topics
        )

    def serial_for(self, fields: Mapping[str, str]) -> str | None:
        """The serial template filled from the topic's placeholders (None when unset)."""
        return None if self.serial is None else _fill(self.serial, fields)

    def metric_for(self, fields: Mapping[str, str]) -> str | None:
        """The metric template filled from the topic's placeholders (value decoder)."""
        return None if self.metric is None else _fill(self.metric, fields)


@functools.cache
def globs(patterns: tuple[str, ...]) -> re.Pattern[str]:
    """One pattern matching what any of the fnmatch globs matches (case-sensitive), compiled
    once per source: a key is then tested in one C call rather than one fnmatch per glob."""
    return re.compile("|".join(f"(?:{fnmatch.translate(p)})" for p in patterns))


@functools.cache
def template_fields(template: str) -> frozenset[str]:
    """The placeholders a template uses ("tas-{node}": node); cached, asked once per message."""
    return frozenset(_TEMPLATE_FIELD.findall(template))


@functools.cache
def _plain(template: str) -> bool:
    """Whether every brace of ``template`` belongs to a ``{name}`` field, so that
    ``str.format_map`` reads it exactly as ``_TEMPLATE_FIELD`` does."""
    return _PLAIN_TEMPLATE.fullmatch(template) is not None


def _fill(template: str, fields: Mapping[str, str]) -> str:
    if _plain(template):
        try:
            return template.format_map(fields)  # once per message: one C call
        except KeyError:
            pass  # a field the topic did not give (senml's {bn} before it is known)
    return _TEMPLATE_FIELD.sub(lambda m: fields.get(m.group(1), ""), template)


def parse_sources(raw: object) -> tuple[Source, ...]:
    """Validate the setting's value; ValueError lists every mistake, one line each."""
    if not isinstance(raw, list | tuple):
        raise ValueError("must be an array of tables ([[sources]]) or a JSON list of objects")
    problems: list[str] = []
    result: list[Source] = []
    names: set[str] = set()
    filters: set[str] = set()
    for index, entry in enumerate(raw):
        label = f"sources[{index}]"
        if isinstance(entry, Mapping) and isinstance(entry.get("name"), str):
            label = f"sources[{index}] ({entry['name']!r})"
        mistakes: list[str] = []
        source = _parse_source(entry, mistakes)
        problems.extend(f"{label}: {m}" for m in mistakes)
        if source is None:
            continue
        if source.name in names:
            problems.append(f"{label}: name {source.name!r} is used by an earlier source")
        names.add(source.name)
        if source.topic.subscription in filters:
            # The broker would deliver each message once per identical filter.
            problems.append(
                f"{label}: topic subscribes to {source.topic.subscription!r} like an earlier source"
            )
        filters.add(source.topic.subscription)
        result.append(source)
    if problems:
        raise ValueError("\n".join(problems))
    return tuple(result)


def sparkplug_topic_problems(pattern: str) -> list[str]:
    """What keeps a sparkplug_b topic from being the Sparkplug namespace (empty: nothing).

    ``spBv1.0/{group}/{type}/{node}`` (edge node messages) or ``.../{node}/{device}`` (device
    messages); group, node and device may be literals; the message type must be a placeholder,
    since births and data of one node arrive on the same pattern.
    """
    levels = pattern.split("/")
    example = "'spBv1.0/{group}/{type}/{node}' or 'spBv1.0/{group}/{type}/{node}/{device}'"
    if levels[0] != "spBv1.0" or len(levels) not in (4, 5):
        return [f"a sparkplug_b topic is the Sparkplug namespace, {example}"]
    if any(level.endswith("+}") for level in levels):
        return ["a sparkplug_b topic has no {x+} placeholder: each Sparkplug level is one level"]
    if _PLACEHOLDER.fullmatch(levels[2]) is None:
        return [
            f"the message type level {levels[2]!r} must be a placeholder such as {{type}}: "
            "births and data arrive there"
        ]
    return []


def _strings(value: object, what: str, mistakes: list[str]) -> tuple[str, ...] | None:
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
        mistakes.append(f"{what} must be a list of strings")
        return None
    return tuple(value)


def _path(value: object, what: str, mistakes: list[str]) -> tuple[str, ...]:
    if not isinstance(value, str) or not value or any(not p for p in value.split(".")):
        mistakes.append(f"{what} must be a dotted path such as 'params' or 'params.ts'")
        return ()
    return tuple(value.split("."))


def _parse_source(entry: object, mistakes: list[str]) -> Source | None:  # noqa: C901
    if not isinstance(entry, Mapping):
        mistakes.append("must be a table with name, topic and decoder")
        return None
    unknown = sorted(set(entry) - _KEYS)
    if unknown:
        mistakes.append(f"unknown key(s) {', '.join(unknown)}")
    name, topic_text, decoder = entry.get("name"), entry.get("topic"), entry.get("decoder")
    if not isinstance(name, str) or not name.strip():
        mistakes.append("name is required (a non-empty string)")
    if not isinstance(decoder, str):
        mistakes.append(f"decoder is required (one of {', '.join(DECODERS)})")
    elif decoder not in DECODERS:
        mistakes.append(f"unknown decoder {decoder!r} (one of {', '.join(DECODERS)})")
    elif decoder not in IMPLEMENTED:
        mistakes.append(
            f"decoder {decoder!r} is not available in this version "
            f"(available: {', '.join(IMPLEMENTED)})"
        )
    topic: SourceTopic | None = None
    if not isinstance(topic_text, str):
        mistakes.append("topic is required (a string such as 'tele/{node}/SENSOR')")
    else:
        try:
            topic = SourceTopic(topic_text)
        except ValueError as exc:
            mistakes.append(str(exc))
    defined = set(topic.names) if topic is not None else set()
    if decoder == "sparkplug_b" and topic is not None:
        mistakes.extend(sparkplug_topic_problems(topic.pattern))
    for option, decoders in _ONLY_FOR.items():
        if option in entry and isinstance(decoder, str) and decoder not in decoders:
            mistakes.append(f"{option} is not read by the {decoder} decoder")

    serial = entry.get("serial")
    if serial is not None:
        if not isinstance(serial, str) or not serial:
            mistakes.append("serial must be a non-empty string template such as 'tas-{node}'")
            serial = None
        elif topic is not None:
            allowed = defined | ({SENML_BASE_NAME} if decoder == "senml" else set())
            for used in _TEMPLATE_FIELD.findall(serial):
                if used not in allowed:
                    mistakes.append(
                        f"serial uses {{{used}}}, which the topic {topic.pattern!r} does not define"
                    )
    elif decoder not in ("native", "senml"):
        mistakes.append("serial is required: the device's serial_id, e.g. 'tas-{node}'")

    metric = entry.get("metric")
    if decoder == "value":
        if not isinstance(metric, str) or not metric:
            mistakes.append("metric is required for the value decoder, e.g. '{object}'")
            metric = None
        elif topic is not None:
            for used in _TEMPLATE_FIELD.findall(metric):
                if used not in defined:
                    mistakes.append(
                        f"metric uses {{{used}}}, which the topic {topic.pattern!r} does not define"
                    )
    time_zone = None
    if "time_zone" in entry:
        zone = entry["time_zone"]
        try:
            time_zone = zoneinfo.ZoneInfo(zone) if isinstance(zone, str) and zone else None
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            time_zone = None
        if time_zone is None:
            mistakes.append(
                f"time_zone {zone!r} is not an IANA time zone such as 'Europe/Amsterdam'"
            )
    root = _path(entry["root"], "root", mistakes) if "root" in entry else ()
    time_field = _path(entry["time_field"], "time_field", mistakes) if "time_field" in entry else ()

    include = _strings(entry["include"], "include", mistakes) if "include" in entry else None
    exclude = _strings(entry.get("exclude", []), "exclude", mistakes) or ()
    if include is not None:
        if decoder in _NO_KEYS:
            mistakes.append(f"include can match nothing: the {decoder} decoder reads no keys")
        elif not include:
            mistakes.append("include is empty, so it can match nothing (leave it out to keep all)")
        for glob in include:
            covering = [e for e in exclude if fnmatch.fnmatchcase(glob, e)]
            if not glob:
                mistakes.append("include has an empty pattern, which can match no key")
            elif covering:
                mistakes.append(
                    f"include {glob!r} can match nothing: exclude {covering[0]!r} removes "
                    "every key it matches"
                )
    if exclude and decoder in _NO_KEYS:
        mistakes.append(f"exclude is not read by the {decoder} decoder (it reads no keys)")
    rename = _mapping(entry.get("rename", {}), "rename", mistakes, str)
    values = _mapping(entry.get("values", {}), "values", mistakes, bool | int | float | str)
    exclude_topics = _strings(entry.get("exclude_topics", []), "exclude_topics", mistakes) or ()
    for text in exclude_topics:
        if not _valid_filter(text):
            mistakes.append(f"exclude_topics {text!r} is not a valid MQTT topic filter")
    if mistakes or topic is None or not isinstance(name, str) or not isinstance(decoder, str):
        return None
    return Source(
        name=name,
        topic=topic,
        decoder=decoder,
        serial=serial,
        time_zone=time_zone,
        metric=metric,
        root=root,
        time_field=time_field,
        include=include,
        exclude=exclude,
        rename={str(k): str(v) for k, v in rename.items()},
        values=dict(values),
        exclude_topics=exclude_topics,
    )


def _mapping(value: object, what: str, mistakes: list[str], kind: Any) -> Mapping[str, Any]:
    if not isinstance(value, Mapping) or not all(
        isinstance(k, str) and isinstance(v, kind) for k, v in value.items()
    ):
        mistakes.append(f"{what} must be a table of name = value")
        return {}
    return value
