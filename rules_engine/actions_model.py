"""Rule actions: the JSON forms `rules.action` may take, parsed and checked. Delivering them is
the outbox's job; this module only says what a valid action looks like."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Annotated, Any, Final, Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    JsonValue,
    Tag,
    TypeAdapter,
    ValidationError,
    model_validator,
)

from rules_engine.conditions import InvalidRule, show, validation_problems

DEFAULT_MESSAGE: Final = "{rule_name}: {metric} = {value} on {device_name} ({serial_id}) at {ts}"
MAX_TEMPLATE_CHARS: Final = 4000  # characters; a message or topic template longer is a mistake
MAX_TOPIC_BYTES: Final = 65535  # the MQTT limit for a topic name, UTF-8 encoded

_CHANNEL_RE = re.compile(r"[a-z][a-z0-9_-]{0,31}")


def _template(what: str) -> Callable[[object], object]:
    def check(value: object) -> object:
        if not isinstance(value, str):
            raise ValueError(f"{what} needs a string, got {show(value)}")
        if len(value) > MAX_TEMPLATE_CHARS:
            raise ValueError(f"{what} is longer than {MAX_TEMPLATE_CHARS} characters")
        return value

    return check


def _channel(value: object) -> object:
    if not isinstance(value, str) or not _CHANNEL_RE.fullmatch(value):
        raise ValueError(
            f"channel needs a short lower-case name such as 'email', got {show(value)}"
        )
    return value


def _url(value: object) -> object:
    if not isinstance(value, str):
        raise ValueError(f"webhook url needs a string, got {show(value)}")
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"webhook url needs an absolute http(s) URL, got {show(value)}")
    return value


def _topic(value: object) -> object:
    if not isinstance(value, str) or not value:
        raise ValueError(f"mqtt topic needs a non-empty string, got {show(value)}")
    if "+" in value or "#" in value or "\x00" in value:
        raise ValueError(f"mqtt topic must not contain wildcards (+, #) or NUL, got {show(value)}")
    if len(value.encode()) > MAX_TOPIC_BYTES:
        raise ValueError(f"mqtt topic is longer than {MAX_TOPIC_BYTES} bytes")
    return value


def _flag(what: str) -> Callable[[object], object]:
    def check(value: object) -> object:
        if not isinstance(value, bool):
            raise ValueError(f"{what} needs true or false, got {show(value)}")
        return value

    return check


class NotifyAction(BaseModel):
    """`{"type": "notify", "channel": "email", "message": "..."}`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["notify"]
    channel: Annotated[str, BeforeValidator(_channel)]
    message: Annotated[str, BeforeValidator(_template("message"))] = DEFAULT_MESSAGE


class Webhook(BaseModel):
    """The `webhook` object of the webhook form: where to POST the event."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    url: Annotated[str, BeforeValidator(_url)]
    enabled: Annotated[bool, BeforeValidator(_flag("webhook enabled"))] = True
    headers: dict[str, str] | None = None


class Notification(BaseModel):
    """The `notification` object of the webhook form. Keys other than these are kept as given,
    because the original project's notification objects were open-ended."""

    model_config = ConfigDict(extra="allow", frozen=True)

    message: Annotated[str, BeforeValidator(_template("notification message"))] | None = None
    channel: Annotated[str, BeforeValidator(_channel)] | None = None


class WebhookAction(BaseModel):
    """`{"webhook": {"url": "...", "enabled": true}, "notification": {...}}` (no `type`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["webhook"] | None = None
    webhook: Webhook | None = None
    notification: Notification | None = None

    @model_validator(mode="after")
    def _needs_something(self) -> WebhookAction:
        if self.webhook is None and self.notification is None:
            raise ValueError("needs a webhook object, a notification object, or both")
        return self


class MqttAction(BaseModel):
    """`{"type": "mqtt", "topic": "alerts/{serial_id}", "payload": {...}}`.

    Without a payload the outbox publishes its standard event document."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["mqtt"]
    topic: Annotated[str, BeforeValidator(_topic)]
    payload: JsonValue = None
    qos: Literal[0, 1, 2] = 1
    retain: Annotated[bool, BeforeValidator(_flag("mqtt retain"))] = False


def _tag(raw: Any) -> str | None:
    if isinstance(raw, Mapping):
        kind = raw.get("type")
        if kind is None and ("webhook" in raw or "notification" in raw):
            return "webhook"
        return kind if isinstance(kind, str) else None
    if isinstance(raw, WebhookAction):
        return "webhook"
    if isinstance(raw, NotifyAction | MqttAction):
        return raw.type
    return None


Action = Annotated[
    Annotated[NotifyAction, Tag("notify")]
    | Annotated[WebhookAction, Tag("webhook")]
    | Annotated[MqttAction, Tag("mqtt")],
    Discriminator(_tag),
]

ACTION_MODELS: Final[Mapping[str, type[BaseModel]]] = {
    "notify": NotifyAction,
    "webhook": WebhookAction,
    "mqtt": MqttAction,
}

_ADAPTER: TypeAdapter[Action] = TypeAdapter(Action)


def parse_action(raw: object, *, rule_id: int | None = None) -> Action:
    """Parse a rule's action JSON; raises InvalidRule listing every problem with its JSON path."""
    if not isinstance(raw, Mapping):
        raise InvalidRule(f"action: must be a JSON object, got {show(raw)}", rule_id=rule_id)
    kind = _tag(raw)
    if kind is None:
        raise InvalidRule(
            "action.type: is required (notify or mqtt), unless the action is "
            '{"webhook": {...}, "notification": {...}}',
            rule_id=rule_id,
        )
    if kind not in ACTION_MODELS:
        raise InvalidRule(
            f"action.type: unknown action type {show(kind)}; expected one of "
            f"{', '.join(ACTION_MODELS)}",
            rule_id=rule_id,
        )
    try:
        return _ADAPTER.validate_python(dict(raw))
    except ValidationError as exc:
        problems = validation_problems(
            exc, "action", ACTION_MODELS, "action", tag_after=frozenset()
        )
        raise InvalidRule(rule_id=rule_id, problems=problems) from None


def message_template(action: Action) -> str:
    """The message template an action carries (the default one when it has none)."""
    if isinstance(action, NotifyAction):
        return action.message
    if isinstance(action, WebhookAction) and action.notification is not None:
        return action.notification.message or DEFAULT_MESSAGE
    return DEFAULT_MESSAGE


__all__ = [
    "DEFAULT_MESSAGE",
    "Action",
    "MqttAction",
    "Notification",
    "NotifyAction",
    "Webhook",
    "WebhookAction",
    "message_template",
    "parse_action",
]
