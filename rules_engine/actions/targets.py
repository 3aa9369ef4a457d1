"""What an action delivers, one model per kind: the contract between the rule engine, which
writes a rendered target into `action_outbox.target` with the event (rules_engine/events.py),
and the outbox worker, which reads it back to deliver it (rules_engine/actions/outbox.py). Both
go through these models, so a renamed field fails where the row is written, not at delivery.

Unknown keys are ignored when a row is read, so that a newer engine can add some without
stopping an older worker."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar, Final, Literal

from pydantic import BaseModel, ConfigDict, JsonValue, ValidationError

from rules_engine.actions.exceptions import BadTarget


class NotifyTarget(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)
    kind: ClassVar[str] = "notify"

    channel: str
    message: str
    subject: str = "iothub notification"
    # Written only for the email channel with smtp_to set: the original action form names no
    # address.
    to: str | list[str] | None = None

    @property
    def recipients(self) -> tuple[str, ...]:
        given = [self.to] if isinstance(self.to, str) else (self.to or [])
        return tuple(address.strip() for address in given if address.strip())


class WebhookTarget(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)
    kind: ClassVar[str] = "webhook"

    url: str
    headers: dict[str, str] | None = None
    body: JsonValue = None


class PublishTarget(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)
    kind: ClassVar[str] = "mqtt"

    topic: str
    payload: JsonValue = None  # None: publish the standard event document
    qos: Literal[0, 1, 2] = 1
    retain: bool = False
    # Written by the engine when the rendered topic cannot be published to (a device's value
    # held a level separator or a wildcard): the row fails at once, naming why.
    topic_error: str | None = None


Target = NotifyTarget | WebhookTarget | PublishTarget

# The model of each action kind (the `kind` column of action_outbox).
MODELS: Final[Mapping[str, type[Target]]] = {
    model.kind: model for model in (NotifyTarget, WebhookTarget, PublishTarget)
}
KINDS: Final = tuple(MODELS)


def document(target: Target) -> dict[str, Any]:
    """The row's `target` column: the fields that were given (a default is the reader's)."""
    return target.model_dump(exclude_unset=True)


def read(kind: str, raw: object) -> Target:
    """A row's target, checked against its kind's model; raises BadTarget."""
    model = MODELS.get(kind)
    if model is None:
        raise BadTarget(f"unknown action kind {kind!r}; expected one of {', '.join(KINDS)}")
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in error['loc']) or 'target'}: {error['msg']}"
            for error in exc.errors()
        )
        raise BadTarget(f"malformed {kind} target: {problems}") from None
