"""What a rule remembers between readings, per (rule, device_metric): `RuleState` and its
JSON codec. The caller keeps it in the database, in the same transaction as the readings, so a
restart neither forgets a pending duration nor fires twice."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final, Literal

from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationError,
)

Status = Literal["ok", "pending", "firing"]
Value = float | bool | str

STATE_VERSION: Final = 1  # bump when RuleState.to_json changes shape; from_json refuses newer


@dataclass(frozen=True)
class NodeState:
    """What one sub-condition remembers between readings."""

    since: datetime | None = None  # first reading of the current run where it held (duration)
    window: tuple[datetime, ...] = ()  # rate: times of the recent readings, oldest first

    @property
    def empty(self) -> bool:
        return self.since is None and not self.window


class _NodeJson(BaseModel):
    model_config = ConfigDict(extra="forbid")
    since: AwareDatetime | None = None
    window: list[AwareDatetime] = []


class _StateJson(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version: StrictInt = STATE_VERSION
    status: Status
    pending_since: AwareDatetime | None = None
    last_ts: AwareDatetime | None = None
    last_value: StrictBool | StrictInt | StrictFloat | StrictStr | None = None
    last_triggered: AwareDatetime | None = None
    nodes: dict[str, _NodeJson] = {}


def _iso(moment: datetime | None) -> str | None:
    return None if moment is None else moment.isoformat()


@dataclass(frozen=True)
class RuleState:
    """Everything a restart must remember about one (rule, device_metric)."""

    status: Status = "ok"
    pending_since: datetime | None = None  # first reading of the current PENDING run
    last_ts: datetime | None = None  # device time of the last evaluated reading
    last_value: Value | None = None  # its value (delta needs it)
    last_triggered: datetime | None = None  # time of the last triggered event (cooldown)
    nodes: tuple[tuple[str, NodeState], ...] = ()  # per sub-condition, by path, sorted

    @classmethod
    def initial(cls) -> RuleState:
        return cls()

    def node(self, path: str) -> NodeState:
        return dict(self.nodes).get(path, NodeState())

    def to_json(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "status": self.status,
            "pending_since": _iso(self.pending_since),
            "last_ts": _iso(self.last_ts),
            "last_value": self.last_value,
            "last_triggered": _iso(self.last_triggered),
            "nodes": {
                path: {"since": _iso(node.since), "window": [_iso(ts) for ts in node.window]}
                for path, node in self.nodes
            },
        }

    @classmethod
    def from_json(cls, raw: Mapping[str, Any] | None) -> RuleState:
        """Rebuild a state stored by to_json; None gives the initial state.

        Raises ValueError on a malformed or newer state (the caller may then start afresh)."""
        if raw is None:
            return cls.initial()
        try:
            parsed = _StateJson.model_validate(dict(raw))
        except (ValidationError, TypeError) as exc:
            raise ValueError(f"invalid rule state: {exc}") from None
        if parsed.version > STATE_VERSION:
            raise ValueError(f"rule state version {parsed.version} is newer than {STATE_VERSION}")
        return cls(
            status=parsed.status,
            pending_since=parsed.pending_since,
            last_ts=parsed.last_ts,
            last_value=parsed.last_value,
            last_triggered=parsed.last_triggered,
            nodes=tuple(
                (path, NodeState(node.since, tuple(node.window)))
                for path, node in sorted(parsed.nodes.items())
            ),
        )
