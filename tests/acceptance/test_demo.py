"""`iothub demo` as a newcomer runs it: nothing configured answers, so it brings its own servers."""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from iothub import exitcodes
from tests.support.services import free_port

DEMO_SECONDS = 15  # of simulated traffic; set-up and clean-up add a few seconds
TIMEOUT = 90  # seconds for the whole command
REASONS = (
    "bad_json",
    "bad_schema",
    "payload_too_large",
    "unknown_device",
    "device_mismatch",
    "unknown_metric",
    "type_mismatch",
    "bad_timestamp",
    "ts_in_future",
)


def _number(pattern: str, text: str) -> int:
    match = re.search(pattern, text, re.MULTILINE)
    assert match, f"{pattern!r} not in the output:\n{text}"
    return int(match.group(1).replace(",", ""))


def _processes_mentioning(path: str) -> list[str]:
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if path in cmdline:
            found.append(f"{proc.name}: {cmdline}")
    return found


def _log_events(stderr: str) -> list[dict[str, object]]:
    events = []
    for line in stderr.splitlines():
        with contextlib.suppress(ValueError):
            entry = json.loads(line)
            if isinstance(entry, dict) and "event" in entry:
                events.append(entry)
    return events


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.slow
def test_demo_starts_its_own_servers_shows_the_pipeline_and_cleans_up() -> None:
    """With nothing listening where the configuration points, the demo starts throwaway
    PostgreSQL and Mosquitto, stores readings, records rejections with reasons, fires at least
    one rule, exits 0, and leaves no server process or directory behind."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("IOTHUB_")}
    env["IOTHUB_DATABASE_URL"] = f"postgresql://postgres@127.0.0.1:{free_port()}/nothing"
    env["IOTHUB_MQTT_URL"] = f"mqtt://127.0.0.1:{free_port()}"
    done = subprocess.run(
        [sys.executable, "-m", "iothub.cli.main", "demo", "--duration", str(DEMO_SECONDS)],
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    out = done.stdout
    assert done.returncode == exitcodes.OK, f"{out}\n{done.stderr[-3000:]}"

    # It said what it started, and where.
    pg = re.search(r"PostgreSQL .*throwaway one on 127\.0\.0\.1:(\d+) \(in (\S+)/postgres\)", out)
    mq = re.search(r"Mosquitto .*throwaway one on 127\.0\.0\.1:(\d+) \(in (\S+)/mosquitto\)", out)
    assert pg and mq, out
    assert pg.group(2) == mq.group(2)
    root = pg.group(2)
    logged = {(e["event"], e.get("server")) for e in _log_events(done.stderr)}
    assert {("demo_database", "throwaway"), ("demo_broker", "throwaway")} <= logged

    # Live progress, as plain lines since stdout is not a terminal.
    progress = [line for line in out.splitlines() if "msg/s" in line]
    assert len(progress) >= 3, out
    assert "\r" not in out

    # The summary.
    assert _number(r"^\s+rows stored\s+([\d,]+)", out) > 0
    assert _number(r"^\s+rejected\s+([\d,]+)", out) > 0
    reasons = re.findall(r"^\s{4}(\w+)\s+[\d,]+$", out, re.MULTILINE)
    assert len(set(reasons) & set(REASONS)) >= 3, out
    # Readings of each device format landed: native, Zigbee2MQTT and The Things Stack.
    for label in ("native JSON", "Zigbee2MQTT", "The Things Stack"):
        assert _number(rf"^\s+from {label}\s+([\d,]+) rows \(SN-", out) > 0, label
    assert "sources sim-z2m, sim-ttn" in out
    assert _number(r"^\s+events\s+(\d+) triggered", out) >= 1
    fired = re.findall(r"^\s{4}(.+?)\s+SN-\S+\s+(\d+)\s+(\d+)\s+\d\d:\d\d:\d\d", out, re.MULTILINE)
    assert any(int(triggered) >= 1 for _, triggered, _ in fired), out
    assert "result: OK" in out

    # Nothing left behind.
    assert not Path(root).exists()
    assert _processes_mentioning(root) == []
    assert not _listening(int(pg.group(1)))
    assert not _listening(int(mq.group(1)))
