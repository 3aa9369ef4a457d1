"""What TimescaleDB changes, measured on your server: the same ingest workload into the plain
`telemetries` table and into the hypertable, a backfill into a compressed chunk, and the bucket
query of `iothub query stats` on the plain views and on the continuous aggregates.

    .venv/bin/python bench/timescale_costs.py [DSN] [--rows 200000]

DSN (default: IOTHUB_DATABASE_URL, else postgresql://postgres@127.0.0.1:5432/postgres) must allow
CREATE DATABASE: each run uses a scratch database of its own, migrated by the project's own
migrations (and set up by `schema.timescale.setup` for the hypertable run), dropped at the end.
Readings are written as the ingestor writes them: COPY into a staging table, then
`INSERT … ON CONFLICT (device_metric_id, ts) DO NOTHING`, 5,000 per transaction. On a server
without TimescaleDB only the plain runs are measured, and the others say so.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta

import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

from schema import migrate, timescale

DEFAULT_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"
BINDINGS = 50
BATCH = 5_000  # readings per transaction, the ingestor's default batch size
STATS_ROUNDS = 20  # bucket queries timed per relation

BINDINGS_SQL = """
INSERT INTO metrics (metric_type, data_type) VALUES ('temperature', 'numeric');
INSERT INTO devices (serial_id, name) SELECT 'bench-' || n, 'bench ' || n
    FROM generate_series(1, {bindings}) AS n;
INSERT INTO device_metrics (device_id, metric_id) SELECT id, 1 FROM devices ORDER BY id;
"""
STAGING = (
    "CREATE TEMP TABLE staging (device_metric_id int, ts timestamptz, value_jsonb jsonb) "
    "ON COMMIT DELETE ROWS"
)
INSERT = (
    "INSERT INTO telemetries (device_metric_id, ts, value_jsonb) "
    "SELECT device_metric_id, ts, value_jsonb FROM staging "
    "ON CONFLICT (device_metric_id, ts) DO NOTHING"
)
STATS = (
    "SELECT bucket, readings, value_min, value_max, value_avg, value_last FROM {} "
    "WHERE device_metric_id = 1 AND bucket >= %s ORDER BY bucket"
)


@contextmanager
def scratch_database(dsn: str, tag: str) -> Iterator[str]:
    name = f"iothub_bench_ts_{tag}_{os.getpid()}"
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


def rows(total: int, start: datetime) -> Iterator[tuple[int, datetime, Jsonb]]:
    for i in range(total):
        # One reading per binding per minute, interleaved in time order, as a fleet sends them.
        tick, binding = divmod(i, BINDINGS)
        value = 20 + (i % 997) / 100
        yield binding + 1, start + timedelta(minutes=tick), Jsonb({"t": "numeric", "v": value})


def ingest(conn: psycopg.Connection, readings: Iterator[tuple[int, datetime, Jsonb]]) -> float:
    """Seconds to write the readings as the ingestor does."""
    started = time.perf_counter()
    batch: list[tuple[int, datetime, Jsonb]] = []

    def flush() -> None:
        with conn.transaction(), conn.cursor() as cur:
            with cur.copy("COPY staging FROM STDIN") as copy:
                for row in batch:
                    copy.write_row(row)
            cur.execute(INSERT)
        batch.clear()

    for row in readings:
        batch.append(row)
        if len(batch) == BATCH:
            flush()
    if batch:
        flush()
    return time.perf_counter() - started


def time_stats(conn: psycopg.Connection, relation: str, since: datetime) -> float:
    """Median milliseconds of one binding's bucket query."""
    query = sql.SQL(STATS).format(sql.Identifier(relation))
    times = []
    for _ in range(STATS_ROUNDS):
        started = time.perf_counter()
        conn.execute(query, (since,)).fetchall()
        times.append((time.perf_counter() - started) * 1000)
    return sorted(times)[len(times) // 2]


def run(admin_dsn: str, total: int, hypertable: bool) -> dict[str, float]:
    # 50 readings a minute: 200,000 readings are about 2.8 days; they end 40 days ago, so the
    # hypertable's chunks are past the compression horizon and a backfill lands in them.
    start = datetime.now(UTC) - timedelta(days=40, minutes=total // BINDINGS)
    with (
        scratch_database(admin_dsn, "hyper" if hypertable else "plain") as dsn,
        psycopg.connect(dsn, autocommit=True) as conn,
    ):
        migrate.migrate(conn)
        conn.execute(BINDINGS_SQL.format(bindings=BINDINGS).encode())
        if hypertable:
            result = timescale.setup(conn, force=False)
            if result.outcome is not timescale.Outcome.DONE:
                raise SystemExit(f"setup-timescaledb failed: {result}")
        conn.execute(STAGING)
        found = {"ingest_s": ingest(conn, rows(total, start))}
        if hypertable:
            conn.execute("CALL refresh_continuous_aggregate('telemetry_hourly', NULL, NULL)")
            conn.execute(
                "SELECT compress_chunk(c) "
                "FROM show_chunks('telemetries', older_than => INTERVAL '30 days') c"
            )
        conn.execute("ANALYZE")
        found["stats_ms"] = time_stats(conn, "telemetry_hourly", start)
        # The backfill: the same number of readings again, half of them new (30 s after the
        # stored ones), half duplicates, into the (compressed, on the hypertable) old chunks.
        backfill = [
            (dm, ts + timedelta(seconds=30 * (i % 2)), value)
            for i, (dm, ts, value) in enumerate(rows(total // 10, start))
        ]
        found["backfill_s"] = ingest(conn, iter(backfill))
        found["backfill_rows"] = len(backfill)
        return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "dsn", nargs="?", default=os.environ.get("IOTHUB_DATABASE_URL") or DEFAULT_DSN
    )
    parser.add_argument("--rows", type=int, default=200_000)
    args = parser.parse_args()
    with psycopg.connect(args.dsn, autocommit=True) as conn:
        available = conn.execute(
            "SELECT count(*) FROM pg_available_extensions WHERE name = 'timescaledb'"
        ).fetchone()
    print(f"{args.rows:,} readings of {BINDINGS} bindings, batches of {BATCH:,}")
    print(f"{'':34} {'ingest rows/s':>13} {'backfill rows/s':>15} {'stats ms':>9}")
    for hypertable, label in (
        (False, "plain table, plain views"),
        (True, "hypertable, continuous aggregates"),
    ):
        if hypertable and not (available and available[0]):
            print(f"{label:34} not measured: the server has no TimescaleDB")
            continue
        found = run(args.dsn, args.rows, hypertable)
        print(
            f"{label:34} {args.rows / found['ingest_s']:13,.0f} "
            f"{found['backfill_rows'] / found['backfill_s']:15,.0f} {found['stats_ms']:9.2f}"
        )


if __name__ == "__main__":
    main()
