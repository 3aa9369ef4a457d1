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


def render(template: str, context: Mapping[str, object]) -> str:
    """Replace `{name}` by `context[name]`; never raises and never evaluates the template.

    The result is at most MAX_RENDERED_CHARS long (cut with TRUNCATED): a template that repeats
    `{value}` hundreds of times over a long string value must not make an event or a message
    of megabytes."""
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
        if size > MAX_RENDERED_CHARS:
            break
    else:
        parts.append(template[end:])
        size += len(template) - end
    text = "".join(parts)
    if size > MAX_RENDERED_CHARS:
        return text[: MAX_RENDERED_CHARS - len(TRUNCATED)] + TRUNCATED
    return text


def render_json(document: JsonValue, context: Mapping[str, object]) -> JsonValue:
    """Render every string value inside a JSON-like document (keys and non-strings unchanged)."""
    if isinstance(document, str):
        return render(document, context)
    if isinstance(document, list):
        return [render_json(item, context) for item in document]
    if isinstance(document, dict):
        return {key: render_json(item, context) for key, item in document.items()}
    return document


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
