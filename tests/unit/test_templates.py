"""Rendering user-written action templates safely."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from pydantic import JsonValue

from rules_engine.model import templates
from rules_engine.model.templates import render, render_json

CONTEXT: dict[str, object] = {
    "device_name": "Boiler room",
    "serial_id": "SN-A1-TEMP-0001",
    "metric": "temperature",
    "value": 28.1,
    "ts": datetime(2026, 1, 27, 12, 0, tzinfo=UTC),
    "rule_name": "too hot",
}


def test_known_placeholders_are_replaced() -> None:
    """Every documented placeholder is replaced by its context value."""
    text = render(
        "High temperature in {device_name} ({serial_id}): {metric}={value}°C at {ts} [{rule_name}]",
        CONTEXT,
    )
    assert text == (
        "High temperature in Boiler room (SN-A1-TEMP-0001): temperature=28.1°C "
        "at 2026-01-27T12:00:00+00:00 [too hot]"
    )


@pytest.mark.parametrize(
    "template",
    [
        "{unknown}",
        "{",
        "}",
        "{}",
        "{0}",
        "{value:>999999999}",
        "{value!r}",
        "{value.__class__}",
        "{value.__class__.__mro__}",
        "{value[0]}",
        "{ value }",
        "{device name}",
        "}{value",
    ],
)
def test_anything_else_is_left_as_written_and_never_raises(template: str) -> None:
    """Unknown names, stray braces, format specs, conversions and attribute access are not
    evaluated: the text comes back exactly as written."""
    assert render(template, CONTEXT) == template


def test_doubled_braces_are_escapes_as_with_str_format() -> None:
    """`{{value}}` renders the literal text `{value}`, as str.format would."""
    assert render("{{value}} is {value}", CONTEXT) == "{value} is 28.1"
    assert render("{{value}}", CONTEXT) == "{{value}}".format(**CONTEXT)
    assert render("{{{value}}}", CONTEXT) == "{{{value}}}".format(**CONTEXT) == "{28.1}"


def test_values_render_readably() -> None:
    """Booleans render as JSON does, None as empty, other values with str()."""
    assert render("{value}", {"value": True}) == "true"
    assert render("{value}", {"value": False}) == "false"
    assert render("[{value}]", {"value": None}) == "[]"
    assert render("{value}", {"value": "OK"}) == "OK"


def test_a_value_that_looks_like_a_template_is_not_rendered_again() -> None:
    """Substituted values are final: a device name containing `{serial_id}` stays as it is."""
    assert render("{device_name}", {"device_name": "{serial_id}", "serial_id": "x"}) == (
        "{serial_id}"
    )


def test_render_json_renders_every_string_and_keeps_structure() -> None:
    """Strings at any depth are rendered; keys, numbers, booleans and null are unchanged."""
    payload: JsonValue = {
        "device": "{serial_id}",
        "reading": {"value": "{value}", "unit": "C", "raw": 28.1},
        "tags": ["{metric}", "{nope}", 1, True, None],
        "{metric}": "key stays",
    }
    assert render_json(payload, CONTEXT) == {
        "device": "SN-A1-TEMP-0001",
        "reading": {"value": "28.1", "unit": "C", "raw": 28.1},
        "tags": ["temperature", "{nope}", 1, True, None],
        "{metric}": "key stays",
    }
    assert render_json("{rule_name}", CONTEXT) == "too hot"
    assert render_json(None, CONTEXT) is None


def test_placeholders_are_listed_and_unknown_ones_flagged() -> None:
    """`rules check` can warn about placeholders that will never be replaced."""
    template = "{device_name} {valeu} {value} {device_name} {{ts}} {x:1}"
    assert templates.placeholders(template) == ("device_name", "valeu", "value")
    assert templates.unknown_placeholders(template) == ("valeu",)


def test_rendering_is_bounded_however_often_a_long_value_repeats() -> None:
    """A template of 585 `{value}` over a 1,024-character value renders at most
    MAX_RENDERED_CHARS characters, cut with an ellipsis, instead of 600,000."""
    long_value = "x" * 1024
    rendered = templates.render("{value}" * 585, {"value": long_value})
    assert len(rendered) == templates.MAX_RENDERED_CHARS
    assert rendered.endswith(templates.TRUNCATED)
    assert templates.render("a{value}b", {"value": long_value}) == f"a{long_value}b"


def test_a_rendered_payload_is_bounded_as_a_whole() -> None:
    """A payload of 1,000 strings each rendering to 16 KiB stays within
    MAX_RENDERED_DOCUMENT_CHARS in all; its shape and its first strings are kept."""
    long_value = "x" * 1024
    payload: JsonValue = {"items": [{"text": "{value}" * 585, "n": i} for i in range(1000)]}
    rendered = render_json(payload, {"value": long_value})
    assert isinstance(rendered, dict)
    items = rendered["items"]
    assert isinstance(items, list) and len(items) == 1000
    texts = [item["text"] for item in items if isinstance(item, dict)]
    assert sum(len(t) for t in texts if isinstance(t, str)) <= (
        templates.MAX_RENDERED_DOCUMENT_CHARS + len(texts) * len(templates.TRUNCATED)
    )
    first = texts[0]
    assert isinstance(first, str)
    assert len(first) == templates.MAX_RENDERED_CHARS and first.endswith(templates.TRUNCATED)
    assert [item["n"] for item in items if isinstance(item, dict)] == list(range(1000))
