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

from rules_engine.model import templates
from rules_engine.model.conditions import InvalidRule, show, validation_problems

DEFAULT_MESSAGE: Final = "{rule_name}: {metric} = {value} on {device_name} ({serial_id}) at {ts}"
MAX_TEMPLATE_CHARS: Final = 4000  # characters; a message or topic template longer is a mistake
MAX_TOPIC_BYTES: Final = 65535  # the MQTT limit for a topic name, UTF-8 encoded
MAX_HEADERS: Final = 32  # headers a webhook may add; more is a mistake, not a use
MAX_HEADER_CHARS: Final = 4096  # of one header value
# Headers a rule may not set. Host and the delivery id are the service's word about where the
# request goes and which action it is; the framing and hop-by-hop headers decide where one
# request ends on a kept-alive connection, so a rule setting them could smuggle a second one.
RESERVED_HEADERS: Final = frozenset(
    {
        "host",
        "x-iothub-delivery",
        "content-length",
        "transfer-encoding",
        "connection",
        "keep-alive",
        "te",
        "trailer",
        "upgrade",
        "proxy-authorization",
        "proxy-connection",
    }
)
# What a value substituted into an mqtt topic may not hold: a level separator or a wildcard
# would let a device choose where an alert is published (`alerts/{value}` -> `alerts/x/#`).
TOPIC_SPECIAL: Final = frozenset("/+#")

_HEADER_NAME_RE = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]{1,64}")
_HEADER_VALUE_BAD_RE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
# MQTT topic names are UTF-8 without NUL; the broker also refuses the C0 and C1 controls
# (Mosquitto drops the connection over one), so they are refused here first.
_TOPIC_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f-\x9f]")

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


def topic_problem(topic: str) -> str | None:
    """Why `topic` cannot be published to, or None. Shared by the rule check (the template) and
    the outbox (the rendered topic), so both refuse the same things."""
    if not topic:
        return "mqtt topic is empty"
    if "+" in topic or "#" in topic or "\x00" in topic:
        return f"mqtt topic must not contain wildcards (+, #) or NUL, got {show(topic)}"
    if _TOPIC_CONTROL_RE.search(topic):
        return f"mqtt topic must not contain control characters, got {show(topic)}"
    if topic.startswith("$"):
        return f"mqtt topics starting with '$' belong to the broker, got {show(topic)}"
    try:
        size = len(topic.encode())
    except UnicodeEncodeError:
        return f"mqtt topic is not valid UTF-8, got {show(topic)}"
    if size > MAX_TOPIC_BYTES:
        return f"mqtt topic is longer than {MAX_TOPIC_BYTES} bytes"
    return None


def _topic(value: object) -> object:
    if not isinstance(value, str) or not value:
        raise ValueError(f"mqtt topic needs a non-empty string, got {show(value)}")
    problem = topic_problem(value)
    if problem is not None:
        raise ValueError(problem)
    return value


def header_problem(headers: Mapping[str, str]) -> str | None:
    """Why a webhook's extra headers cannot be sent, or None (rule check and outbox alike)."""
    if len(headers) > MAX_HEADERS:
        return f"webhook headers: at most {MAX_HEADERS}, got {len(headers)}"
    for name, value in headers.items():
        if not _HEADER_NAME_RE.fullmatch(name):
            return f"webhook header name {show(name)} is not an HTTP token"
        if name.lower() in RESERVED_HEADERS:
            return f"webhook header {name!r} is set by the service and cannot be overridden"
        if len(value) > MAX_HEADER_CHARS:
            return f"webhook header {name!r} is longer than {MAX_HEADER_CHARS} characters"
        if _HEADER_VALUE_BAD_RE.search(value) or not value.isascii():
            return f"webhook header {name!r} holds a line break, control or non-ASCII character"
    return None


def _headers(value: object) -> object:
    if value is None:
        return value
    if not isinstance(value, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise ValueError(f"webhook headers need an object of strings, got {show(value)}")
    problem = header_problem(value)
    if problem is not None:
        raise ValueError(problem)
    return value


def mqtt_topic(template: str, context: Mapping[str, object]) -> dict[str, str]:
    """The rendered topic of an mqtt action for the outbox row: `{"topic": ...}`, plus a
    `topic_error` when it cannot be published to. The engine writes the row either way, so the
    refusal is recorded (the outbox fails it at once, without retries) and never lost; raising
    here would fail the ingestion transaction."""
    topic = templates.render(template, context)
    for name in templates.placeholders(template):
        if name not in context:
            continue
        text = templates.render("{" + name + "}", context)
        found = sorted(TOPIC_SPECIAL.intersection(text))
        if found:
            return {
                "topic": topic,
                "topic_error": (
                    f"the value of {{{name}}} ({show(text)}) holds {' '.join(found)}: a "
                    "substituted value may not add topic levels or wildcards"
                ),
            }
    problem = topic_problem(topic)
    return {"topic": topic} if problem is None else {"topic": topic, "topic_error": problem}


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
    headers: Annotated[dict[str, str] | None, BeforeValidator(_headers)] = None


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
    "header_problem",
    "message_template",
    "mqtt_topic",
    "parse_action",
    "topic_problem",
]
