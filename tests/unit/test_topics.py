"""Telemetry topic patterns: validation, subscription filters, matching and routing."""

from __future__ import annotations

import pytest

from config.topics import DEFAULT_PATTERNS, TopicMatch, TopicPattern, TopicRouter

PER_DEVICE = TopicPattern.parse("devices/{serial_id}/telemetry")
SHARED = TopicPattern.parse("telemetry")


def test_default_patterns_subscribe_as_the_design_says() -> None:
    """The two default patterns subscribe to devices/+/telemetry and telemetry."""
    router = TopicRouter.from_strings(DEFAULT_PATTERNS)
    assert router.subscriptions() == ("devices/+/telemetry", "telemetry")


def test_per_device_topic_yields_its_serial() -> None:
    """A topic of the per-device form matches with the serial from its level."""
    found = PER_DEVICE.match("devices/SN-A1-TEMP-0001/telemetry")
    assert found == TopicMatch(PER_DEVICE, "SN-A1-TEMP-0001")
    assert found is not None and found.per_device


def test_shared_topic_matches_without_serial() -> None:
    """The shared topic matches with serial None (the payload names the device)."""
    found = SHARED.match("telemetry")
    assert found == TopicMatch(SHARED, None)
    assert found is not None and not found.per_device


@pytest.mark.parametrize(
    "topic",
    [
        "devices/SN-1/telemetry/extra",
        "devices/SN-1/status",
        "devices/a/b/telemetry",
        "devices/telemetry",
        "device/SN-1/telemetry",
        "xdevices/SN-1/telemetry",
        "devices/SN-1/telemetryx",
        "/devices/SN-1/telemetry",
        "",
    ],
)
def test_per_device_pattern_refuses_other_topics(topic: str) -> None:
    """Topics with other levels, more or fewer levels, do not match the per-device pattern."""
    assert PER_DEVICE.match(topic) is None


@pytest.mark.parametrize("topic", ["telemetry/", "/telemetry", "Telemetry", "telemetry/x", ""])
def test_shared_pattern_matches_only_itself(topic: str) -> None:
    """The shared pattern matches its exact topic name only (MQTT topics are case-sensitive)."""
    assert SHARED.match(topic) is None


def test_empty_serial_level_still_matches() -> None:
    """'+' matches an empty level, so the topic matches with serial '' for the parser to reject."""
    assert PER_DEVICE.match("devices//telemetry") == TopicMatch(PER_DEVICE, "")


@pytest.mark.parametrize(
    ("pattern", "topic", "serial"),
    [
        ("{serial_id}", "SN-1", "SN-1"),
        ("{serial_id}/telemetry", "SN-1/telemetry", "SN-1"),
        ("site/a/{serial_id}", "site/a/SN-1", "SN-1"),
        ("t1/devices/{serial_id}/telemetry", "t1/devices/ü-µ/telemetry", "ü-µ"),
        ("a/{serial_id}/a", "a/a/a", "a"),
    ],
)
def test_serial_level_may_be_anywhere(pattern: str, topic: str, serial: str) -> None:
    """The placeholder may be the first, a middle, the last or the only level."""
    parsed = TopicPattern.parse(pattern)
    assert parsed.match(topic) == TopicMatch(parsed, serial)


def test_overlapping_prefix_and_suffix_do_not_match_short_topics() -> None:
    """A topic shorter than prefix + suffix does not match even when they overlap in it."""
    assert TopicPattern.parse("a/{serial_id}/a").match("a/a") is None


def test_first_level_placeholder_never_matches_dollar_topics() -> None:
    """As with MQTT's '+', a first-level placeholder does not match $SYS topics."""
    pattern = TopicPattern.parse("{serial_id}/telemetry")
    assert pattern.match("$SYS/telemetry") is None
    assert pattern.match("SN$1/telemetry") == TopicMatch(pattern, "SN$1")


@pytest.mark.parametrize(
    ("pattern", "message"),
    [
        ("", "empty"),
        ("devices/+/telemetry", "wildcards"),
        ("devices/#", "wildcards"),
        ("tele\x00metry", "NUL"),
        ("devices/{serial_id}/{serial_id}", "at most once"),
        ("devices/SN-{serial_id}/telemetry", "whole level"),
        ("devices/{serial_id}x/telemetry", "whole level"),
        ("devices/{device}/telemetry", "only placeholder"),
        ("devices/{serial_id/telemetry", "whole level"),
        ("$SYS/telemetry", "belong to the broker"),
        ("$share/g/telemetry", "group option"),
        ("t\ud800", "not valid Unicode"),
        ("x" * 65_536, "longer than 65535 bytes"),
    ],
)
def test_invalid_patterns_are_refused_with_a_clear_message(pattern: str, message: str) -> None:
    """Patterns MQTT or the placeholder rules do not allow raise ValueError saying why."""
    with pytest.raises(ValueError, match=message):
        TopicPattern.parse(pattern)


