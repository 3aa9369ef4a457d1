"""The installed console script: `iothub migrate && iothub seed`, twice, on an empty database."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import psycopg

from iothub import exitcodes

IOTHUB = Path(sys.executable).with_name("iothub")  # the console script of this virtualenv
TIMEOUT = 120  # seconds, per command


def iothub(dsn: str, *argv: str) -> subprocess.CompletedProcess[str]:
    # Only our variable: a stray IOTHUB_* in the caller's environment would be a config error.
    env = {k: v for k, v in os.environ.items() if not k.startswith("IOTHUB_")}
    env["IOTHUB_DATABASE_URL"] = dsn
    return subprocess.run(
        [str(IOTHUB), *argv], env=env, capture_output=True, text=True, timeout=TIMEOUT, check=False
    )


def table_counts(dsn: str) -> dict[str, int]:
    names = ("users", "metrics", "devices", "device_metrics", "rules", "events", "telemetries")
    with psycopg.connect(dsn) as conn:
        return {
            name: conn.execute(f"SELECT count(*) FROM {name}").fetchone()[0]  # type: ignore[index]
            for name in names
        }


def test_migrate_then_seed_twice_is_idempotent(empty_db_url: str) -> None:
    """On an empty database both commands succeed twice; the second pair changes nothing."""
    assert IOTHUB.exists(), f"console script not installed at {IOTHUB}"
    first = [iothub(empty_db_url, "migrate"), iothub(empty_db_url, "seed")]
    assert [p.returncode for p in first] == [exitcodes.OK, exitcodes.OK], [p.stderr for p in first]
    assert first[1].stdout.startswith("seeded: 3 users, 7 metrics, 7 devices, 11 device_metrics")
    counts = table_counts(empty_db_url)
    assert {k: counts[k] for k in ("users", "metrics", "devices", "device_metrics", "rules")} == {
        "users": 3,
        "metrics": 7,
        "devices": 7,
        "device_metrics": 11,
        "rules": 11,
    }
    assert counts["events"] == 8
    assert counts["telemetries"] > 5000

    second = [iothub(empty_db_url, "migrate"), iothub(empty_db_url, "seed")]
    assert [p.returncode for p in second] == [exitcodes.OK, exitcodes.OK], [
        p.stderr for p in second
    ]
    assert second[1].stdout.strip() == "already seeded: nothing to do"
    assert table_counts(empty_db_url) == counts
