"""Where a batch is written: one transaction from COPY to COMMIT.

COPY the rows straight into telemetries; where one of them is already stored (a redelivery),
COPY into a per-connection staging table and INSERT … ON CONFLICT DO NOTHING instead (see
`BatchWriter._insert`). Then hand the new rows to the rule engine, record rejections, commit. A
row the server refuses (a data error) is isolated by bisection inside savepoints and recorded
as rejected, so it never costs the rest of its batch. A lost connection is
`DatabaseUnavailable`: the caller retries the same batch later, and nothing was acknowledged.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import psycopg
import structlog
from psycopg.abc import AdaptContext
from psycopg.adapt import Dumper
from psycopg.pq import Format
from psycopg_pool import ConnectionPool, PoolTimeout

from config.settings import Settings
from ingestor import aliases
from ingestor.batch import Batch, RejectedMessage, RejectRow, Row
from ingestor.hooks import BatchHook, BatchReading, HookResult
from ingestor.reasons import Reason
from schema import sql as queries_mod

log = structlog.get_logger(__name__)
queries = queries_mod.load("ingestor")

# The staging COPY is binary: measured on 100,000 rows, 0.224 s of client CPU in text against
# 0.050 s in binary (integers and timestamps are packed, not formatted and escaped).
STAGING_TYPES = ("int4", "int4", "timestamptz", "jsonb")
TELEMETRY_TYPES = STAGING_TYPES[1:]  # the direct COPY: the same columns without the place
JSONB_BINARY_VERSION = b"\x01"  # jsonb's binary input: a version byte, then the JSON text


class _JsonbTextDumper(Dumper):
    """A str that already holds the JSON text of a value (`payload.encode_value`), as jsonb's
    binary format. psycopg's own jsonb dumper would encode the str again, as a JSON string."""

    format = Format.BINARY
    oid = 3802  # jsonb

    def __init__(self, cls: type, context: AdaptContext | None = None) -> None:
        super().__init__(cls, context)
        # The text is read in the connection's client encoding, as a text COPY would send it.
        self._encoding = self.connection.info.encoding if self.connection else "utf-8"

    def dump(self, obj: str) -> bytes:
        return JSONB_BINARY_VERSION + obj.encode(self._encoding)


def _copy(
    cur: psycopg.Cursor[Any], statement: str, types: Sequence[str], rows: Iterable[Any]
) -> None:
    # By oid only (cls None): used where set_types names jsonb, never for a str elsewhere.
    cur.adapters.register_dumper(None, _JsonbTextDumper)
    with cur.copy(statement) as copy:
        copy.set_types(types)
        for row in rows:
            copy.write_row(row)


def stage(cur: psycopg.Cursor[Any], rows: Iterable[tuple[int, int, datetime, str]]) -> None:
    """COPY (n, device_metric_id, ts, value JSON text) rows into the staging table."""
    _copy(cur, queries["copy_staging"], STAGING_TYPES, rows)


def copy_telemetries(cur: psycopg.Cursor[Any], rows: Iterable[tuple[int, datetime, str]]) -> None:
    """COPY (device_metric_id, ts, value JSON text) rows straight into telemetries."""
    _copy(cur, queries["copy_telemetries"], TELEMETRY_TYPES, rows)


# SQLSTATE classes that mean "this row", not "this connection": data exceptions, integrity
# violations, program limits (a value too large for an index row).
_DATA_ERROR_CLASSES = ("22", "23", "54")
# Errors after which the same batch may well succeed later: connection exceptions, the server
# shutting down or starting, a failover that left us on a read-only standby, exhausted
# resources (disk full, too many connections), serialization failures and deadlocks.
_RETRYABLE = ("08", "57P", "25006", "53", "40001", "40P01")
# lock_timeout (lock_not_available) and statement_timeout (query_canceled): the batch waited
# or ran too long. The connection itself is fine, so it is kept.
_TIMED_OUT = ("55P03", "57014")


MAX_DETAIL_CHARS = 1000  # a rejection's detail; a server message may quote the value it refused
REFUSED_LOGS_PER_BATCH = 10  # reading_refused_by_database lines per batch, then one count

# SQLSTATE 53100: the server could not extend a file (or write WAL) for lack of space.
DISK_FULL = "53100"