def test_constructor_validates_like_parse() -> None:
    """Building a TopicPattern directly cannot bypass validation."""
    with pytest.raises(ValueError, match="wildcards"):
        TopicPattern("devices/+/telemetry")


def test_empty_levels_are_legal_mqtt() -> None:
    """Leading, trailing and empty levels are valid MQTT topics and are kept as written."""
    pattern = TopicPattern.parse("/devices//{serial_id}/")
    assert pattern.subscription == "/devices//+/"
    assert pattern.match("/devices//SN-1/") == TopicMatch(pattern, "SN-1")
    assert pattern.match("devices//SN-1/") is None


def test_shared_subscription_group() -> None:
    """A group turns each filter into an MQTT shared subscription $share/<group>/<filter>."""
    assert PER_DEVICE.subscription_for("ingestors") == "$share/ingestors/devices/+/telemetry"
    assert SHARED.subscription_for("ingestors") == "$share/ingestors/telemetry"
    assert PER_DEVICE.subscription_for(None) == "devices/+/telemetry"
    router = TopicRouter((PER_DEVICE, SHARED))
    assert router.subscriptions("g") == ("$share/g/devices/+/telemetry", "$share/g/telemetry")


@pytest.mark.parametrize("group", ["", "a/b", "a+", "#", "g\x00"])
def test_invalid_share_groups_are_refused(group: str) -> None:
    """A share name that is empty or holds '/', '+', '#' or NUL raises ValueError."""
    with pytest.raises(ValueError, match="shared subscription group"):
        SHARED.subscription_for(group)


def test_topic_for_builds_the_device_topic() -> None:
    """topic_for fills the serial in (for simulators) and refuses serials that are not a level."""
    assert PER_DEVICE.topic_for("SN-1") == "devices/SN-1/telemetry"
    assert SHARED.topic_for() == "telemetry"
    for bad in ("", "a/b", "a+", "a#"):
        with pytest.raises(ValueError, match="one MQTT topic level"):
            PER_DEVICE.topic_for(bad)
    with pytest.raises(ValueError, match="needs a serial_id"):
        PER_DEVICE.topic_for()


def test_topic_for_round_trips_through_match() -> None:
    """The topic built for a serial matches back to that serial."""
    topic = PER_DEVICE.topic_for("SN-A1-TEMP-0001")
    assert PER_DEVICE.match(topic) == TopicMatch(PER_DEVICE, "SN-A1-TEMP-0001")


def test_router_returns_the_first_matching_pattern() -> None:
    """The router tries patterns in order and returns the first match, None when none fits."""
    catch_all = TopicPattern.parse("a/{serial_id}")
    exact = TopicPattern.parse("a/b")
    router = TopicRouter((catch_all, exact))
    assert router.match("a/b") == TopicMatch(catch_all, "b")
    assert TopicRouter((exact, catch_all)).match("a/b") == TopicMatch(exact, None)
    assert router.match("c/d") is None


def test_router_with_defaults_routes_both_forms() -> None:
    """With the default patterns, both topic forms are routed and others are not."""
    router = TopicRouter.from_strings(DEFAULT_PATTERNS)
    per_device = router.match("devices/SN-1/telemetry")
    shared = router.match("telemetry")
    assert per_device is not None and per_device.serial_id == "SN-1"
    assert shared is not None and shared.serial_id is None
    assert router.match("devices/SN-1/status") is None


def test_router_refuses_no_patterns_and_duplicates() -> None:
    """An empty router and two patterns with the same filter are configuration errors."""
    with pytest.raises(ValueError, match="at least one"):
        TopicRouter(())
    with pytest.raises(ValueError, match="same filter"):
        TopicRouter.from_strings(["telemetry", "telemetry"])


def test_router_names_the_bad_pattern() -> None:
    """from_strings reports which pattern is invalid."""
    with pytest.raises(ValueError, match="'devices/#'"):
        TopicRouter.from_strings(["telemetry", "devices/#"])
