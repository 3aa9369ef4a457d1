"""What TimescaleDB changes, measured on your server: the same ingest workload into the plain
`telemetries` table and into the hypertable, a backfill into a compressed chunk, and the bucket
query of `iothub query stats` on the plain views and on the continuous aggregates; the setup
itself on a table that already holds the readings (with the aggregates' history refresh), and the
pruning of the rejected-message tables: the daemon's batch DELETEs, and chunk drops had
`rejected_messages` been made a hypertable.

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

from config.settings import DEFAULT_RETENTION, DEFAULT_RETENTION_BATCH
from ingestor import retention
from schema import migrate, timescale

DEFAULT_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"
BINDINGS = 50
BATCH = 5_000  # readings per transaction, the ingestor's default batch size
STATS_ROUNDS = 20  # bucket queries timed per relation
REJECTED_DAYS = 60  # rejections spread over twice the retention: half of them are pruned
REJECTED_PAYLOAD = 512  # bytes of each rejected payload

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
            # The first refresh, over all the readings: what setup-timescaledb's step 15 costs.
            started = time.perf_counter()
            conn.execute("CALL refresh_continuous_aggregate('telemetry_hourly', NULL, NULL)")
            found["refresh_s"] = time.perf_counter() - started
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


def setup_on_existing(admin_dsn: str, total: int) -> float:
    """Seconds `setup-timescaledb` takes on a plain table already holding `total` readings: the
    move into chunks (migrate_data) and the aggregates' history refresh (steps 15, 16)."""
    start = datetime.now(UTC) - timedelta(days=40, minutes=total // BINDINGS)
    with (
        scratch_database(admin_dsn, "setup") as dsn,
        psycopg.connect(dsn, autocommit=True) as conn,
    ):
        migrate.migrate(conn)
        conn.execute(BINDINGS_SQL.format(bindings=BINDINGS).encode())
        conn.execute(STAGING)
        ingest(conn, rows(total, start))
        conn.execute("ANALYZE")
        started = time.perf_counter()
        result = timescale.setup(conn, force=False)
        if result.outcome is not timescale.Outcome.DONE:
            raise SystemExit(f"setup-timescaledb failed: {result}")
        return time.perf_counter() - started


REJECTED_PAYLOADS_SQL = """
INSERT INTO rejected_payloads (id, received_at, topic, payload, payload_bytes, rejections)
SELECT n, now() - (n::float8 / %(total)s) * %(days)s * INTERVAL '1 day', 'bench/devices/x',
       convert_to(repeat('x', %(size)s), 'UTF8'), %(size)s, 1
FROM generate_series(1, %(total)s) AS n
"""
REJECTIONS_SQL = """
INSERT INTO rejected_messages (payload_id, received_at, reason, detail, serial_id, metric)
SELECT id, received_at, 'unknown_metric', 'no such metric: bogus', 'SN-BENCH', 'bogus'
FROM rejected_payloads
"""
# What setup-timescaledb would do for rejected_messages, had it been made a hypertable: the id
# alone cannot stay unique (a hypertable's unique keys contain its time column).
REJECTED_HYPERTABLE_SQL = """
ALTER TABLE rejected_messages DROP CONSTRAINT rejected_messages_pkey;
SELECT create_hypertable('rejected_messages', 'received_at',
                         chunk_time_interval => INTERVAL '1 day', migrate_data => true);
"""


def prune(conn: psycopg.Connection, query: str) -> int:
    """The daemon's pruning of one table (ingestor/retention.sql): DELETEs of a batch each,
    each committed on its own, until one deletes less than a batch."""
    deleted = 0
    while True:
        count = conn.execute(
            retention.queries[query], {"keep": DEFAULT_RETENTION, "limit": DEFAULT_RETENTION_BATCH}
        ).rowcount
        deleted += count
        if count < DEFAULT_RETENTION_BATCH:
            return deleted


def side_tables(admin_dsn: str, total: int, hypertable: bool) -> dict[str, float]:
    """Seconds to prune the older half of `total` rejected messages (one rejection each, 60
    days of them, 30 days kept), and the two tables' sizes before it."""
    with (
        scratch_database(admin_dsn, "side_hyper" if hypertable else "side_plain") as dsn,
        psycopg.connect(dsn, autocommit=True) as conn,
    ):
        migrate.migrate(conn)
        conn.execute(
            REJECTED_PAYLOADS_SQL,
            {"total": total, "days": REJECTED_DAYS, "size": REJECTED_PAYLOAD},
        )
        conn.execute(REJECTIONS_SQL)
        if hypertable:
            conn.execute("CREATE EXTENSION IF NOT EXISTS timescaledb")
            conn.execute(REJECTED_HYPERTABLE_SQL.encode())
        conn.execute("VACUUM ANALYZE")
        sizes = conn.execute(
            "SELECT pg_total_relation_size('rejected_payloads'), "
            + (
                "hypertable_size('rejected_messages')"
                if hypertable
                else "pg_total_relation_size('rejected_messages')"
            )
        ).fetchone()
        assert sizes is not None
        started = time.perf_counter()
        if hypertable:
            conn.execute(
                "SELECT drop_chunks('rejected_messages', older_than => %s * INTERVAL '1 second')",
                (DEFAULT_RETENTION,),
            )
        else:
            prune(conn, "prune_rejected_messages")
        messages_s = time.perf_counter() - started
        started = time.perf_counter()
        pruned = prune(conn, "prune_rejected_payloads")
        return {
            "messages_s": messages_s,
            "payloads_s": time.perf_counter() - started,
            "pruned": pruned,
            "payload_bytes": sizes[0],
            "message_bytes": sizes[1],
        }


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
    if available and available[0]:
        print(f"hourly history refresh: {found['refresh_s']:.2f} s for {args.rows:,} readings")
        setup_s = setup_on_existing(args.dsn, args.rows)
        print(f"setup-timescaledb on {args.rows:,} existing readings: {setup_s:.2f} s")
    else:
        print("setup-timescaledb: not measured: the server has no TimescaleDB")
    print_side_tables(args.dsn, args.rows, bool(available and available[0]))


def print_side_tables(dsn: str, total: int, has_timescaledb: bool) -> None:
    print(
        f"side tables: {total:,} rejected messages over {REJECTED_DAYS} days "
        f"({REJECTED_PAYLOAD} B payloads), the older half pruned"
    )
    for hypertable, label in (
        (False, "rejected_messages plain, DELETE"),
        (True, "rejected_messages hypertable, drop"),
    ):
        if hypertable and not has_timescaledb:
            print(f"{label:34} not measured: the server has no TimescaleDB")
            continue
        found = side_tables(dsn, total, hypertable)
        print(
            f"{label:34} messages {found['messages_s']:6.2f} s "
            f"(table {found['message_bytes'] / 2**20:.1f} MiB), "
            f"payloads DELETE {found['payloads_s']:6.2f} s "
            f"(table {found['payload_bytes'] / 2**20:.1f} MiB), {found['pruned']:,} payloads pruned"
        )


if __name__ == "__main__":
    main()