class DatabaseUnavailable(Exception):
    """The database cannot be reached; the batch was not stored."""

    def __init__(self, message: str, sqlstate: str | None = None) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate

    @property
    def disk_full(self) -> bool:
        """The server is out of disk space: writes fail until an operator frees some."""
        return self.sqlstate == DISK_FULL


class BatchTimedOut(DatabaseUnavailable):
    """A statement of the batch hit lock_timeout or statement_timeout; the batch was not stored."""


@dataclass
class WriteResult:
    inserted: int = 0
    duplicates: int = 0  # rows already in the table (redeliveries) or twice in the batch
    storage_rejects: int = 0
    rejections_not_recorded: int = 0  # rejected readings beyond the per-message cap
    hook: HookResult = field(default_factory=HookResult)
    seconds: float = 0.0
    # The rows went by COPY straight into telemetries, not the staging way (BatchWriter._insert).
    copied_direct: bool = False


def configure_connection(conn: psycopg.Connection) -> None:
    """Pool hook: each connection gets its own staging table, once."""
    conn.execute(queries["create_staging"])


def connection_setup(settings: Settings) -> Callable[[psycopg.Connection], None]:
    """Pool hook of the ingestion pool: the staging table and the batch timeouts."""
    lock_ms = str(round(settings.ingest_lock_timeout * 1000))
    statement_ms = str(round(settings.ingest_statement_timeout * 1000))

    def configure(conn: psycopg.Connection) -> None:
        configure_connection(conn)
        conn.execute(queries["set_timeouts"], {"lock_ms": lock_ms, "statement_ms": statement_ms})

    return configure


def _timed_out(exc: psycopg.Error) -> bool:
    return (exc.sqlstate or "") in _TIMED_OUT


def _is_unavailable(exc: psycopg.Error) -> bool:
    """The database, not the batch, is the problem: retry the same batch later."""
    if (exc.sqlstate or "").startswith(_RETRYABLE):
        return True
    return isinstance(exc, psycopg.OperationalError) and not _is_data_error(exc)


def _is_data_error(exc: psycopg.Error) -> bool:
    return (exc.sqlstate or "").startswith(_DATA_ERROR_CLASSES)


def _text(value: str | None) -> str | None:
    """PostgreSQL text cannot hold NUL: a rejection record must never be refused for the very
    thing that made its message bad (that would fail the batch again on every redelivery)."""
    return value.replace("\x00", "\\x00") if value else value


