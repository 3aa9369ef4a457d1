"""What the rule engine puts in the outbox for an event, per action form."""

from __future__ import annotations

from datetime import UTC, datetime

from rules_engine.evaluate import step as evaluator
from rules_engine.evaluate.compile import compile_rule
from rules_engine.events import outbox_rows
from rules_engine.rule_cache import RuleEntry

TS = datetime(2026, 1, 27, 12, 0, tzinfo=UTC)
CONDITION = {"type": "threshold", "operator": ">", "value": 27.5}


def entry(action: object) -> RuleEntry:
    rule = compile_rule(7, "High temp", CONDITION, action, "numeric")
    return RuleEntry(rule, 3, "fp", "SN-A1-TEMP-0001", "Server room", "temperature")


def transition() -> evaluator.Transition:
    return evaluator.Transition("triggered", TS, 28.5, "value 28.5 > 27.5")


def test_email_notification_is_addressed_to_the_configured_recipient() -> None:
    """The original notify form names no address: smtp_to fills it in for email."""
    action = {"type": "notify", "channel": "email", "message": "Hot in {device_name}: {value}"}
    rows = outbox_rows(
        entry(action),
        1,
        "triggered",
        transition(),
        "Hot in Server room: 28.5",
        smtp_to="ops@example.com",
    )
    assert rows == [
        (
            "notify",
            {
                "channel": "email",
                "message": "Hot in Server room: 28.5",
                "subject": "High temp: triggered",
                "to": "ops@example.com",
            },
        )
    ]
    assert "to" not in outbox_rows(entry(action), 1, "triggered", transition(), "m")[0][1]


def test_mqtt_action_renders_topic_and_payload() -> None:
    """Placeholders in an MQTT action's topic and payload are rendered from the event."""
    action = {
        "type": "mqtt",
        "topic": "alerts/{serial_id}",
        "payload": {"v": "{value}", "rule": "{rule_name}"},
    }
    ((kind, target),) = outbox_rows(entry(action), 1, "triggered", transition(), "m")
    assert kind == "mqtt"
    assert target["topic"] == "alerts/SN-A1-TEMP-0001"
    assert target["payload"] == {"v": "28.5", "rule": "High temp"}


def test_webhook_form_and_disabled_webhook() -> None:
    """An enabled webhook gets the event body; a disabled one leaves its notification to be
    told as a notify row."""
    enabled = {
        "webhook": {"url": "http://127.0.0.1:9/hook", "enabled": True},
        "notification": {"message": "Hot: {value}"},
    }
    ((kind, target),) = outbox_rows(entry(enabled), 5, "triggered", transition(), "Hot: 28.5")
    assert kind == "webhook" and target["url"] == "http://127.0.0.1:9/hook"
    assert target["body"]["event_id"] == 5 and target["body"]["value"] == 28.5
    disabled = {**enabled, "webhook": {"url": "http://127.0.0.1:9/hook", "enabled": False}}
    ((kind, _target),) = outbox_rows(entry(disabled), 5, "triggered", transition(), "Hot: 28.5")
    assert kind == "notify"


def test_resolved_events_carry_no_actions() -> None:
    """Actions describe an alarm, not its end: a resolved event puts nothing in the outbox."""
    action = {"type": "notify", "channel": "email", "message": "x"}
    assert outbox_rows(entry(action), 1, "resolved", transition(), "m") == []
