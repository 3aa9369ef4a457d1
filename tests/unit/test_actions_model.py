"""Parsing rule actions: the three accepted forms and precise errors."""

from __future__ import annotations

from typing import Any

import pytest

from rules_engine.model import actions as actions_model
from rules_engine.model.actions import MqttAction, NotifyAction, WebhookAction, parse_action
from rules_engine.model.conditions import InvalidRule

NOTIFY = {
    "type": "notify",
    "channel": "email",
    "message": "High temperature in {device_name}: {value}°C",
}
WEBHOOK = {
    "webhook": {"url": "https://hooks.example.com/iot", "enabled": True},
    "notification": {"message": "{rule_name} fired", "channel": "email"},
}
MQTT = {"type": "mqtt", "topic": "alerts/{serial_id}", "payload": {"v": "{value}", "n": [1, None]}}


@pytest.mark.parametrize(
    ("raw", "model"), [(NOTIFY, NotifyAction), (WEBHOOK, WebhookAction), (MQTT, MqttAction)]
)
def test_accepted_forms_parse_unchanged(raw: dict[str, Any], model: type[object]) -> None:
    """Each action form parses to its own model and keeps every field as written."""
    parsed = parse_action(raw)
    assert isinstance(parsed, model)
    assert parsed.model_dump(mode="json", exclude_unset=True) == raw


def test_webhook_form_needs_no_type_and_keeps_unknown_notification_keys() -> None:
    """The original webhook form has no `type`; its notification object is open-ended."""
    parsed = parse_action({"notification": {"message": "hi", "severity": "high"}})
    assert isinstance(parsed, WebhookAction)
    assert parsed.webhook is None
    assert parsed.notification is not None
    assert parsed.notification.model_dump() == {
        "message": "hi",
        "channel": None,
        "severity": "high",
    }


def test_disabled_webhook_is_still_valid() -> None:
    """`enabled: false` is a valid way to switch a webhook off without deleting it."""
    parsed = parse_action({"webhook": {"url": "http://10.0.0.5:8080/x", "enabled": False}})
    assert isinstance(parsed, WebhookAction)
    assert parsed.webhook is not None
    assert parsed.webhook.enabled is False


def test_defaults_of_notify_and_mqtt() -> None:
    """A notify action without message uses the default template; mqtt defaults to QoS 1."""
    notify = parse_action({"type": "notify", "channel": "log"})
    assert actions_model.message_template(notify) == actions_model.DEFAULT_MESSAGE
    mqtt = parse_action({"type": "mqtt", "topic": "alerts/x"})
    assert isinstance(mqtt, MqttAction)
    assert (mqtt.payload, mqtt.qos, mqtt.retain) == (None, 1, False)


def test_message_template_comes_from_the_form_that_holds_it() -> None:
    """The message is read from notify.message or webhook-form notification.message."""
    assert actions_model.message_template(parse_action(NOTIFY)) == NOTIFY["message"]
    assert actions_model.message_template(parse_action(WEBHOOK)) == "{rule_name} fired"


ERRORS: list[tuple[object, str]] = [
    (["notify"], 'rule 4: action: must be a JSON object, got ["notify"]'),
    (
        {"channel": "email"},
        "rule 4: action.type: is required (notify or mqtt), unless the action is "
        '{"webhook": {...}, "notification": {...}}',
    ),
    (
        {"type": "sms"},
        "rule 4: action.type: unknown action type 'sms'; expected one of notify, webhook, mqtt",
    ),
    ({"type": "notify", "message": "x"}, "rule 4: action.channel: is required"),
    (
        {"type": "notify", "channel": "E-Mail!"},
        "rule 4: action.channel: channel needs a short lower-case name such as 'email', "
        "got 'E-Mail!'",
    ),
    (
        {"type": "notify", "channel": "email", "message": 5},
        "rule 4: action.message: message needs a string, got 5",
    ),
    (
        {"type": "notify", "channel": "email", "to": "ops@example.com"},
        "rule 4: action.to: unknown field for a notify action (allowed: type, channel, message)",
    ),
    (
        {"webhook": {"url": "ftp://example.com/x"}},
        "rule 4: action.webhook.url: webhook url needs an absolute http(s) URL, "
        "got 'ftp://example.com/x'",
    ),
    (
        {"webhook": {"url": "https://example.com", "enabled": "yes"}},
        "rule 4: action.webhook.enabled: webhook enabled needs true or false, got 'yes'",
    ),
    (
        {"webhook": {"enabled": True}},
        "rule 4: action.webhook.url: is required",
    ),
    (
        {"type": "webhook"},
        "rule 4: action: needs a webhook object, a notification object, or both",
    ),
    (
        {"type": "mqtt", "topic": "alerts/#"},
        "rule 4: action.topic: mqtt topic must not contain wildcards (+, #) or NUL, got 'alerts/#'",
    ),
    (
        {"type": "mqtt", "topic": "alerts/x", "qos": 3},
        "rule 4: action.qos: unknown qos 3; expected 0, 1 or 2",
    ),
]


@pytest.mark.parametrize(("raw", "message"), ERRORS)
def test_invalid_actions_are_reported_precisely(raw: object, message: str) -> None:
    """A malformed action names the rule, the JSON path and what is wrong."""
    with pytest.raises(InvalidRule) as caught:
        parse_action(raw, rule_id=4)
    assert str(caught.value) == message
