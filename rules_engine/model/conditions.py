"""Rule conditions: the JSON forms `rules.condition` may take, parsed and checked against the
metric's data type before any reading is evaluated."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import time
from functools import lru_cache
from typing import Annotated, Any, Final, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
)

from schema.types import DATA_TYPES, DataType

MAX_RATE_COUNT: Final = 1000  # readings; a rate window keeps this many timestamps in the state
MAX_COMPOSITE_DEPTH: Final = 4  # nested composites, counting the outermost
MAX_COMPOSITE_CONDITIONS: Final = 20  # sub-conditions in one composite
MAX_MINUTES: Final = 366 * 24 * 60  # minutes; anything longer than a year is a typo
# A whole rule (its condition, sub-conditions and clear): each condition is evaluated on every
# reading, so 20 per composite and 4 levels alone would allow 160,000 of them.
MAX_RULE_CONDITIONS: Final = 64
# Readings all rate windows of a rule keep together (each keeps up to its `count` timestamps in
# the stored state, which must stay small: rule_json reads at most 64 KiB of it).
MAX_RULE_RATE_COUNT: Final = MAX_RATE_COUNT

Comparison = Literal[">", ">=", "<", "<=", "==", "!="]
Ordering = Literal[">", ">=", "<", "<="]


class InvalidRule(Exception):
    """A rule's condition or action is invalid."""

    def __init__(
        self,
        detail: str | None = None,
        *,
        rule_id: int | None = None,
        problems: Sequence[str] = (),
        reason: str = "invalid",
    ) -> None:
        # A stable code for logs and metrics (rule_json.REASONS): what kind of problem it is.
        self.reason = reason
        self.problems: tuple[str, ...] = tuple(problems) or ((detail,) if detail else ())
        self.detail = detail or "; ".join(self.problems) or (self.__doc__ or "")
        self.rule_id = rule_id
        super().__init__(self.detail if rule_id is None else f"rule {rule_id}: {self.detail}")


def show(value: object, limit: int = 60) -> str:
    """A short JSON-flavoured rendering of a user-supplied value for error messages."""
    if isinstance(value, str):
        text = repr(value)
    elif isinstance(value, bool) or value is None:
        text = json.dumps(value)
    elif isinstance(value, int | float):
        text = repr(value)
    else:
        try:
            text = json.dumps(value, default=repr, ensure_ascii=False)
        except (TypeError, ValueError):
            text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ---------------------------------------------------------------------------------------------
# Field validators. They run before pydantic's own coercion, because lax pydantic would accept
# "27.5" or true as a number, and its generic messages do not say what the field is for.


def _number(what: str) -> Callable[[object], object]:
    def check(value: object) -> object:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"{what} needs a number, got {show(value)}")
        if not math.isfinite(value):
            raise ValueError(f"{what} needs a finite number, got {show(value)}")
        return value

    return check


def _minutes(what: str, *, positive: bool) -> Callable[[object], object]:
    def check(value: object) -> object:
        bound = "> 0" if positive else ">= 0"
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"{what} needs a number of minutes {bound}, got {show(value)}")
        if not math.isfinite(value) or value < 0 or (positive and value == 0):
            raise ValueError(f"{what} needs a number of minutes {bound}, got {show(value)}")
        if value > MAX_MINUTES:
            raise ValueError(f"{what} must be at most {MAX_MINUTES} minutes, got {show(value)}")
        return value

    return check


def _boolean(what: str) -> Callable[[object], object]:
    def check(value: object) -> object:
        if not isinstance(value, bool):
            raise ValueError(f"{what} needs true or false, got {show(value)}")
        return value

    return check


def _text(what: str) -> Callable[[object], object]:
    def check(value: object) -> object:
        if not isinstance(value, str):
            raise ValueError(f"{what} needs a string, got {show(value)}")
        return value

    return check


def _string_match_value(value: object) -> object:
    if isinstance(value, str):
        return value
    if isinstance(value, list | tuple) and all(isinstance(item, str) for item in value):
        return tuple(value)
    raise ValueError(
        f"string_match needs a string (or a list of strings for 'in'), got {show(value)}"
    )


def _count(value: object) -> object:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"rate needs a whole number of readings >= 1, got {show(value)}")
    if not 1 <= value <= MAX_RATE_COUNT:
        raise ValueError(f"rate count must be between 1 and {MAX_RATE_COUNT}, got {value}")
    return value


def _clear_range(value: object) -> object:
    numbers = _number("range clear_value")
    if isinstance(value, list | tuple) and len(value) == 2:
        return (numbers(value[0]), numbers(value[1]))
    raise ValueError(f"range clear_value needs a pair [low, high] of numbers, got {show(value)}")


