"""The seam between storing a batch and what runs on the new rows in the same transaction."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import NamedTuple, Protocol

import psycopg

from schema.types import DataType


class BatchReading(NamedTuple):
    """A reading of a batch, built when the batch is prepared (before anything is stored); the
    hook is handed only those the transaction inserted, never a redelivered duplicate. A
    NamedTuple: one is made per reading, at a fifth of a frozen dataclass's cost."""

    device_metric_id: int
    ts: datetime
    value: float | int | bool | str
    data_type: DataType
    serial_id: str
    device_name: str
    metric_type: str


@dataclass
class HookResult:
    events: dict[str, int] = field(default_factory=dict)  # by kind
    late: int = 0  # readings older than the last evaluated one of their device_metric


class BatchHook(Protocol):
    """Called inside the batch transaction, after the insert, before the commit; rows come
    sorted by (device_metric_id, ts)."""

    def on_inserted(self, conn: psycopg.Connection, rows: Sequence[BatchReading]) -> HookResult: ...

    def on_failed(self) -> None:
        """The batch transaction failed, or its commit may not have happened: whatever the
        hook keeps in memory about what it wrote must not be trusted."""


class NoHook:
    """Stores telemetry and nothing else (the daemon without rules)."""

    # The BatchHook signature: there is nothing to do with the batch.
    def on_inserted(
        self,
        conn: psycopg.Connection,  # noqa: ARG002
        rows: Sequence[BatchReading],  # noqa: ARG002
    ) -> HookResult:
        return HookResult()

    def on_failed(self) -> None:
        pass
