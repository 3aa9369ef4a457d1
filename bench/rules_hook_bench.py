"""Rule hook benchmark: what `RuleEngine.on_inserted` costs per ingestion batch, by itself.

The end-to-end figure (`ingest_bench.py`, the rules run) mixes the hook with everything else
that shares the GIL and the two cores, and varies by +-10 points between runs. This isolates the
hook: the same batches through the same engine, in a throwaway PostgreSQL of its own, in three
modes measured in one run:

- cached: the states stay in memory between batches (one instance per device_metric);
- re-read: every device_metric's states are read again each batch, as when another instance
  wrote them in between (two instances taking turns on the same devices);
- stepwise: states cached, but every rule goes through step_many reading by reading (what the
  range shortcut of batch.Series saves).

Workload: 100 devices x 10 numeric metrics, 5 rules on each device_metric (the rules of
ingest_bench.py), batches of 50 readings per device_metric (50,000 readings) 10 ms apart in
device time, as the (c10) drain's batches.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import psycopg  # noqa: E402
import structlog  # noqa: E402
from ingest_bench import PG_SETTINGS, RULE_ACTION, RULES  # noqa: E402
from prometheus_client import CollectorRegistry  # noqa: E402

from config.settings import Settings  # noqa: E402
from ingestor.hooks import BatchReading  # noqa: E402
from iothub.devtools.localservers import LocalPostgres  # noqa: E402
from rules_engine.engine import RuleEngine  # noqa: E402
from rules_engine.evaluate import batch as evaluate_batch  # noqa: E402
from rules_engine.metrics import RuleMetrics  # noqa: E402
from schema import migrate  # noqa: E402

DEVICES = 100
METRICS = 10
T0 = datetime(2026, 1, 1, tzinfo=UTC)


def fleet(dsn: str) -> list[int]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        migrate.migrate(conn)
        conn.execute(
            "INSERT INTO devices (serial_id, name) "
            "SELECT 'bench-' || g, 'device ' || g FROM generate_series(1, %s) g",
            (DEVICES,),
        )
        conn.execute(
            "INSERT INTO metrics (metric_type, data_type) "
            "SELECT 'm' || g, 'numeric' FROM generate_series(0, %s) g",
            (METRICS - 1,),
        )
        conn.execute(
            "INSERT INTO device_metrics (device_id, metric_id) "
            "SELECT d.id, m.id FROM devices d CROSS JOIN metrics m"
        )
        for k, condition in enumerate(RULES):
            conn.execute(
                "INSERT INTO rules (name, condition, action, is_active, device_metric_id) "
                "SELECT %s, %s, %s, true, id FROM device_metrics",
                (f"bench rule {k}", json.dumps(condition), json.dumps(RULE_ACTION)),
            )
        return [row[0] for row in conn.execute("SELECT id FROM device_metrics ORDER BY id")]


def batches(dms: list[int], per_dm: int) -> Iterator[list[BatchReading]]:
    """Endless batches, sorted by (device_metric, ts) as the writer hands them over; values
    as ingest_bench.py publishes them (they rise 1.0 per 10 ms: the delta rule stays FIRING)."""
    step = 0
    while True:
        rows = []
        for dm in dms:
            for j in range(per_dm):
                i = (step + j) * DEVICES + dm % DEVICES
                value = 20 + (i % 1000) / 100 + dm % METRICS
                ts = T0 + timedelta(milliseconds=10 * (step + j))
                rows.append(BatchReading(dm, ts, value, "numeric", "s", "d", "m"))
        step += per_dm
        yield rows


def run(
    dsn: str,
    engine: RuleEngine,
    source: Iterator[list[BatchReading]],
    n: int,
    before: Callable[[], None],
) -> list[float]:
    """Milliseconds of on_inserted for n batches, each in a committed transaction."""
    timings = []
    with psycopg.connect(dsn, autocommit=True) as conn:
        for _ in range(n):
            rows = next(source)
            before()
            with conn.transaction():
                started = time.perf_counter()
                engine.on_inserted(conn, rows)
                timings.append((time.perf_counter() - started) * 1000)
    return timings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, default=15, help="measured batches per mode")
    parser.add_argument("--per-dm", type=int, default=50, help="readings per device_metric")
    args = parser.parse_args(argv)
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(40))  # errors only

    pg = LocalPostgres(Path(tempfile.mkdtemp(prefix="iothub-rules-bench-pg-")))
    try:
        pg.init()
        with (pg.data / "postgresql.conf").open("a") as fh:
            fh.write("\n# rules_hook_bench\n" + "\n".join(PG_SETTINGS) + "\n")
        pg.start()
        with psycopg.connect(pg.admin_dsn, autocommit=True) as admin:
            admin.execute("CREATE DATABASE iothub")
        dsn = pg.admin_dsn.rsplit("/", 1)[0] + "/iothub"
        dms = fleet(dsn)
        source = batches(dms, args.per_dm)
        engine = RuleEngine(Settings(database_url=dsn), RuleMetrics(CollectorRegistry()))
        # The first batch compiles the rules, finds no states, and fires the delta rule of
        # every device_metric (the values rise 6,000 per minute): a one-time cost.
        first = run(dsn, engine, source, 1, lambda: None)[0]
        run(dsn, engine, source, 1, lambda: None)
        readings = len(dms) * args.per_dm
        print(
            f"rule hook, {len(dms):,} device_metrics x {len(RULES)} rules, {readings:,} "
            f"readings per batch, {args.batches} batches per mode (median ms per batch):"
        )
        print(f"  first     {first:7.1f} ms  (once: rules compiled, {len(dms):,} events written)")

        def forget() -> None:
            engine.states.prune(())  # as if another instance had written every state

        cached = run(dsn, engine, source, args.batches, lambda: None)
        reread = run(dsn, engine, source, args.batches, forget)
        settles = evaluate_batch.settles
        evaluate_batch.settles = lambda *a: False
        try:
            stepwise = run(dsn, engine, source, args.batches, lambda: None)
        finally:
            evaluate_batch.settles = settles
        base = statistics.median(cached)
        for name, timings in (("cached", cached), ("re-read", reread), ("stepwise", stepwise)):
            median = statistics.median(timings)
            print(
                f"  {name:9} {median:7.1f} ms  ({median / base:.1f}x cached; "
                f"{median * 1000 / readings:.2f} us per reading)"
            )
    finally:
        with contextlib.suppress(Exception):
            pg.destroy()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
