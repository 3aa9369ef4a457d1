"""The peer benchmark still runs end to end on the project's own subscribers (no npm or pip
install here; its figures are not judged)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "bench" / "peers.py"
TIMEOUT = 120  # seconds; the run takes about 10 s on two cores


@pytest.mark.timeout(TIMEOUT + 30)
def test_peer_benchmark_prints_the_table() -> None:
    """`bench/peers.py --only paho,iothub` on a small backlog exits 0 and prints both rates, the
    stored row count, iothub's delivery semantics and the ratio to the paho subscriber with a
    verdict; the peers it did not run are shown as not measured, never with a figure."""
    done = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--messages",
            "2000",
            "--devices",
            "5",
            "--only",
            "paho,iothub",
        ],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        cwd=REPO,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    lines = done.stdout.splitlines()
    paho = next(line for line in lines if line.startswith("| bare paho subscriber"))
    iothub = next(line for line in lines if line.startswith("| iothub run (defaults)"))
    assert "msg/s" in paho, paho
    assert "rows/s" in iothub and "2,000 of 2,000" in iothub, iothub
    assert "ack after commit" in iothub, iothub
    ratio = next(line for line in lines if line.startswith("| iothub / paho |"))
    assert "MET" in ratio or "MISSED" in ratio, ratio
    mq_bridge = next(line for line in lines if line.startswith("| iothub / mqbridge |"))
    assert "not measured" in mq_bridge, mq_bridge
