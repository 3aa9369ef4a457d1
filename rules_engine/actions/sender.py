"""The one small protocol every action sender meets: `deliver(delivery) -> detail`, a one-line
success detail, or a DeliveryFailed (rules_engine/actions/exceptions.py) with a precise one. The
outbox worker keeps a kind -> sender table (webhook.py, mqtt.py, email.py)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final, Protocol
from urllib.parse import urlsplit

from pydantic import JsonValue

from rules_engine.actions.targets import Target

MAX_DETAIL_CHARS: Final = 1000  # of an attempt's detail and of last_error


@dataclass(frozen=True)
class Delivery:
    """One claimed outbox row, its target read through the target contract."""

    outbox_id: int
    event_id: int
    rule_id: int
    target: Target
    # The standard event document, for an mqtt target without a payload of its own (None: the
    # event no longer exists, or none was needed).
    event: Mapping[str, JsonValue] | None = None


class Sender(Protocol):
    def deliver(self, delivery: Delivery) -> str: ...

    def close(self) -> None: ...


def origin(url: str) -> str:
    # Webhook URLs often carry a secret in their path (chat services do): logs and attempt
    # details name only where the request went.
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}"


def clip(text: str, limit: int = MAX_DETAIL_CHARS) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."
