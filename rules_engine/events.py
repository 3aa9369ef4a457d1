"""Where a rule's transitions become rows: an event per transition and, for a triggered event,
an `action_outbox` row per action, its target rendered through the one target contract
(rules_engine/actions/targets.py) that the outbox worker reads back. Written in the batch's
transaction (or the no-data timer's), so they commit with what caused them."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

import psycopg
import structlog
from psycopg.types.json import Jsonb
from pydantic import JsonValue

from rules_engine.actions import targets
from rules_engine.evaluate.step import Transition
from rules_engine.failures import RuleFailures
from rules_engine.model import actions as actions_model
from rules_engine.model import templates
from rules_engine.rule_cache import RuleEntry
from schema import sql

log = structlog.get_logger(__name__)
queries = sql.load("rules_engine")


def render_context(entry: RuleEntry, value: object, ts: datetime) -> dict[str, object]:
    return {
        "device_name": entry.device_name,
        "serial_id": entry.serial_id,
        "metric": entry.metric,
        "value": value,
        "ts": ts.isoformat(),
        "rule_name": entry.rule.name,
    }


def outbox_rows(
    entry: RuleEntry,
    event_id: int,
    kind: str,
    transition: Transition,
    message: str,
    *,
    smtp_to: str | None = None,
) -> list[tuple[str, dict[str, Any]]]:
    """What to deliver for an event: (kind, target document) per action, each built as its
    kind's target model. Only triggered events carry actions: the original action forms
    describe an alarm, not its end."""
    if kind != "triggered":
        return []
    built = _targets(entry, event_id, transition, message, smtp_to)
    return [(target.kind, targets.document(target)) for target in built]


def _targets(
    entry: RuleEntry, event_id: int, transition: Transition, message: str, smtp_to: str | None
) -> list[targets.Target]:
    """The rendered target of each action of a triggered event."""
    kind = "triggered"
    action = entry.rule.action
    ctx = render_context(entry, transition.value, transition.ts)
    subject = f"{entry.rule.name}: {kind}"
    if isinstance(action, actions_model.NotifyAction):
        if action.channel == "email" and smtp_to:
            # The original action form names no address: email goes to the configured one.
            return [
                targets.NotifyTarget(
                    channel=action.channel, message=message, subject=subject, to=smtp_to
                )
            ]
        return [targets.NotifyTarget(channel=action.channel, message=message, subject=subject)]
    if isinstance(action, actions_model.MqttAction):
        return [
            targets.PublishTarget(
                **actions_model.mqtt_topic(action.topic, ctx),
                payload=templates.render_json(action.payload, ctx),
                qos=action.qos,
                retain=action.retain,
            )
        ]
    notification = (
        templates.render_json(action.notification.model_dump(exclude_none=True), ctx)
        if action.notification is not None
        else None
    )
    if action.webhook is not None and action.webhook.enabled:
        body: JsonValue = {
            "event_id": event_id,
            "kind": kind,
            "rule_id": entry.rule.rule_id,
            "rule_name": entry.rule.name,
            "serial_id": entry.serial_id,
            "device_name": entry.device_name,
            "metric": entry.metric,
            "value": transition.value,
            "ts": transition.ts.isoformat(),
            "message": message,
            "notification": notification,
        }
        return [
            targets.WebhookTarget(url=action.webhook.url, headers=action.webhook.headers, body=body)
        ]
    if action.notification is not None:
        # A disabled (or absent) webhook still leaves its notification to be told.
        return [
            targets.NotifyTarget(
                channel=action.notification.channel or "log", message=message, subject=subject
            )
        ]
    return []


class EventWriter:
    """Writes events and their outbox rows; a rule whose message or targets cannot be
    rendered is reported to `failures` and costs only its own deliveries."""

    def __init__(self, failures: RuleFailures, smtp_to: str | None = None) -> None:
        self._failures = failures
        self._smtp_to = smtp_to

    def _message(self, entry: RuleEntry, transition: Transition) -> str | None:
        """The event's rendered message; None when it cannot be rendered (a bug: the event is
        still written, with a plain message and no delivery, and the batch's other events are
        not touched)."""
        try:
            template = actions_model.message_template(entry.rule.action)
            return templates.render(
                template, render_context(entry, transition.value, transition.ts)
            )
        except Exception as exc:
            self._failures.report("render", entry, exc, kind=transition.kind)
            return None

    def _deliveries(
        self, entry: RuleEntry, event_id: int, transition: Transition, message: str
    ) -> list[tuple[str, dict[str, Any]]]:
        """The event's outbox targets; none when they cannot be rendered (logged, counted)."""
        try:
            return outbox_rows(
                entry,
                event_id,
                transition.kind,
                transition,
                message,
                smtp_to=self._smtp_to,
            )
        except Exception as exc:
            self._failures.report("render", entry, exc, kind=transition.kind)
            return []

    def write_event(
        self, conn: psycopg.Connection, entry: RuleEntry, transition: Transition
    ) -> None:
        self.write_events(conn, [(entry, transition)])

    def write_events(
        self,
        conn: psycopg.Connection,
        transitions: Sequence[tuple[RuleEntry, Transition]],
    ) -> None:
        """Insert the events and their outbox rows: two pipelined statements in all, however
        many events (a storm of transitions must not cost a round trip each)."""
        if not transitions:
            return
        event_params = []
        messages: list[str | None] = []
        for entry, transition in transitions:
            message = self._message(entry, transition)
            messages.append(message)
            if message is None:
                message = f"{entry.rule.name}: {transition.kind} (message could not be rendered)"
            context = {
                "value": transition.value,
                "ts": transition.ts.isoformat(),
                "message": message,
                "reason": transition.reason,
                "serial_id": entry.serial_id,
                "metric": entry.metric,
            }
            event_params.append(
                {
                    "ts": transition.ts,
                    "rule_id": entry.rule.rule_id,
                    "kind": transition.kind,
                    "device_metric_id": entry.device_metric_id,
                    "context": Jsonb(context),
                }
            )
        with conn.cursor() as cur:
            cur.executemany(queries["insert_event"], event_params, returning=True)
            event_ids = []
            while True:
                row = cur.fetchone()
                assert row is not None
                event_ids.append(int(row[0]))
                if not cur.nextset():
                    break
            outbox_params = [
                {
                    "event_id": event_id,
                    "rule_id": entry.rule.rule_id,
                    "kind": kind,
                    "target": Jsonb(target),
                }
                for event_id, (entry, transition), message in zip(
                    event_ids, transitions, messages, strict=True
                )
                if message is not None
                for kind, target in self._deliveries(entry, event_id, transition, message)
            ]
            if outbox_params:
                cur.executemany(queries["insert_outbox"], outbox_params)
        for entry, transition in transitions:
            log.info(
                "rule_" + transition.kind,
                rule_id=entry.rule.rule_id,
                rule_name=entry.rule.name,
                serial_id=entry.serial_id,
                metric=entry.metric,
                value=transition.value,
                ts=transition.ts.isoformat(),
                reason=transition.reason,
            )
