"""Safe rendering of user-written action templates (`"High temperature in {device_name}"`).

Templates are user data, so they are never given to `str.format`: that would evaluate format
specs and attribute or index access (`{value.__class__}`, `{value:>999999999}`) and raise on a
stray brace. Here only a bare `{name}` whose name is in the context is replaced; `{{` and `}}`
become single braces as with `str.format`; everything else is left exactly as written.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import datetime
from typing import Final

from pydantic import JsonValue

PLACEHOLDERS: Final = frozenset({"device_name", "serial_id", "metric", "value", "ts", "rule_name"})

MAX_RENDERED_CHARS: Final = 16_384  # characters of one rendered template
MAX_RENDERED_DOCUMENT_CHARS: Final = 65_536  # characters of all strings of one rendered payload
TRUNCATED: Final = "…"  # ends a rendered template that was cut at MAX_RENDERED_CHARS

_TOKEN = re.compile(r"\{\{|\}\}|\{([A-Za-z_][A-Za-z0-9_]*)\}")


def _text(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, datetime):
        return value.isoformat()
    return str(value)


def render(template: str, context: Mapping[str, object], *, limit: int = MAX_RENDERED_CHARS) -> str:
    """Replace `{name}` by `context[name]`; never raises and never evaluates the template.

    The result is at most `limit` (MAX_RENDERED_CHARS) long, cut with TRUNCATED: a template
    that repeats `{value}` hundreds of times over a long string value must not make an event or
    a message of megabytes."""
    limit = max(limit, len(TRUNCATED))
    parts: list[str] = []
    size = 0
    end = 0
    for found in _TOKEN.finditer(template):
        written = found.group(0)
        name = found.group(1)
        if written in ("{{", "}}"):
            replacement = written[0]
        elif name in context:
            replacement = _text(context[name])
        else:
            replacement = written
        for piece in (template[end : found.start()], replacement):
            parts.append(piece)
            size += len(piece)
        end = found.end()
        if size > limit:
            break
    else:
        parts.append(template[end:])
        size += len(template) - end
    text = "".join(parts)
    if size > limit:
        return text[: limit - len(TRUNCATED)] + TRUNCATED
    return text


def render_json(
    document: JsonValue, context: Mapping[str, object], *, limit: int = MAX_RENDERED_DOCUMENT_CHARS
) -> JsonValue:
    """Render every string value inside a JSON-like document (keys and non-strings unchanged).

    All rendered strings together are at most `limit` characters: once it is spent, each
    further string is cut to TRUNCATED (a payload of thousands of `{value}` strings must not
    make megabytes). Walked with an explicit stack; the result has the document's shape."""
    budget = limit

    def one(text: str) -> str:
        nonlocal budget
        rendered = render(text, context, limit=min(MAX_RENDERED_CHARS, budget))
        budget = max(0, budget - len(rendered))
        return rendered

    if isinstance(document, str):
        return one(document)
    if not isinstance(document, list | dict):
        return document
    root: list[JsonValue] = [None]
    # (container to fill, key or index, value to render)
    work: list[tuple[list[JsonValue] | dict[str, JsonValue], int | str, JsonValue]] = [
        (root, 0, document)
    ]
    while work:
        into, key, value = work.pop()
        if isinstance(value, str):
            copied: JsonValue = one(value)
        elif isinstance(value, list):
            items: list[JsonValue] = [None] * len(value)
            copied = items
            work.extend((items, i, item) for i, item in reversed(list(enumerate(value))))
        elif isinstance(value, dict):
            members: dict[str, JsonValue] = dict.fromkeys(value)
            copied = members
            work.extend((members, k, item) for k, item in reversed(list(value.items())))
        else:
            copied = value
        into[key] = copied  # type: ignore[index]
    return root[0]


def placeholders(template: str) -> tuple[str, ...]:
    """The placeholder names a template uses, in order of first use."""
    names = (found.group(1) for found in _TOKEN.finditer(template) if found.group(1))
    return tuple(dict.fromkeys(names))


def unknown_placeholders(template: str) -> tuple[str, ...]:
    """Placeholder names that are not among PLACEHOLDERS (left as written when rendered)."""
    return tuple(name for name in placeholders(template) if name not in PLACEHOLDERS)


__all__ = [
    "MAX_RENDERED_CHARS",
    "PLACEHOLDERS",
    "placeholders",
    "render",
    "render_json",
    "unknown_placeholders",
]
