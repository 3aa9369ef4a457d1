"""What an action may target: the webhook address policy, webhook headers, rendered mqtt topics."""

from __future__ import annotations

import ipaddress
import re
from datetime import UTC, datetime

import pytest

from config.settings import ConfigError, load_settings
from rules_engine.actions import egress
from rules_engine.evaluate import step as evaluator
from rules_engine.evaluate.compile import compile_rule
from rules_engine.evaluate.state import Value
from rules_engine.events import outbox_rows
from rules_engine.model import actions as actions_model
from rules_engine.model.conditions import InvalidRule
from rules_engine.rule_cache import RuleEntry

TS = datetime(2026, 1, 27, 12, 0, tzinfo=UTC)
CONDITION = {"type": "string_match", "operator": "!=", "value": "OK"}


# --- the webhook address policy


@pytest.mark.parametrize(
    ("address", "why"),
    [
        ("127.0.0.1", "loopback"),
        ("127.8.9.10", "loopback"),
        ("::1", "loopback"),
        ("169.254.169.254", "link-local"),  # the cloud metadata service
        ("fe80::1", "link-local"),
        ("10.1.2.3", "private"),
        ("172.16.0.1", "private"),
        ("192.168.1.1", "private"),
        ("fc00::1", "private"),
        ("fd12:3456::1", "private"),
        ("100.64.0.1", "reserved"),  # carrier-grade NAT, shared address space
        ("0.0.0.0", "unspecified"),  # noqa: S104 - an address under test, not a bind
        ("::", "unspecified"),
        ("224.0.0.251", "multicast"),
        ("ff02::1", "multicast"),
        ("240.0.0.1", "private"),
        # IPv6 forms that carry an IPv4 address are judged by that address.
        ("::ffff:127.0.0.1", "loopback"),
        ("::ffff:10.0.0.1", "private"),
        ("2002:7f00:1::", "loopback"),  # 6to4 of 127.0.0.1
        ("64:ff9b::a9fe:a9fe", "link-local"),  # NAT64 of 169.254.169.254
        ("64:ff9b:1::a9fe:a9fe", "link-local"),  # local-use NAT64 (RFC 8215)
        ("::ffff:0:7f00:1", "loopback"),  # IPv4-translated (RFC 2765)
        ("::7f00:1", "loopback"),  # IPv4-compatible, deprecated but routable somewhere
        ("::a9fe:a9fe", "link-local"),
        # Outside 2000::/3, the only global unicast space: Python calls some of these global.
        ("fec0::1", "reserved"),  # site-local, deprecated
        ("5f00::1", "reserved"),
        ("4000::1", "reserved"),
        ("8.8.8.8", None),
        ("93.184.216.34", None),
        ("2606:4700:4700::1111", None),
        ("::ffff:8.8.8.8", None),
    ],
)
def test_only_public_addresses_are_allowed_by_default(address: str, why: str | None) -> None:
    """Without an allow-list, loopback, link-local, private, reserved and multicast are refused,
    also when wrapped in an IPv6 address."""
    assert egress.AddressPolicy().why_refused(ipaddress.ip_address(address)) == why


def test_allow_listed_networks_are_allowed_and_nothing_else() -> None:
    """An operator's allow-list opens exactly its networks (and IPv6 forms of them)."""
    policy = egress.AddressPolicy(egress.parse_networks(["10.20.0.0/16", "127.0.0.1/32"]))
    assert policy.why_refused(ipaddress.ip_address("10.20.3.4")) is None
    assert policy.why_refused(ipaddress.ip_address("127.0.0.1")) is None
    assert policy.why_refused(ipaddress.ip_address("::ffff:10.20.3.4")) is None
    assert policy.why_refused(ipaddress.ip_address("10.21.0.1")) == "private"
    assert policy.why_refused(ipaddress.ip_address("127.0.0.2")) == "loopback"
    assert policy.why_refused(ipaddress.ip_address("::1")) == "loopback"


def test_allow_list_entries_must_be_networks() -> None:
    """A typo in the allow-list is an error naming the entry, not an open door."""
    with pytest.raises(ValueError, match=re.escape("'10.0.0.1/8' is not a network")):
        egress.parse_networks(["10.0.0.1/8"])


# --- webhook headers


@pytest.mark.parametrize(
    "name", ["Host", "host", "X-Iothub-Delivery", "Content-Length", "Transfer-Encoding"]
)
def test_a_rule_cannot_override_the_services_own_headers(name: str) -> None:
    """Host, the delivery id and the framing headers are the service's: the rule is invalid."""
    action = {"webhook": {"url": "https://example.com/hook", "headers": {name: "x"}}}
    with pytest.raises(InvalidRule, match="set by the service and cannot be overridden"):
        actions_model.parse_action(action, rule_id=4)