@dataclass(frozen=True)
class TimeWindow:
    """A daily local-time window; start inclusive, end exclusive, wrapping midnight if needed."""

    start: time
    end: time

    def contains(self, moment: time) -> bool:
        moment = moment.replace(tzinfo=None)
        if self.start < self.end:
            return self.start <= moment < self.end
        return moment >= self.start or moment < self.end

    def __str__(self) -> str:
        return f"{self.start:%H:%M}-{self.end:%H:%M}"


_WINDOW_RE = re.compile(r"\s*(\d{1,2}):(\d{2})\s*-\s*(\d{1,2}):(\d{2})\s*")


@lru_cache(maxsize=256)
def parse_time_window(text: str) -> TimeWindow:
    """Parse `HH:MM-HH:MM`; raises ValueError saying what is wrong."""
    found = _WINDOW_RE.fullmatch(text)
    if found is None:
        raise ValueError(f"needs the form HH:MM-HH:MM (e.g. 22:00-06:00), got {show(text)}")
    h1, m1, h2, m2 = (int(part) for part in found.groups())
    if h1 > 23 or h2 > 23 or m1 > 59 or m2 > 59:
        raise ValueError(f"an hour is above 23 or a minute above 59 in {show(text)}")
    window = TimeWindow(time(h1, m1), time(h2, m2))
    if window.start == window.end:
        raise ValueError(f"the window starts and ends at the same time: {show(text)}")
    return window


def _time_restriction(value: object) -> object:
    if not isinstance(value, str):
        raise ValueError(f"needs a string HH:MM-HH:MM, got {show(value)}")
    parse_time_window(value)
    return value


Minutes = Annotated[float, BeforeValidator(_minutes("duration_minutes", positive=False))]
Cooldown = Annotated[float, BeforeValidator(_minutes("cooldown_minutes", positive=False))]
TimeRestriction = Annotated[str, BeforeValidator(_time_restriction)]


# ---------------------------------------------------------------------------------------------
# The models. `type` is the discriminator; extra keys are refused so that a typo such as
# "duraton_minutes" is reported instead of silently ignored.


