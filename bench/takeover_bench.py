"""Takeover benchmark: how long an active/standby pair of `iothub run` goes without committing
when the active is killed with -9 or drained with SIGTERM, devices publishing live meanwhile.

    .venv/bin/python bench/takeover_bench.py                 # 6 rounds
    .venv/bin/python bench/takeover_bench.py --rounds 2      # a smoke run

It starts its own throwaway PostgreSQL and Mosquitto (as bench/ingest_bench.py does), two
daemons with one client id, and devices publishing at --rate. Each round stops the current
active (kill -9 and SIGTERM in turn), measures the time from the stop (the process has exited)
to the next row committed, which only the standby can write, and starts the stopped instance
again, as the new standby. Figures: every round's takeover, the median and the worst, against
the 10 s target of default settings.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from ingest_bench import (  # noqa: E402
    POLL_S,
    QUICK,
    READY_TIMEOUT,
    Bench,
    _publish_live,
    count_rows,
    machine,
    stop_process,
    verdict,
)

TARGET_TAKEOVER = 10.0  # seconds, with default settings
CLIENT_ID = "bench-pair"
PREFIX = "ha"


def wait_event(path: Path, event: str, occurrences: int, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        if path.read_text(errors="replace").count(f'"event": "{event}"') >= occurrences:
            return
        if proc.poll() is not None:
            raise RuntimeError(f"daemon exited ({proc.returncode}); see {path}")
        time.sleep(0.05)
    raise RuntimeError(f"no {event} (x{occurrences}) in {path}")


def takeover(bench: Bench, stopped: subprocess.Popen[bytes], how: str) -> float:
    """Stop the active; seconds from its exit to the next committed row."""
    if how == "kill -9":
        stopped.send_signal(signal.SIGKILL)
        stopped.wait(30)
    else:
        stop_process(stopped)
    t0 = time.monotonic()
    before = count_rows(bench.dsn)
    while count_rows(bench.dsn) == before:
        if time.monotonic() - t0 > READY_TIMEOUT:
            raise RuntimeError("the standby never committed")
        time.sleep(POLL_S)
    return time.monotonic() - t0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=6, help="stops of the active")
    parser.add_argument("--rate", type=float, default=500.0, help="messages per second")
    parser.add_argument("--devices", type=int, default=20, help="devices publishing")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *a: sys.exit(128 + signal.SIGTERM))
    workdir = Path(tempfile.mkdtemp(prefix="iothub-takeover-"))
    bench = Bench(QUICK, workdir, {})
    for line in machine():
        print(line)
    procs: dict[str, subprocess.Popen[bytes]] = {}
    starts = {"a": 0, "b": 0}
    publisher: mp.process.BaseProcess | None = None
    figures: list[tuple[str, float]] = []
    try:
        bench.start()

        def start(name: str) -> None:
            procs[name] = bench.start_daemon(name, PREFIX, CLIENT_ID)
            starts[name] += 1

        start("a")
        wait_event(bench.log_of("a"), "service_ready", 1, procs["a"])
        start("b")
        wait_event(bench.log_of("b"), "standby", 1, procs["b"])
        seconds = args.rounds * 8.0 + 10.0
        publisher = mp.get_context("spawn").Process(
            target=_publish_live,
            args=(bench.broker.port, PREFIX, args.devices, args.rate, seconds),
        )
        publisher.start()
        time.sleep(2.0)
        active, standby = "a", "b"
        for round_no in range(args.rounds):
            how = "kill -9" if round_no % 2 == 0 else "SIGTERM"
            figure = takeover(bench, procs[active], how)
            figures.append((how, figure))
            print(f"round {round_no + 1}: {how}: takeover {figure:.2f} s")
            wait_event(bench.log_of(standby), "service_ready", starts[standby], procs[standby])
            start(active)
            wait_event(bench.log_of(active), "standby", starts[active], procs[active])
            active, standby = standby, active
            time.sleep(2.0)
        for how in ("kill -9", "SIGTERM"):
            values = sorted(f for h, f in figures if h == how)
            if values:
                worst = values[-1]
                print(
                    f"takeover after {how}: median {statistics.median(values):.2f} s, worst "
                    f"{worst:.2f} s over {len(values)} rounds, target < {TARGET_TAKEOVER:g} s: "
                    f"{verdict(worst < TARGET_TAKEOVER)}"
                )
    finally:
        if publisher is not None and publisher.is_alive():
            publisher.terminate()
            publisher.join(10)
        for proc in procs.values():
            stop_process(proc)
        bench.stop()
    return 0 if figures and all(f < TARGET_TAKEOVER for _, f in figures) else 1


if __name__ == "__main__":
    raise SystemExit(main())
