"""The benchmarks still run end to end (their figures are not judged here)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BENCH = REPO / "bench" / "ingest_bench.py"
FIGURES = (
    *("(a5/a311) ", "(scaling) ", "| 1 |", "| 2 |"),
    *("(a) ", "(b) ", "(c1) ", "(rss) ", "(c10) ", "(rules) ", "(latency) "),
)
TIMEOUT = 300  # seconds; the quick run takes well under a minute on two cores


def run_script(script: Path, *args: str) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [sys.executable, str(script), *args],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        cwd=REPO,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return done


@pytest.mark.timeout(TIMEOUT + 30)
def test_quick_benchmark_prints_every_figure() -> None:
    """`bench/ingest_bench.py --quick` exits 0 and prints one line per figure, each with a
    target verdict or rate, so the script cannot rot unnoticed between full runs."""
    done = run_script(BENCH, "--quick")
    lines = done.stdout.splitlines()
    for tag in FIGURES:
        assert any(line.startswith(tag) for line in lines), f"no {tag!r} line in:\n{done.stdout}"
    assert "msg/s" in next(line for line in lines if line.startswith("(c1) "))
    assert "redelivered after stop: 0" in next(line for line in lines if line.startswith("(c1) "))
    # issue 14's (c10) target is against (a) of the same run: the ratio has a line of its own
    assert any(line.startswith("  (c10) rows/s vs (a) ") for line in lines), done.stdout


@pytest.mark.timeout(TIMEOUT + 30)
def test_rule_hook_benchmark_prints_every_mode() -> None:
    """`bench/rules_hook_bench.py` on small batches exits 0 and prints a timing per mode."""
    done = run_script(REPO / "bench" / "rules_hook_bench.py", "--batches", "2")
    for mode in ("cached", "re-read", "stepwise"):
        line = next((x for x in done.stdout.splitlines() if x.strip().startswith(mode)), "")
        assert " ms " in line and "us per reading" in line, done.stdout


@pytest.mark.timeout(TIMEOUT + 30)
def test_timescale_cost_benchmark_runs(pg_admin_dsn: str, timescaledb_available: bool) -> None:
    """`bench/timescale_costs.py` on a small load exits 0 with a line per run: figures for the
    plain table, and for the hypertable exactly when the server has TimescaleDB."""
    done = run_script(REPO / "bench" / "timescale_costs.py", pg_admin_dsn, "--rows", "5000")
    lines = done.stdout.splitlines()
    plain = next(x for x in lines if x.startswith("plain table"))
    assert len(plain.split()) == 7, done.stdout  # label (4 words) and three figures
    hyper = next(x for x in lines if x.startswith("hypertable"))
    assert ("not measured" in hyper) is not timescaledb_available, done.stdout


def test_takeover_benchmark_prints_both_stops() -> None:
    """`bench/takeover_bench.py --rounds 2` exits 0 (every takeover under its target) and
    prints a takeover figure for kill -9 and for SIGTERM."""
    done = run_script(REPO / "bench" / "takeover_bench.py", "--rounds", "2")
    for how in ("kill -9", "SIGTERM"):
        line = next(x for x in done.stdout.splitlines() if x.startswith(f"takeover after {how}"))
        assert "target < 10 s: MET" in line, done.stdout