@pytest.mark.parametrize(
    ("headers", "problem"),
    [
        ({"X-A": "1\r\nHost: evil"}, "line break"),
        ({"Bad Name": "1"}, "not an HTTP token"),
        ({f"X-{i}": "v" for i in range(actions_model.MAX_HEADERS + 1)}, "at most"),
    ],
)
def test_header_injection_and_floods_are_refused(headers: dict[str, str], problem: str) -> None:
    """A header value with a line break, a bad name, or too many headers make the rule invalid."""
    action = {"webhook": {"url": "https://example.com/hook", "headers": headers}}
    with pytest.raises(InvalidRule, match=problem):
        actions_model.parse_action(action, rule_id=4)


def test_ordinary_headers_are_kept() -> None:
    """An Authorization header (what receivers need) is a valid rule."""
    action = actions_model.parse_action(
        {"webhook": {"url": "https://example.com/h", "headers": {"Authorization": "Bearer x"}}}
    )
    assert isinstance(action, actions_model.WebhookAction)
    assert action.webhook is not None
    assert action.webhook.headers == {"Authorization": "Bearer x"}


# --- rendered mqtt topics


def rows_for(topic: str, value: Value) -> dict[str, object]:
    action = {"type": "mqtt", "topic": topic}
    rule = compile_rule(7, "Status", CONDITION, action, "str")
    entry = RuleEntry(rule, 3, "fp", "SN-1", "Boiler", "status")
    transition = evaluator.Transition("triggered", TS, value, "changed")
    ((kind, target),) = outbox_rows(entry, 1, "triggered", transition, "m")
    assert kind == "mqtt"
    return target


@pytest.mark.parametrize("value", ["bad/#/level", "a/b", "x+y", "#", "+"])
def test_a_value_cannot_add_topic_levels_or_wildcards(value: str) -> None:
    """A device's value with / + or # makes the row's target bad; the topic is not published."""
    target = rows_for("alerts/{value}/level", value)
    error = target["topic_error"]
    assert isinstance(error, str)
    assert error.startswith("the value of {value} (")
    assert "may not add topic levels or wildcards" in error


def test_an_ordinary_value_renders_a_publishable_topic() -> None:
    """A value without separators renders as before, with no error."""
    assert rows_for("alerts/{serial_id}/{value}", "HIGH") == {
        "topic": "alerts/SN-1/HIGH",
        "payload": None,
        "qos": 1,
        "retain": False,
    }


@pytest.mark.parametrize(
    ("value", "problem"),
    [("\x07bell", "control characters"), ("\ud800", "not valid UTF-8")],
)
def test_a_value_the_broker_would_refuse_is_a_bad_target(value: str, problem: str) -> None:
    """Control characters (Mosquitto drops the connection) or a lone surrogate: a bad target."""
    error = rows_for("alerts/{value}", value)["topic_error"]
    assert isinstance(error, str)
    assert problem in error


def test_broker_topics_are_refused_in_the_rule() -> None:
    """A topic template under `$` (the broker's own, like $SYS) is an invalid rule."""
    with pytest.raises(InvalidRule, match="belong to the broker"):
        actions_model.parse_action({"type": "mqtt", "topic": "$SYS/x"}, rule_id=4)


# --- the allow-list setting


def test_allow_list_setting_takes_json_or_commas_and_refuses_typos() -> None:
    """IOTHUB_ACTION_ALLOW_NETWORKS is a JSON list or comma-separated CIDRs; a bad entry stops
    start-up with one line naming the setting and the entry; the default allows nothing."""
    assert load_settings(None, {}).action_allow_networks == ()
    given = {"IOTHUB_ACTION_ALLOW_NETWORKS": "10.20.0.0/16, 127.0.0.1/32"}
    assert load_settings(None, given).action_allow_networks == ("10.20.0.0/16", "127.0.0.1/32")
    given = {"IOTHUB_ACTION_ALLOW_NETWORKS": '["fd00::/8"]'}
    assert load_settings(None, given).action_allow_networks == ("fd00::/8",)
    with pytest.raises(ConfigError, match=r"IOTHUB_ACTION_ALLOW_NETWORKS: '10\.0\.0\.1/8'"):
        load_settings(None, {"IOTHUB_ACTION_ALLOW_NETWORKS": "10.0.0.1/8"})
