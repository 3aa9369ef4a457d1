"""What the seed's duplicate index would cost: load the same telemetry into `telemetries` as
migrated (the unique constraint's index on (device_metric_id, ts), plus ts and the primary key)
and into the same table with the seed's extra idx_telemetries_metric_time on the very same
columns, and print time, WAL and index size of both.

    .venv/bin/python bench/duplicate_index.py [DSN] [--rows 200000] [--rounds 3]

DSN (default: IOTHUB_DATABASE_URL, else postgresql://postgres@127.0.0.1:5432/postgres) must allow
CREATE DATABASE: each load uses a scratch database of its own, migrated by the project's own
migrations, and drops it at the end. Rows are
written as the ingestor writes them: COPY in batches of 5,000, one transaction per batch, readings
of 50 bindings interleaved in time order.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta

import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

from schema import migrate

DEFAULT_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"
BINDINGS = 50
BATCH = 5_000  # readings per COPY and per transaction, the ingestor's default batch size

# The bindings the readings belong to, in a freshly migrated database (ids 1..BINDINGS).
BINDINGS_SQL = """
INSERT INTO metrics (metric_type, data_type) VALUES ('temperature', 'numeric');
INSERT INTO devices (serial_id, name) SELECT 'bench-' || n, 'bench ' || n
    FROM generate_series(1, {bindings}) AS n;
INSERT INTO device_metrics (device_id, metric_id) SELECT id, 1 FROM devices ORDER BY id;
"""
DUPLICATE = "CREATE INDEX idx_telemetries_metric_time ON telemetries (device_metric_id, ts)"


@contextmanager
def scratch_database(dsn: str) -> Iterator[str]:
    name = f"iothub_bench_dupidx_{os.getpid()}"
    with psycopg.connect(dsn, autocommit=True) as admin:
        admin.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(name)))
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield psycopg.conninfo.make_conninfo(dsn, dbname=name)
    finally:
        with psycopg.connect(dsn, autocommit=True) as admin:
            admin.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


def rows(total: int) -> Iterator[tuple[int, datetime, Jsonb]]:
    start = datetime(2026, 1, 1, tzinfo=UTC)
    for i in range(total):
        # One reading per binding per "tick": what 50 sensors reporting every 10 s look like.
        tick, binding = divmod(i, BINDINGS)
        value = 20 + (i % 997) / 100
        yield binding + 1, start + timedelta(seconds=10 * tick), Jsonb({"t": "numeric", "v": value})


def load(admin_dsn: str, total: int, duplicate: bool) -> dict[str, float]:
    # The table exactly as `iothub migrate` makes it, so the figure follows the schema.
    with scratch_database(admin_dsn) as dsn, psycopg.connect(dsn, autocommit=True) as conn:
        migrate.migrate(conn)
        conn.execute(BINDINGS_SQL.format(bindings=BINDINGS).encode())
        if duplicate:
            conn.execute(DUPLICATE)
        conn.execute("CHECKPOINT")
        lsn_before = conn.execute("SELECT pg_current_wal_lsn()").fetchone()
        assert lsn_before is not None
        started = time.perf_counter()
        batch: list[tuple[int, datetime, Jsonb]] = []

        def flush() -> None:
            with (
                conn.transaction(),
                conn.cursor() as cur,
                cur.copy("COPY telemetries (device_metric_id, ts, value_jsonb) FROM STDIN") as copy,
            ):
                for row in batch:
                    copy.write_row(row)
            batch.clear()

        for row in rows(total):
            batch.append(row)
            if len(batch) == BATCH:
                flush()
        if batch:
            flush()
        seconds = time.perf_counter() - started
        wal = conn.execute(
            "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), %s)", (lsn_before[0],)
        ).fetchone()
        sizes = conn.execute(
            "SELECT pg_indexes_size('telemetries'), pg_table_size('telemetries')"
        ).fetchone()
        assert wal is not None and sizes is not None
        return {
            "seconds": seconds,
            "wal_mb": float(wal[0]) / 2**20,
            "index_mb": sizes[0] / 2**20,
            "table_mb": sizes[1] / 2**20,
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "dsn", nargs="?", default=os.environ.get("IOTHUB_DATABASE_URL") or DEFAULT_DSN
    )
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    results: dict[bool, list[dict[str, float]]] = {False: [], True: []}
    for _ in range(args.rounds):
        # Alternate, so that a warming cache or a busy neighbour does not favour one side.
        for duplicate in (False, True):
            results[duplicate].append(load(args.dsn, args.rows, duplicate))
    print(f"{args.rows:,} rows, COPY in batches of {BATCH:,}, median of {args.rounds} rounds")
    print(f"{'':32} {'seconds':>8} {'rows/s':>9} {'WAL MB':>8} {'index MB':>9} {'table MB':>9}")
    summary = {}
    for duplicate, label in (
        (False, "as migrated (no duplicate)"),
        (True, "with idx_telemetries_metric_time"),
    ):
        runs = results[duplicate]
        median = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
        summary[duplicate] = median
        print(
            f"{label:32} {median['seconds']:8.2f} {args.rows / median['seconds']:9,.0f} "
            f"{median['wal_mb']:8.1f} {median['index_mb']:9.1f} {median['table_mb']:9.1f}"
        )
    base, dup = summary[False], summary[True]
    print(
        f"the duplicate index costs {100 * (dup['seconds'] / base['seconds'] - 1):+.0f}% load "
        f"time, {100 * (dup['wal_mb'] / base['wal_mb'] - 1):+.0f}% WAL and "
        f"{dup['index_mb'] - base['index_mb']:.1f} MB of index per {args.rows:,} rows"
    )


if __name__ == "__main__":
    main()
