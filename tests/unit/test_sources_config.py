"""The sources setting: topic patterns, templates and the start-up check of DESIGN 3b."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from config import sources
from config.settings import ConfigError, load_settings

TASMOTA = {
    "name": "tasmota",
    "topic": "tele/{node}/SENSOR",
    "decoder": "tasmota",
    "serial": "tas-{node}",
}


def _load(*entries: object) -> tuple[sources.Source, ...]:
    settings = load_settings(None, {"IOTHUB_SOURCES": json.dumps(list(entries))})
    return sources.parse_sources(settings.sources)


def test_unset_means_native_topics_only() -> None:
    """Without sources the setting is empty and only mqtt_topics are subscribed."""
    assert load_settings(None, {}).sources == ()


def test_env_json_builds_sources_in_order() -> None:
    """IOTHUB_SOURCES is a JSON list; placeholders become + and # in the subscription."""
    z2m = {
        "name": "z2m",
        "topic": "zigbee2mqtt/{name+}",
        "decoder": "flat_json",
        "serial": "z2m-{name}",
    }
    parsed = _load(TASMOTA, z2m)

    assert [s.name for s in parsed] == ["tasmota", "z2m"]
    assert parsed[0].topic.subscription == "tele/+/SENSOR"
    assert parsed[1].topic.subscription == "zigbee2mqtt/#"
    assert parsed[1].topic.match("zigbee2mqtt/kitchen/floor_light") == {
        "name": "kitchen/floor_light"
    }
    assert parsed[0].serial_for({"node": "plug1"}) == "tas-plug1"


def test_multi_level_placeholder_followed_by_literal_levels() -> None:
    """{x+} may be followed by literal levels: subscribe to # and keep only matching topics."""
    topic = sources.SourceTopic("homie/{device}/{node+}/state")

    assert topic.subscription == "homie/+/#"
    assert topic.match("homie/dev1/a/b/state") == {"device": "dev1", "node": "a/b"}
    assert topic.match("homie/dev1/state") is None
    assert topic.match("homie/dev1/a/b") is None


def test_first_level_placeholder_never_matches_dollar_topics() -> None:
    """As MQTT's own wildcards, a first-level placeholder does not match $SYS topics."""
    assert sources.SourceTopic("{node}/state").match("$SYS/state") is None


def test_every_mistake_is_one_line() -> None:
    """Unknown decoder, a serial placeholder the topic lacks, a dead include: one line each."""
    bad = [
        {**TASMOTA, "decoder": "tasmot"},
        {**TASMOTA, "name": "t2", "topic": "t2/{node}", "serial": "tas-{device}"},
        {
            "name": "z",
            "topic": "z/{n}",
            "decoder": "flat_json",
            "serial": "{n}",
            "include": ["BME280.*"],
            "exclude": ["BME280*"],
        },
        {"name": "v", "topic": "v/{n}/{m}", "decoder": "value", "serial": "{n}", "include": []},
    ]
    with pytest.raises(ConfigError) as caught:
        load_settings(None, {"IOTHUB_SOURCES": json.dumps(bad)})
    lines = str(caught.value).splitlines()

    assert lines == [
        "invalid configuration: IOTHUB_SOURCES: sources[0] ('tasmota'): unknown decoder "
        "'tasmot' (one of native, flat_json, tasmota, value, senml, sparkplug_b, ttn)",
        "sources[1] ('t2'): serial uses {device}, which the topic 't2/{node}' does not define",
        "sources[2] ('z'): include 'BME280.*' can match nothing: exclude 'BME280*' removes "
        "every key it matches",
        "sources[3] ('v'): metric is required for the value decoder, e.g. '{object}'",
        "sources[3] ('v'): include can match nothing: the value decoder reads no keys",
    ]


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        ({**TASMOTA, "time_zone": "Mars/Olympus"}, "is not an IANA time zone"),
        ({**TASMOTA, "decoder": "ttn", "root": "x"}, "root is not read by the ttn decoder"),
        ({**TASMOTA, "topic": "tele/+/SENSOR"}, "contains an MQTT wildcard"),
        ({**TASMOTA, "topic": "tele/{a+}/{b}"}, "only the last placeholder may be {x+}"),
        ({**TASMOTA, "serial": None}, "serial is required"),
        ({**TASMOTA, "metric": "{node}"}, "metric is not read by the tasmota decoder"),
        ({**TASMOTA, "exclude_topics": ["a/#/b"]}, "is not a valid MQTT topic filter"),
        ({**TASMOTA, "colour": "red"}, "unknown key(s) colour"),
        ({**TASMOTA, "topic": "devices/{node}/telemetry"}, "like one of mqtt_topics"),
    ],
)
def test_other_mistakes_are_named(entry: dict[str, object], expected: str) -> None:
    """Each other kind of mistake stops start-up with a line that says what is wrong."""
    entry = {k: v for k, v in entry.items() if v is not None}
    with pytest.raises(ConfigError, match="IOTHUB_SOURCES") as caught:
        load_settings(None, {"IOTHUB_SOURCES": json.dumps([entry])})

    assert expected in str(caught.value)


def test_toml_array_of_tables(tmp_path: Path) -> None:
    """The TOML file's [[sources]] tables load like the JSON list."""
    path = tmp_path / "iothub.toml"
    path.write_text(
        '[[sources]]\nname = "tasmota"\ntopic = "tele/{node}/SENSOR"\ndecoder = "tasmota"\n'
        'serial = "tas-{node}"\ntime_zone = "Europe/Amsterdam"\n'
        "values = { ON = true, OFF = false }\n"
    )
    parsed = sources.parse_sources(load_settings(path, {}).sources)

    assert parsed[0].time_zone is not None and parsed[0].time_zone.key == "Europe/Amsterdam"
    assert parsed[0].values == {"ON": True, "OFF": False}


def test_exclude_topics_are_mqtt_filters() -> None:
    """exclude_topics use MQTT filter semantics (+ one level, # the rest)."""
    assert sources.filter_matches("zigbee2mqtt/bridge/#", "zigbee2mqtt/bridge/state")
    assert sources.filter_matches("zigbee2mqtt/+/+/availability", "zigbee2mqtt/a/b/availability")
    assert not sources.filter_matches("zigbee2mqtt/+/availability", "zigbee2mqtt/a/b/availability")