class _Condition(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    duration_minutes: Minutes | None = None
    time_restriction: TimeRestriction | None = None
    cooldown_minutes: Cooldown | None = None
    clear: Condition | None = None

    @property
    def window(self) -> TimeWindow | None:
        """The parsed time_restriction, if any."""
        return None if self.time_restriction is None else parse_time_window(self.time_restriction)

    @property
    def hold_minutes(self) -> float:
        """How long the condition must hold before it counts (0: at once)."""
        return self.duration_minutes or 0.0


class Threshold(_Condition):
    """`value <operator> bound` on a numeric metric."""

    type: Literal["threshold"]
    operator: Comparison
    value: Annotated[float, BeforeValidator(_number("a numeric threshold"))]
    clear_value: Annotated[float, BeforeValidator(_number("clear_value"))] | None = None


class Range(_Condition):
    """The value is `inside` or `outside` `[min, max]` (bounds inclusive) on a numeric metric."""

    type: Literal["range"]
    operator: Literal["inside", "outside"]
    min: Annotated[float, BeforeValidator(_number("range min"))]
    max: Annotated[float, BeforeValidator(_number("range max"))]
    clear_value: Annotated[tuple[float, float], BeforeValidator(_clear_range)] | None = None


class BooleanCondition(_Condition):
    """`value == true` / `value != false` on a boolean metric."""

    type: Literal["boolean"]
    operator: Literal["==", "!="]
    value: Annotated[bool, BeforeValidator(_boolean("a boolean condition"))]


class StringMatch(_Condition):
    """`==`, `!=`, `in` (a list) or `contains` (a substring) on a string metric; case-sensitive."""

    type: Literal["string_match"]
    operator: Literal["==", "!=", "in", "contains"]
    value: Annotated[str | tuple[str, ...], BeforeValidator(_string_match_value)]


class Rate(_Condition):
    """At least `count` readings within the last `duration_minutes` (the sliding window)."""

    type: Literal["rate"]
    count: Annotated[int, BeforeValidator(_count)]
    duration_minutes: Annotated[  # here: the window, and required
        float, BeforeValidator(_minutes("rate window duration_minutes", positive=True))
    ]

    @property
    def hold_minutes(self) -> float:
        return 0.0


class Delta(_Condition):
    """Change per minute between consecutive readings compared with a bound."""

    type: Literal["delta"]
    operator: Ordering
    value: Annotated[float, BeforeValidator(_number("a delta bound (change per minute)"))]
    absolute: Annotated[bool, BeforeValidator(_boolean("delta absolute"))] = False


class NoData(_Condition):
    """No reading for `minutes` (checked on a timer, resolved by the next reading)."""

    type: Literal["no_data"]
    minutes: Annotated[float, BeforeValidator(_minutes("no_data minutes", positive=True))]


class Composite(_Condition):
    """`AND` / `OR` of sub-conditions, all evaluated on the same reading."""

    type: Literal["composite"]
    operator: Literal["AND", "OR"]
    conditions: tuple[Condition, ...]


Condition = Annotated[
    Threshold | Range | BooleanCondition | StringMatch | Rate | Delta | NoData | Composite,
    Field(discriminator="type"),
]

CONDITION_MODELS: Final[Mapping[str, type[_Condition]]] = {
    "threshold": Threshold,
    "range": Range,
    "boolean": BooleanCondition,
    "string_match": StringMatch,
    "rate": Rate,
    "delta": Delta,
    "no_data": NoData,
    "composite": Composite,
}

_Condition.model_rebuild()
for _model in CONDITION_MODELS.values():
    _model.model_rebuild()

_ADAPTER: TypeAdapter[Condition] = TypeAdapter(Condition)

_DATA_TYPES_OF: Final[Mapping[str, tuple[DataType, ...]]] = {
    "threshold": ("numeric",),
    "range": ("numeric",),
    "delta": ("numeric",),
    "boolean": ("boolean",),
    "string_match": ("str",),
    "rate": DATA_TYPES,
    "no_data": DATA_TYPES,
    "composite": DATA_TYPES,
}

_NEGATED: Final[Mapping[str, Ordering]] = {">": "<=", ">=": "<", "<": ">=", "<=": ">"}


# ---------------------------------------------------------------------------------------------
# Parsing and checking.


def parse_condition(raw: object, data_type: DataType, *, rule_id: int | None = None) -> Condition:
    """Parse a rule's condition JSON and check it fits a metric of `data_type`.

    Raises InvalidRule listing every problem found, each prefixed with its JSON path.
    """
    if data_type not in DATA_TYPES:
        raise InvalidRule(
            f"metric data_type {show(data_type)} is not one of {', '.join(DATA_TYPES)}",
            rule_id=rule_id,
        )
    if not isinstance(raw, Mapping):
        raise InvalidRule(f"condition: must be a JSON object, got {show(raw)}", rule_id=rule_id)
    try:
        condition = _ADAPTER.validate_python(dict(raw))
    except ValidationError as exc:
        problems = validation_problems(exc, "condition", CONDITION_MODELS, "condition")
        raise InvalidRule(rule_id=rule_id, problems=problems) from None
    problems = list(_semantic_problems(condition, data_type, "condition", depth=1, nested=False))
    problems.extend(_size_problems(condition))
    if problems:
        raise InvalidRule(rule_id=rule_id, problems=problems)
    return condition


def clear_condition_of(condition: Condition) -> Condition | None:
    """The condition that resolves a FIRING rule; None means "the condition no longer holds"."""
    if condition.clear is not None:
        return condition.clear
    if isinstance(condition, Threshold) and condition.clear_value is not None:
        if condition.operator in ("==", "!="):  # refused by parse_condition; be safe anyway
            return None
        return Threshold(
            type="threshold", operator=_NEGATED[condition.operator], value=condition.clear_value
        )
    if isinstance(condition, Range) and condition.clear_value is not None:
        low, high = condition.clear_value
        flipped: Literal["inside", "outside"] = (
            "inside" if condition.operator == "outside" else "outside"
        )
        return Range(type="range", operator=flipped, min=low, max=high)
    return None


def _walk(cond: Condition) -> Iterator[Condition]:
    """The condition and everything below it (sub-conditions, clear), without recursion."""
    stack = [cond]
    while stack:
        node = stack.pop()
        yield node
        if node.clear is not None:
            stack.append(node.clear)
        if isinstance(node, Composite):
            stack.extend(node.conditions)


def _size_problems(cond: Condition) -> Iterator[str]:
    """What one rule costs per reading and in its stored state, bounded for the whole rule."""
    nodes = list(_walk(cond))
    if len(nodes) > MAX_RULE_CONDITIONS:
        yield (
            f"condition: at most {MAX_RULE_CONDITIONS} conditions in one rule (sub-conditions "
            f"and clear included), got {len(nodes)}"
        )
    kept = sum(node.count for node in nodes if isinstance(node, Rate))
    if kept > MAX_RULE_RATE_COUNT:
        yield (
            f"condition: the rate conditions of one rule may keep at most {MAX_RULE_RATE_COUNT} "
            f"readings together (the sum of their counts), got {kept}"
        )


def _semantic_problems(
    cond: Condition, data_type: DataType, path: str, *, depth: int, nested: bool
) -> Iterator[str]:
    """Checks that need more than one field, the metric's data type, or the nesting context."""
    allowed = _DATA_TYPES_OF[cond.type]
    if data_type not in allowed:
        yield (
            f"{path}.type: a {cond.type} condition needs a {' or '.join(allowed)} metric, "
            f"but this metric's data_type is {show(data_type)}"
        )
        return
    if nested:
        for name in ("cooldown_minutes", "clear", "clear_value"):
            if getattr(cond, name, None) is not None:
                yield f"{path}.{name}: applies to the whole rule; put it on the top-level condition"
        if isinstance(cond, NoData):
            yield f"{path}.type: no_data is checked on a timer and cannot be nested"
            return
    if cond.clear is not None and getattr(cond, "clear_value", None) is not None:
        yield f"{path}: give either clear or clear_value, not both"
    if cond.clear is not None:
        yield from _semantic_problems(
            cond.clear, data_type, f"{path}.clear", depth=depth, nested=True
        )

    if isinstance(cond, Threshold) and cond.clear_value is not None:
        if cond.operator in ("==", "!="):
            yield f"{path}.clear_value: only works with > >= < <=, not {cond.operator}"
        elif cond.operator in (">", ">=") and cond.clear_value > cond.value:
            yield (
                f"{path}.clear_value: must be <= value {cond.value:g} for operator "
                f"{cond.operator}, got {cond.clear_value:g}"
            )
        elif cond.operator in ("<", "<=") and cond.clear_value < cond.value:
            yield (
                f"{path}.clear_value: must be >= value {cond.value:g} for operator "
                f"{cond.operator}, got {cond.clear_value:g}"
            )
    elif isinstance(cond, Range):
        if cond.min > cond.max:
            yield f"{path}.min: {cond.min:g} is greater than max {cond.max:g}"
        elif cond.clear_value is not None:
            low, high = cond.clear_value
            if low > high:
                yield f"{path}.clear_value: low {low:g} is greater than high {high:g}"
            elif cond.operator == "outside" and not cond.min <= low <= high <= cond.max:
                yield (
                    f"{path}.clear_value: for outside, [{low:g}, {high:g}] must lie within "
                    f"[{cond.min:g}, {cond.max:g}]"
                )
            elif cond.operator == "inside" and not low <= cond.min <= cond.max <= high:
                yield (
                    f"{path}.clear_value: for inside, [{low:g}, {high:g}] must contain "
                    f"[{cond.min:g}, {cond.max:g}]"
                )
    elif isinstance(cond, StringMatch):
        value = list(cond.value) if isinstance(cond.value, tuple) else cond.value
        if cond.operator == "in":
            if not isinstance(cond.value, tuple) or not cond.value:
                yield f"{path}.value: 'in' needs a non-empty list of strings, got {show(value)}"
        elif not isinstance(cond.value, str):
            yield f"{path}.value: {cond.operator!r} needs a string, got {show(list(cond.value))}"
        elif cond.operator == "contains" and not cond.value:
            yield f"{path}.value: 'contains' needs a non-empty string"
    elif isinstance(cond, Delta):
        if cond.absolute and cond.value < 0:
            yield f"{path}.value: with absolute, the bound must be >= 0, got {cond.value:g}"
    elif isinstance(cond, NoData):
        if cond.duration_minutes is not None:
            yield f"{path}.duration_minutes: no_data takes its time in minutes only"
        if cond.clear is not None:
            yield f"{path}.clear: no_data resolves on the next reading; it takes no clear"
    elif isinstance(cond, Composite):
        if not cond.conditions:
            yield f"{path}.conditions: a composite needs at least one condition"
        elif len(cond.conditions) > MAX_COMPOSITE_CONDITIONS:
            yield (
                f"{path}.conditions: at most {MAX_COMPOSITE_CONDITIONS} conditions, "
                f"got {len(cond.conditions)}"
            )
        elif depth >= MAX_COMPOSITE_DEPTH and any(
            isinstance(sub, Composite) for sub in cond.conditions
        ):
            yield f"{path}.conditions: composites nest at most {MAX_COMPOSITE_DEPTH} deep"
        else:
            for index, sub in enumerate(cond.conditions):
                yield from _semantic_problems(
                    sub, data_type, f"{path}.conditions[{index}]", depth=depth + 1, nested=True
                )


def validation_problems(
    exc: ValidationError,
    root: str,
    models: Mapping[str, type[BaseModel]],
    noun: str,
    *,
    tag_after: frozenset[str] = frozenset({"clear"}),
) -> list[str]:
    """Turn pydantic errors into `path: message` lines.

    Pydantic puts the discriminator's tag into an error's location (`threshold.value`); it is
    dropped where a tag can stand: first, after a list index, or after a field in `tag_after`.
    """
    lines: list[str] = []
    for error in exc.errors(include_url=False):
        path = root
        model: type[BaseModel] | None = None
        previous: str | int | None = None
        for index, item in enumerate(error["loc"]):
            at_tag = index == 0 or isinstance(previous, int) or previous in tag_after
            if isinstance(item, str) and item in models and at_tag:
                model = models[item]
                previous = None
                continue
            path += f"[{item}]" if isinstance(item, int) else f".{item}"
            previous = item
        lines.append(f"{path}: {_message(error, model, models, noun)}")
    return lines


def _message(
    error: Any, model: type[BaseModel] | None, models: Mapping[str, type[BaseModel]], noun: str
) -> str:
    kind = error["type"]
    given = error.get("input")
    if kind == "value_error":
        return str(error["ctx"]["error"])
    if kind == "missing":
        return "is required"
    if kind == "extra_forbidden":
        if model is None:
            return "unknown field"
        tag = next((name for name, cls in models.items() if cls is model), model.__name__)
        allowed = ", ".join(sorted(model.model_fields, key=lambda name: name != "type"))
        return f"unknown field for a {tag} {noun} (allowed: {allowed})"
    if kind == "union_tag_invalid":
        return (
            f"unknown {noun} type {show(error['ctx']['tag'])}; expected one of {', '.join(models)}"
        )
    if kind == "union_tag_not_found":
        return f"needs a 'type', one of {', '.join(models)}"
    if kind in ("list_type", "tuple_type"):
        return f"must be a JSON list, got {show(given)}"
    if kind in ("model_attributes_type", "dict_type", "model_type"):
        return f"must be a JSON object, got {show(given)}"
    if kind == "literal_error":
        field = str(error["loc"][-1]) if error["loc"] else "value"
        return f"unknown {field} {show(given)}; expected {error['ctx']['expected']}"
    text: str = error["msg"]
    return f"{text[:1].lower()}{text[1:]}, got {show(given)}"


# ---------------------------------------------------------------------------------------------
# Human-readable descriptions, used in transition reasons and by `iothub rules check`.


def format_number(value: float) -> str:
    """A number as a person would write it: 10 rather than 10.0, 27.5 as is."""
    return str(int(value)) if float(value).is_integer() and abs(value) < 1e15 else repr(value)


def describe_core(cond: Condition) -> str:
    """What the condition tests, without its modifiers: `value > 27.5`."""
    if isinstance(cond, Threshold):
        return f"value {cond.operator} {format_number(cond.value)}"
    if isinstance(cond, Range):
        return f"value {cond.operator} [{format_number(cond.min)}, {format_number(cond.max)}]"
    if isinstance(cond, BooleanCondition):
        return f"value {cond.operator} {show(cond.value)}"
    if isinstance(cond, StringMatch):
        shown = show(list(cond.value)) if isinstance(cond.value, tuple) else show(cond.value)
        return f"value {cond.operator} {shown}"
    if isinstance(cond, Rate):
        return f"at least {cond.count} readings in {format_number(cond.duration_minutes)} min"
    if isinstance(cond, Delta):
        subject = "|change per minute|" if cond.absolute else "change per minute"
        return f"{subject} {cond.operator} {format_number(cond.value)}"
    if isinstance(cond, NoData):
        return f"no reading for {format_number(cond.minutes)} min"
    inner = f" {cond.operator} ".join(describe(sub) for sub in cond.conditions)
    return f"({inner})"


def describe(cond: Condition) -> str:
    """The condition with its modifiers: `value > 27.5 for 10 min during 22:00-06:00`."""
    text = describe_core(cond)
    if cond.hold_minutes:
        text += f" for {format_number(cond.hold_minutes)} min"
    if cond.time_restriction is not None:
        text += f" during {cond.window}"
    return text


__all__ = [
    "DATA_TYPES",
    "BooleanCondition",
    "Composite",
    "Condition",
    "DataType",
    "Delta",
    "InvalidRule",
    "NoData",
    "Range",
    "Rate",
    "StringMatch",
    "Threshold",
    "TimeWindow",
    "clear_condition_of",
    "describe",
    "describe_core",
    "format_number",
    "parse_condition",
    "parse_time_window",
    "validation_problems",
]
