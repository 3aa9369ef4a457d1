"""ingestor.writer's two ways into telemetries, against a real PostgreSQL.

A batch is COPYed straight into telemetries after a batch in which nothing was already stored;
otherwise (the first batch, after a redelivery or a failed write) it goes through the staging
table and INSERT … ON CONFLICT DO NOTHING. Whichever way a batch goes, what is stored, what the
rule hook is handed and what is counted as a duplicate must be the same.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime, timedelta

import psycopg
import pytest
from psycopg_pool import ConnectionPool

from config.settings import Settings
from ingestor.batch import Batch, Row
from ingestor.hooks import BatchReading, HookResult
from ingestor.messages import InboundMessage
from ingestor.writer import BatchWriter, WriteResult, connection_setup
from schema import db
from tests.support.faults import refuse_value
from tests.support.fleet import make_fleet

T0 = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)


class RecordingHook:
    """A batch hook that keeps what it was handed, as the rule engine would see it."""

    def __init__(self) -> None:
        self.seen: list[datetime] = []

    def on_inserted(self, conn: psycopg.Connection, rows: Sequence[BatchReading]) -> HookResult:
        self.seen.extend(row.ts for row in rows)
        return HookResult()

    def on_failed(self) -> None:
        pass


@pytest.fixture
def binding(db_url: str, unique: str) -> int:
    fleet = make_fleet(db_url, f"SN-{unique}", 1)
    with psycopg.connect(db_url) as conn:
        row = conn.execute(
            "SELECT dm.id FROM device_metrics dm JOIN devices d ON d.id = dm.device_id "
            "WHERE d.serial_id = %s ORDER BY dm.id LIMIT 1",
            (fleet.serials[0],),
        ).fetchone()
    assert row is not None
    return int(row[0])


@pytest.fixture
def pool(make_settings: Callable[..., Settings]) -> Iterator[ConnectionPool]:
    settings = make_settings()
    with db.make_pool(settings, "ingest", configure=connection_setup(settings)) as made:
        yield made


def batch(binding: int, seconds: range, value: str = "1") -> Batch:
    """One message per reading, reading i at T0 + i seconds."""
    now = time.time()
    messages = [
        InboundMessage("t", b"{}", n, 1, False, 0, now, time.monotonic())
        for n in range(len(seconds))
    ]
    rows = [
        Row(
            binding,
            T0 + timedelta(seconds=s),
            f'{{"t":"numeric","v":{value}}}',
            BatchReading(binding, T0 + timedelta(seconds=s), 1, "numeric", "sn", "dev", "m"),
            n,
        )
        for n, s in enumerate(seconds)
    ]
    return Batch(messages, rows)


def stored(db_url: str, binding: int) -> list[datetime]:
    with psycopg.connect(db_url) as conn:
        return [
            r[0]
            for r in conn.execute(
                "SELECT ts FROM telemetries WHERE device_metric_id = %s ORDER BY ts", (binding,)
            )
        ]


def at(seconds: range) -> list[datetime]:
    return [T0 + timedelta(seconds=s) for s in seconds]


def test_a_redelivery_after_a_clean_batch_is_stored_once_and_reaches_the_hook_once(
    db_url: str, binding: int, pool: ConnectionPool
) -> None:
    hook = RecordingHook()
    writer = BatchWriter(pool, hook)

    def write(seconds: range) -> WriteResult:
        return writer.write(batch(binding, seconds))

    first = write(range(0, 10))  # the first batch goes the safe way
    assert (first.copied_direct, first.inserted, first.duplicates) == (False, 10, 0)
    clean = write(range(10, 20))  # nothing was stored twice: straight in
    assert (clean.copied_direct, clean.inserted, clean.duplicates) == (True, 10, 0)
    # Half of this one is stored already: the direct COPY is refused and undone, the safe
    # way stores the other half.
    overlap = write(range(15, 25))
    assert (overlap.copied_direct, overlap.inserted, overlap.duplicates) == (False, 5, 5)
    after = write(range(25, 30))  # after a batch with duplicates: the safe way again
    assert (after.copied_direct, after.inserted, after.duplicates) == (False, 5, 0)
    again = write(range(30, 35))  # and straight in once a batch was clean
    assert (again.copied_direct, again.inserted) == (True, 5)

    assert stored(db_url, binding) == at(range(0, 35))
    assert hook.seen == at(range(0, 35))  # each reading handed to the rules once, in order


def test_a_row_the_server_refuses_in_a_direct_copy_costs_only_itself(
    db_url: str, binding: int, pool: ConnectionPool
) -> None:
    refuse_value(db_url, "666")
    hook = RecordingHook()
    writer = BatchWriter(pool, hook)
    assert writer.write(batch(binding, range(0, 5))).inserted == 5
    poisoned = batch(binding, range(5, 15))
    bad = poisoned.rows[3]
    poisoned.rows[3] = bad._replace(value_json='{"t":"numeric","v":666}')
    result = writer.write(poisoned)
    assert (result.copied_direct, result.inserted, result.storage_rejects) == (False, 9, 1)
    assert stored(db_url, binding) == [t for t in at(range(0, 15)) if t != bad.ts]
    with psycopg.connect(db_url) as conn:
        reasons = conn.execute(
            "SELECT reason, detail FROM rejected_messages WHERE detail LIKE '%refused by policy%'"
        ).fetchall()
    assert [r[0] for r in reasons] == ["storage_error"]
    # After a refusal the next batch goes the safe way (a poison that recurs would refuse
    # every COPY), the one after it straight in again.
    assert writer.write(batch(binding, range(15, 20))).copied_direct is False
    assert writer.write(batch(binding, range(20, 25))).copied_direct is True
    assert stored(db_url, binding) == [t for t in at(range(0, 25)) if t != bad.ts]