class BatchWriter:
    def __init__(self, pool: ConnectionPool, hook: BatchHook) -> None:
        self._pool = pool
        self._hook = hook
        # Whether the next batch is COPYed straight into telemetries (see _insert). Not at
        # start: what comes first after a restart is most likely a redelivery.
        self._copy_direct = False

    def write(self, batch: Batch) -> WriteResult:
        try:
            return self._write(batch)
        except BaseException:
            # Not committed, or not known to be: the hook must not trust what it remembers,
            # and the batch done again may find its own rows stored (a commit whose answer was
            # lost): it goes the safe way.
            self._hook.on_failed()
            self._copy_direct = False
            raise

    def _write(self, batch: Batch) -> WriteResult:
        started = time.perf_counter()
        try:
            with self._pool.connection() as conn:
                try:
                    with conn.transaction():
                        if batch.births:
                            # Durable with the batch: what comes after a birth is acknowledged
                            # only once it is stored (ingestor.aliases).
                            aliases.store(conn, batch.births)
                        inserted, refused, copied_direct = self._insert(conn, batch.rows)
                        # A copy: a retried write must not add its refusals a second time.
                        rejected = {k: m.copy() for k, m in batch.rejected.items()}
                        for n, (row, why) in enumerate(refused):
                            self._refused(
                                batch, rejected, row, why, logged=n < REFUSED_LOGS_PER_BATCH
                            )
                        if len(refused) > REFUSED_LOGS_PER_BATCH:
                            log.warning(
                                "readings_refused_not_logged",
                                count=len(refused) - REFUSED_LOGS_PER_BATCH,
                            )
                        hook_result = HookResult()
                        if inserted:
                            new_rows = [row.reading for row in inserted]
                            new_rows.sort(key=lambda r: (r.device_metric_id, r.ts))
                            hook_result = self._run_hook(conn, new_rows)
                        if rejected:
                            self._copy_rejections(conn, batch, rejected)
                except psycopg.Error as exc:
                    if _is_unavailable(exc) and not _timed_out(exc) and not conn.closed:
                        # Do not hand this session out again: after a failover it may sit on
                        # a read-only standby for good. The pool makes a fresh one.
                        conn.close()
                    raise
        except PoolTimeout as exc:
            raise DatabaseUnavailable(f"no database connection: {exc}") from exc
        except psycopg.Error as exc:
            if _timed_out(exc):
                raise BatchTimedOut(str(exc).strip() or type(exc).__name__, exc.sqlstate) from exc
            if _is_unavailable(exc):
                message = str(exc).strip() or type(exc).__name__
                raise DatabaseUnavailable(message, exc.sqlstate) from exc
            raise  # a bug or a schema problem (e.g. migrations not applied): stop loudly
        return WriteResult(
            inserted=len(inserted),
            duplicates=batch.duplicates + len(batch.rows) - len(inserted) - len(refused),
            storage_rejects=len(refused),
            rejections_not_recorded=sum(sum(m.not_recorded.values()) for m in rejected.values()),
            hook=hook_result,
            seconds=time.perf_counter() - started,
            copied_direct=copied_direct,
        )

    def load_aliases(self, store: aliases.AliasStore) -> int:
        """Fill ``store`` with the kept Sparkplug births; the number of scopes. Raises
        DatabaseUnavailable when the database cannot be read (the caller retries)."""
        try:
            with self._pool.connection() as conn:
                return store.load(conn)
        except PoolTimeout as exc:
            raise DatabaseUnavailable(f"no database connection: {exc}") from exc
        except psycopg.Error as exc:
            if _is_unavailable(exc) or _timed_out(exc):
                raise DatabaseUnavailable(str(exc).strip() or type(exc).__name__) from exc
            raise  # e.g. migration 0011 not applied: stop loudly

    def _run_hook(self, conn: psycopg.Connection, rows: Sequence[BatchReading]) -> HookResult:
        """The rule engine, in a savepoint: if the server refuses what it writes (a data error,
        not a lost connection), the telemetry still commits and the failure is logged."""
        try:
            with conn.transaction():
                return self._hook.on_inserted(conn, rows)
        except psycopg.Error as exc:
            if not _is_data_error(exc):
                raise  # an outage is retried; a schema or permission problem stops us loudly
            self._hook.on_failed()  # its writes were rolled back with the savepoint
            log.error(
                "rules_failed",
                rows=len(rows),
                sqlstate=exc.sqlstate,
                error=" ".join(str(exc).split())[:300],
            )
            return HookResult()

    def _insert(
        self, conn: psycopg.Connection, rows: Sequence[Row]
    ) -> tuple[list[Row], list[tuple[Row, str]], bool]:
        """Insert rows: (the rows inserted, the rows the server refused with why, whether they
        went by the direct COPY).

        A COPY straight into telemetries costs the server about a third less per row than
        staging, INSERT … ON CONFLICT (speculative insertion) and the join back that says which
        rows were new (measured with this schema: 6.5 against 10.1 µs a row). It cannot skip a
        row that is already stored: the unique key refuses the whole COPY, which is undone (a
        savepoint) and done again the safe way. So it is tried only after a batch in which
        nothing was already stored; a batch with a redelivery or a device's repeat keeps the
        next one on the safe way, and a fleet that repeats itself in every batch never pays
        for a refused COPY. A row the server refuses for another reason goes the safe way too,
        where bisection finds it, and so does the batch after it."""
        if not rows:
            return [], [], False
        if self._copy_direct:
            try:
                with conn.transaction(), conn.cursor() as cur:
                    copy_telemetries(cur, ((r.device_metric_id, r.ts, r.value_json) for r in rows))
                return list(rows), [], True
            except psycopg.errors.UniqueViolation:
                log.debug("batch_copy_met_stored_rows", rows=len(rows))
            except psycopg.Error as exc:
                if not _is_data_error(exc):
                    raise
        inserted, refused = self._insert_new(conn, rows)
        # Straight in next time only after a batch that went in whole: a duplicate would
        # refuse the next COPY too, and so would a row the server refuses again and again.
        self._copy_direct = len(inserted) == len(rows)
        return inserted, refused, False

    def _insert_new(
        self, conn: psycopg.Connection, rows: Sequence[Row]
    ) -> tuple[list[Row], list[tuple[Row, str]]]:
        """Insert what is new; on a data error split the rows in halves until the culprits
        are alone."""
        if not rows:
            return [], []
        try:
            with conn.transaction():  # a savepoint: a refusal undoes this part only
                return self._copy_insert(conn, rows), []
        except psycopg.Error as exc:
            if not _is_data_error(exc):
                raise
            if len(rows) == 1:
                first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                return [], [(rows[0], f"{exc.sqlstate}: {first_line}")]
            log.info("batch_bisect", rows=len(rows), sqlstate=exc.sqlstate)
            half = len(rows) // 2
            ok_a, bad_a = self._insert_new(conn, rows[:half])
            ok_b, bad_b = self._insert_new(conn, rows[half:])
            return ok_a + ok_b, bad_a + bad_b

    def _copy_insert(self, conn: psycopg.Connection, rows: Sequence[Row]) -> list[Row]:
        """COPY the rows into staging and insert what is new; the rows inserted."""
        with conn.cursor() as cur:
            stage(cur, ((n, r.device_metric_id, r.ts, r.value_json) for n, r in enumerate(rows)))
            cur.execute(queries["insert_from_staging"])
            inserted = [rows[n] for (n,) in cur.fetchall()]
            # The staging table empties at commit; inside the transaction a later savepoint
            # (bisection) must not see these rows again.
            cur.execute(queries["truncate_staging"])
            return inserted

    @staticmethod
    def _refused(
        batch: Batch, rejected: dict[int, RejectedMessage], row: Row, why: str, *, logged: bool
    ) -> None:
        # The reading passed validation but the server refused it: keep the message for study.
        if logged:
            log.warning(
                "reading_refused_by_database",
                device_metric_id=row.device_metric_id,
                ts=row.ts.isoformat(),
                error=why[:MAX_DETAIL_CHARS],
            )
        message = rejected.get(row.source)
        if message is None:
            message = rejected[row.source] = RejectedMessage(row.source)
        message.add(
            RejectRow(
                reason=Reason.storage_error,
                detail=f"metric {row.reading.metric_type!r} at {row.ts.isoformat()}: {why}",
                serial_id=row.reading.serial_id,
                metric=row.reading.metric_type,
            ),
            batch.bounds.max_rejections_per_message,
        )

    @staticmethod
    def _copy_rejections(
        conn: psycopg.Connection, batch: Batch, rejected: Mapping[int, RejectedMessage]
    ) -> None:
        """Each rejected message's payload once, then its recorded rejections pointing at it.

        The payload ids are drawn first, so both tables go in by COPY without a round trip per
        message."""
        ordered = sorted(rejected.values(), key=lambda m: m.source)
        ids = [
            row[0]
            for row in conn.execute(
                queries["next_rejected_payload_ids"], {"count": len(ordered)}
            ).fetchall()
        ]
        cut = batch.keep_payload_bytes
        with conn.cursor() as cur:
            with cur.copy(queries["copy_rejected_payloads"]) as copy:
                for payload_id, message in zip(ids, ordered, strict=True):
                    source = batch.messages[message.source]
                    raw = source.payload
                    copy.write_row(
                        (
                            payload_id,
                            datetime.fromtimestamp(source.received_at, UTC),
                            _text(source.topic),
                            raw if len(raw) <= cut else raw[:cut],
                            len(raw),
                            message.rejections,
                            json.dumps(dict(sorted(message.not_recorded.items()))),
                        )
                    )
            with cur.copy(queries["copy_rejections"]) as copy:
                for payload_id, message in zip(ids, ordered, strict=True):
                    received_at = datetime.fromtimestamp(
                        batch.messages[message.source].received_at, UTC
                    )
                    for r in message.recorded:
                        copy.write_row(
                            (
                                payload_id,
                                received_at,
                                str(r.reason),
                                _text(r.detail[:MAX_DETAIL_CHARS]),
                                _text(r.serial_id),
                                _text(r.metric),
                            )
                        )
