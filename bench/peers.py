"""Peer benchmark: `iothub run` against the subscribers users would pick instead, one after
another on the same durable PostgreSQL (fsync on) and the same Mosquitto.

    .venv/bin/python bench/peers.py                        # full run: 200,000 messages
    .venv/bin/python bench/peers.py --messages 2000 --devices 5 --only paho,iothub

Subscribers (--only takes these names, comma-separated):

paho         a bare paho subscriber that only counts (MQTT v5, one connection; msg/s, no database)
iothub       `iothub run` with its defaults: table telemetries, one row per reading
mqbridge     mq-bridge from PyPI (Rust core): MQTT v5 in, PostgreSQL out, batches of 512, one
             multi-row INSERT ... ON CONFLICT per batch into peer_readings
nodered      Node-RED `mqtt in` -> node-red-contrib-postgres-multi, one INSERT per message
nodered-join the same with a join node (100 messages) and one multi-row INSERT per join

The peers are installed into a temporary directory first (npm for Node-RED, a venv and pip for
mq-bridge); a peer that cannot be installed or started here is reported as such and the others
still run: no figure is ever made up. For each subscriber a persistent session is created and left
offline, a backlog of N one-reading QoS 1 messages from D devices is published into it, then the
subscriber is started and its drain measured: rows per second between the first and the last row
seen committed (polled in the database), and the row count is checked at the end.

Everything listens on and connects to 127.0.0.1 only; every wait is bounded; the servers,
subscribers and temporary directories are removed on exit, Ctrl-C and SIGTERM included.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(HERE))

import psycopg  # noqa: E402
from ingest_bench import (  # noqa: E402
    SESSION_EXPIRY,
    Bench,
    Sizes,
    _count_subscriber,
    create_session,
    drop_session,
    machine,
    publish_backlog,
    run_child,
    verdict,
    wait_log,
)

from iothub.devtools.localservers import free_port  # noqa: E402

NODE_RED_VERSION = "4.1.15"
POSTGRES_NODE_VERSION = "0.2.0"
PG_OVERRIDE = "8.23.1"  # the node's own pg (~7.4) hangs on Node 20
MQ_BRIDGE_VERSION = "1.2.0"
MQ_BRIDGE_BATCH = 512
MQ_BRIDGE_QUEUE = 2 * MQ_BRIDGE_BATCH  # its default channel of 100 messages caps batches at 100
JOIN_COUNT = 100
JOIN_TIMEOUT_S = 1  # a join that waits longer for its 100 messages sends what it has

INSTALL_TIMEOUT = 600.0  # seconds for npm install or pip install
APT_TIMEOUT = 600.0  # seconds for apt-get, when Node.js is missing
START_TIMEOUT = 60.0  # seconds for a subscriber to connect and store its first row
DRAIN_TIMEOUT = 900.0  # seconds for a whole drain
STALL_TIMEOUT = 60.0  # seconds without a new row before a drain is declared stuck
POLL_S = 0.05  # seconds between polls of the database
STOP_TIMEOUT = 20.0  # seconds for a subscriber to exit after SIGTERM
ACK_SETTLE_S = 3.0  # seconds between the last row stored and the stop, for the last PUBACKs

TARGET_VS_MQ_BRIDGE = 1.5
TARGET_VS_NODE_RED_JOIN = 1.0
TARGET_VS_PAHO = 1.0

ALL = ("paho", "iothub", "mqbridge", "nodered", "nodered-join")

PEER_TABLE = """
CREATE TABLE IF NOT EXISTS peer_readings (
    id bigserial,
    device text NOT NULL,
    ts timestamptz NOT NULL,
    metrics jsonb NOT NULL,
    PRIMARY KEY (device, ts)
)
"""

DELIVERY = {
    "paho": "- (counts only, writes nothing)",
    "iothub": "ack after commit",
    "mqbridge": "ack after the write",
    "nodered": "acks before the write: loses messages on a crash or a database outage",
    "nodered-join": "acks before the write: loses messages on a crash or a database outage",
}

WRITES = {
    "paho": "nothing (counts the messages it receives)",
    "iothub": "telemetries: one row per reading (device_metric_id, ts, value_jsonb), after "
    "looking up the device and metric in the catalogue and validating the value",
    "mqbridge": "peer_readings (device, ts, metrics jsonb): one row per message, batches of "
    f"{MQ_BRIDGE_BATCH} as one multi-row INSERT ... ON CONFLICT (device, ts) DO UPDATE",
    "nodered": "peer_readings (device, ts, metrics jsonb): one INSERT ... ON CONFLICT DO NOTHING "
    "per message",
    "nodered-join": f"peer_readings (device, ts, metrics jsonb): one INSERT of {JOIN_COUNT} rows "
    "... ON CONFLICT DO NOTHING per join",
}

LABELS = {
    "paho": "bare paho subscriber, MQTT v5, counting only (one connection)",
    "iothub": "iothub run (defaults)",
    "mqbridge": f"mq-bridge {MQ_BRIDGE_VERSION} (MQTT v5, batches of {MQ_BRIDGE_BATCH}, "
    "multi-row INSERT ... ON CONFLICT)",
    "nodered": f"Node-RED {NODE_RED_VERSION}, mqtt in -> postgres-multi {POSTGRES_NODE_VERSION} "
    f"(pg {PG_OVERRIDE}), one INSERT per message",
    "nodered-join": f"Node-RED {NODE_RED_VERSION}, the same with a join node ({JOIN_COUNT} "
    "messages) and one multi-row INSERT",
}


# --- results


@dataclass
class Result:
    name: str
    rate: float | None = None  # rows/s (msg/s for paho)
    rows: int = 0
    expected: int = 0
    seconds: float = 0.0
    left_in_session: int | None = None
    note: str = ""

    @property
    def unit(self) -> str:
        return "msg/s" if self.name == "paho" else "rows/s"


def out(line: str = "") -> None:
    print(line, flush=True)


# --- installing the peers


@dataclass
class Installed:
    node: str | None = None  # the node binary
    node_red_dir: Path | None = None  # npm prefix holding node-red and the postgres node
    mq_python: Path | None = None  # python of the venv that holds mq-bridge
    versions: dict[str, str] = field(default_factory=dict)
    problems: dict[str, str] = field(default_factory=dict)


def _run(cmd: list[str], timeout: float, cwd: Path | None = None) -> tuple[int, str]:
    try:
        done = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout, cwd=cwd, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return -1, str(exc)
    return done.returncode, (done.stdout + done.stderr)[-2000:]


def ensure_node() -> tuple[str | None, str]:
    """The node and npm binaries, from Debian's packages when they are missing."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node and npm:
        return node, ""
    sudo = [] if os.geteuid() == 0 else ["sudo", "-n"]
    out("installing Node.js from Debian's packages (apt-get install nodejs npm)")
    code, text = _run([*sudo, "apt-get", "update", "-qq"], APT_TIMEOUT)
    if code == 0:
        env_cmd = [*sudo, "env", "DEBIAN_FRONTEND=noninteractive"]
        code, text = _run(
            [*env_cmd, "apt-get", "install", "-y", "-qq", "--no-install-recommends", "nodejs"]
            + ([] if npm else ["npm"]),
            APT_TIMEOUT,
        )
    node, npm = shutil.which("node"), shutil.which("npm")
    if node and npm:
        return node, ""
    return None, f"Node.js/npm not available and apt-get failed ({code}): {text.strip()[-300:]}"


def install_node_red(base: Path, found: Installed) -> None:
    node, problem = ensure_node()
    if node is None:
        found.problems["nodered"] = problem
        return
    found.node = node
    code, text = _run([node, "--version"], 30)
    found.versions["node"] = text.strip() if code == 0 else "unknown"
    prefix = base / "node-red"
    prefix.mkdir()
    package = {
        "name": "iothub-peer-node-red",
        "version": "0.0.0",
        "private": True,
        "dependencies": {
            "node-red": NODE_RED_VERSION,
            "node-red-contrib-postgres-multi": POSTGRES_NODE_VERSION,
        },
        "overrides": {"pg": PG_OVERRIDE},
    }
    (prefix / "package.json").write_text(json.dumps(package, indent=2))
    npm = shutil.which("npm") or "npm"
    out(
        f"installing Node-RED {NODE_RED_VERSION} + node-red-contrib-postgres-multi "
        f"{POSTGRES_NODE_VERSION} (pg overridden to {PG_OVERRIDE}) from npm"
    )
    code, text = _run(
        [npm, "install", "--no-audit", "--no-fund", "--loglevel=error"],
        INSTALL_TIMEOUT,
        cwd=prefix,
    )
    if code != 0:
        found.problems["nodered"] = f"npm install failed ({code}): {text.strip()[-400:]}"
        return
    for pkg in ("node-red", "node-red-contrib-postgres-multi", "pg"):
        try:
            manifest = json.loads((prefix / "node_modules" / pkg / "package.json").read_text())
            found.versions[pkg] = str(manifest["version"])
        except (OSError, ValueError, KeyError):
            found.problems["nodered"] = f"npm install left no {pkg}"
            return
    found.node_red_dir = prefix


def install_mq_bridge(base: Path, found: Installed) -> None:
    venv = base / "mq-bridge-venv"
    out(f"installing mq-bridge {MQ_BRIDGE_VERSION} from PyPI into a temporary venv")
    code, text = _run([sys.executable, "-m", "venv", str(venv)], 120)
    python = venv / "bin" / "python"
    if code == 0:
        code, text = _run(
            [
                str(python),
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                f"mq-bridge=={MQ_BRIDGE_VERSION}",
            ],
            INSTALL_TIMEOUT,
        )
    if code != 0:
        found.problems["mqbridge"] = f"pip install failed ({code}): {text.strip()[-400:]}"
        return
    found.mq_python = python
    found.versions["mq-bridge"] = MQ_BRIDGE_VERSION


# --- the peers' configurations

MQ_BRIDGE_RUNNER = """
import json, os, signal, sys, threading, time
import mq_bridge

config = json.loads(sys.argv[1])
route = mq_bridge.Route.from_config(config)
stop = threading.Event()
signal.signal(signal.SIGTERM, lambda *a: stop.set())
route.start()
print("route started", flush=True)
while not stop.wait(0.5):
    pass
t0 = time.monotonic()
print("SIGTERM: stopping the route", flush=True)
route.stop()
print(f"route stopped after {time.monotonic() - t0:.1f}s", flush=True)
route.join()
print(f"route joined after {time.monotonic() - t0:.1f}s", flush=True)
os._exit(0)  # the route is down; the interpreter's exit can wait on the Rust runtime's threads
"""


def mq_bridge_config(broker_port: int, dsn: str, topic: str, client_id: str) -> dict[str, Any]:
    return {
        "batch_size": MQ_BRIDGE_BATCH,
        "input": {
            "mqtt": {
                "url": f"tcp://127.0.0.1:{broker_port}",
                "topic": topic,
                "client_id": client_id,
                "protocol": "v5",
                "qos": 1,
                "clean_session": False,
                "session_expiry_interval": SESSION_EXPIRY,
                "delayed_ack": False,  # acknowledge after the write
                "queue_capacity": MQ_BRIDGE_QUEUE,
            }
        },
        "output": {
            "sqlx": {
                "url": dsn,
                "table": "peer_readings",
                "columns": "auto",
                "key": "device,ts",
            }
        },
    }


def node_red_flow(
    broker_port: int, pg_port: int, topic: str, client_id: str, *, join: bool
) -> list[dict[str, Any]]:
    """mqtt in (v5, persistent session, QoS 1) -> [join] -> function -> postgres-multi."""
    tab = "tab-peers"
    one = (
        "const p = msg.payload;\n"
        "msg.payload = [{query: 'INSERT INTO peer_readings (device, ts, metrics) VALUES "
        "($1, $2, $3) ON CONFLICT DO NOTHING', params: [p.device, p.ts, "
        "JSON.stringify(p.metrics)]}];\n"
        "return msg;"
    )
    many = (
        "const rows = msg.payload, params = [], values = [];\n"
        "for (let i = 0; i < rows.length; i++) {\n"
        "  values.push('($' + (3 * i + 1) + ', $' + (3 * i + 2) + ', $' + (3 * i + 3) + ')');\n"
        "  params.push(rows[i].device, rows[i].ts, JSON.stringify(rows[i].metrics));\n"
        "}\n"
        "msg.payload = [{query: 'INSERT INTO peer_readings (device, ts, metrics) VALUES ' + "
        "values.join(', ') + ' ON CONFLICT DO NOTHING', params: params}];\n"
        "return msg;"
    )
    nodes: list[dict[str, Any]] = [
        {"id": tab, "type": "tab", "label": "peers"},
        {
            "id": "cfg-broker",
            "type": "mqtt-broker",
            "name": "mosquitto",
            "broker": "127.0.0.1",
            "port": str(broker_port),
            "clientid": client_id,
            "autoConnect": True,
            "usetls": False,
            "protocolVersion": "5",
            "keepalive": "60",
            "cleansession": False,
            "sessionExpiry": str(SESSION_EXPIRY),
            "autoUnsubscribe": False,
        },
        {
            "id": "cfg-db",
            "type": "postgresdb",
            "hostname": "127.0.0.1",
            "port": str(pg_port),
            "db": "iothub",
            "ssl": False,
        },
        {
            "id": "node-in",
            "type": "mqtt in",
            "z": tab,
            "topic": topic,
            "qos": "1",
            "datatype": "json",
            "broker": "cfg-broker",
            "nl": False,
            "rap": True,
            "rh": 0,
            "inputs": 0,
            "wires": [["node-join" if join else "node-sql"]],
        },
        {
            "id": "node-sql",
            "type": "function",
            "z": tab,
            "func": many if join else one,
            "outputs": 1,
            "wires": [["node-pg"]],
        },
        {
            "id": "node-pg",
            "type": "postgres",
            "z": tab,
            "postgresdb": "cfg-db",
            "output": False,
            "outputs": 0,
            "wires": [],
        },
    ]
    if join:
        nodes.append(
            {
                "id": "node-join",
                "type": "join",
                "z": tab,
                "mode": "custom",
                "build": "array",
                "property": "payload",
                "propertyType": "msg",
                "key": "topic",
                "joiner": "\\n",
                "joinerType": "str",
                "accumulate": False,
                "timeout": str(JOIN_TIMEOUT_S),
                "count": str(JOIN_COUNT),
                "reduceRight": False,
                "wires": [["node-sql"]],
            }
        )
    return nodes


NODE_RED_SETTINGS = """module.exports = {{
    uiHost: "127.0.0.1",
    uiPort: {port},
    flowFile: "flows.json",
    credentialSecret: false,
    httpAdminRoot: "/admin",
    disableEditor: true,
    diagnostics: {{ enabled: false }},
    telemetry: {{ enabled: false, updateNotification: false }},
    logging: {{ console: {{ level: "warn", metrics: false, audit: false }} }},
    externalModules: {{ autoInstall: false, palette: {{ allowInstall: false }} }},
}};
"""


# --- the run


class PeerBench:
    def __init__(
        self, sizes: Sizes, workdir: Path, found: Installed, workers: int | None = None
    ) -> None:
        self.sizes = sizes
        self.workers = workers
        self.workdir = workdir
        self.found = found
        self.bench = Bench(sizes, workdir, {})
        self.children: list[subprocess.Popen[bytes]] = []

    @property
    def dsn(self) -> str:
        return self.bench.dsn

    @property
    def port(self) -> int:
        return self.bench.broker.port

    def start(self) -> None:
        # Bench.start: PostgreSQL with fsync, full_page_writes and synchronous_commit on, the
        # project's migrations, a Mosquitto with unlimited queues, the devices and metrics.
        self.bench.start()
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            conn.execute(PEER_TABLE)
            row = conn.execute("SHOW fsync").fetchone()
            if not row or row[0] != "on":
                raise RuntimeError("PostgreSQL does not run with fsync on")

    def stop(self) -> None:
        for proc in self.children:
            with contextlib.suppress(Exception):
                self.stop_child(proc)
        self.bench.stop()

    def stop_child(self, proc: subprocess.Popen[bytes]) -> int:
        """SIGTERM, then SIGKILL after STOP_TIMEOUT; to the whole group of a subscriber that
        was started in a session of its own (Node-RED, mq-bridge), else to the process."""
        if proc.poll() is None:
            signal_child(proc, signal.SIGTERM)
            try:
                proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                signal_child(proc, signal.SIGKILL)
                proc.wait(10)
        return int(proc.returncode)

    def spawn(self, name: str, cmd: list[str], **kw: Any) -> tuple[subprocess.Popen[bytes], Path]:
        log = self.workdir / f"{name}.log"
        with log.open("ab") as fh:
            # A session of its own: a Ctrl-C reaches only us, and we stop it (and its children).
            proc = subprocess.Popen(
                cmd, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True, **kw
            )
        self.children.append(proc)
        return proc, log

    def reset(self) -> None:
        self.bench.reset_tables()
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            conn.execute("TRUNCATE peer_readings RESTART IDENTITY")
            conn.execute("CHECKPOINT")

    def backlog(self, client_id: str) -> str:
        """A fresh topic prefix, a persistent session for client_id subscribed to it, and the
        backlog queued in that session; returns the topic filter."""
        prefix = self.bench.next_prefix()
        topic = f"{prefix}/devices/+/telemetry"
        create_session(self.port, client_id, topic)
        seconds = publish_backlog(self.port, prefix, self.sizes.devices, 1, self.sizes.messages)
        out(f"  backlog of {self.sizes.messages:,} messages queued in {seconds:.1f}s")
        return topic

    # paho
    def paho(self) -> Result:
        client_id = "peers-paho"
        self.backlog(client_id)
        n = self.sizes.messages
        count, seconds, _cpu = run_child(
            _count_subscriber, self.port, client_id, n, timeout=DRAIN_TIMEOUT
        )
        # It disconnects from within its last callback, before that message's PUBACK: what
        # the session still holds says nothing here.
        drop_session(self.port, client_id)
        return Result(
            "paho", rate=count / max(seconds, 1e-9), rows=count + 1, expected=n, seconds=seconds
        )

    # iothub
    def iothub(self) -> Result:
        self.reset()
        client_id = "peers-iothub"
        prefix = self.bench.next_prefix()
        create_session(self.port, client_id, f"{prefix}/devices/+/telemetry")
        seconds = publish_backlog(self.port, prefix, self.sizes.devices, 1, self.sizes.messages)
        out(f"  backlog of {self.sizes.messages:,} messages queued in {seconds:.1f}s")
        extra = {} if self.workers is None else {"IOTHUB_WORKERS": str(self.workers)}
        proc = self.bench.start_daemon("peers", prefix, client_id, extra)
        self.children.append(proc)
        return self.drain("iothub", proc, client_id, "telemetries", self.bench.log_of("peers"))

    # mq-bridge
    def mqbridge(self) -> Result:
        python = self.found.mq_python
        if python is None:
            return Result("mqbridge", note=self.found.problems.get("mqbridge", "not installed"))
        self.reset()
        client_id = "peers-mqbridge"
        topic = self.backlog(client_id)
        config = mq_bridge_config(self.port, self.dsn, topic, client_id)
        proc, log = self.spawn(
            "mqbridge", [str(python), "-c", MQ_BRIDGE_RUNNER, json.dumps(config)], cwd=self.workdir
        )
        return self.drain("mqbridge", proc, client_id, "peer_readings", log)

    # Node-RED
    def nodered(self, join: bool) -> Result:
        name = "nodered-join" if join else "nodered"
        prefix_dir, node = self.found.node_red_dir, self.found.node
        if prefix_dir is None or node is None:
            return Result(name, note=self.found.problems.get("nodered", "not installed"))
        self.reset()
        client_id = f"peers-{name}"
        topic = self.backlog(client_id)
        user_dir = self.workdir / name
        user_dir.mkdir()
        # userDir's node_modules is where Node-RED looks for nodes: the npm install's.
        (user_dir / "node_modules").symlink_to(prefix_dir / "node_modules")
        flow = node_red_flow(self.port, self.bench.pg.port, topic, client_id, join=join)
        (user_dir / "flows.json").write_text(json.dumps(flow, indent=1))
        http_port = free_port()
        (user_dir / "settings.js").write_text(NODE_RED_SETTINGS.format(port=http_port))
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env["PGUSER"] = "postgres"  # the postgresdb node has no credentials: pg reads PGUSER
        red = prefix_dir / "node_modules" / "node-red" / "red.js"
        proc, log = self.spawn(
            name,
            [
                node,
                str(red),
                "--userDir",
                str(user_dir),
                "--settings",
                str(user_dir / "settings.js"),
            ],
            env=env,
            cwd=user_dir,
        )
        return self.drain(name, proc, client_id, "peer_readings", log)

    def drain(
        self,
        name: str,
        proc: subprocess.Popen[bytes],
        client_id: str,
        table: str,
        log: Path,
    ) -> Result:
        expected = self.sizes.messages
        try:
            if name == "iothub":
                wait_log(log, "service_ready", proc)
            first_rows, seen_at, done_at, stored = self.watch(proc, table, expected, log)
            time.sleep(ACK_SETTLE_S)
        except RuntimeError as exc:
            return Result(name, expected=expected, note=f"{exc}; log: {tail(log)}")
        finally:
            code = self.stop_child(proc)
        left = drop_session(self.port, client_id, settle=1.0)
        rate = (stored - first_rows) / max(done_at - seen_at, POLL_S)
        note = "" if code in (0, -signal.SIGTERM, 128 + signal.SIGTERM) else f"exit {code}"
        return Result(
            name,
            rate=rate,
            rows=self.count(table),
            expected=expected,
            seconds=done_at - seen_at,
            left_in_session=left,
            note=note,
        )

    def count(self, table: str) -> int:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            row = conn.execute(f"SELECT count(*) FROM {table}").fetchone()
            return int(row[0]) if row else 0

    def watch(
        self, proc: subprocess.Popen[bytes], table: str, expected: int, log: Path
    ) -> tuple[int, float, float, int]:
        """Poll until `expected` rows are committed: (rows at first sight, first seen, done,
        rows). Progress is read from the ids (two index probes, cheap against a growing table);
        done is confirmed with count(*), since concurrent writers may commit ids out of order."""
        started = time.monotonic()
        first_id: int | None = None
        first_rows, seen_at = 0, started
        last_progress, last_rows = started, -1
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            while True:
                now = time.monotonic()
                if proc.poll() is not None:
                    raise RuntimeError(f"the subscriber exited early ({proc.returncode})")
                if first_id is None and now - started > START_TIMEOUT:
                    raise RuntimeError(f"no row stored {START_TIMEOUT:g}s after the start")
                if now - started > DRAIN_TIMEOUT:
                    raise RuntimeError(f"the drain did not finish in {DRAIN_TIMEOUT:g}s")
                if now - last_progress > STALL_TIMEOUT:
                    raise RuntimeError(
                        f"no new row for {STALL_TIMEOUT:g}s ({last_rows:,} of {expected:,})"
                    )
                row = conn.execute(f"SELECT min(id), max(id) FROM {table}").fetchone()
                now = time.monotonic()
                if row and row[1] is not None:
                    if first_id is None:
                        first_id = int(row[0])
                        first_rows = self.count(table)
                        if first_rows < expected:  # else all came in one poll: from the start
                            seen_at = now
                        else:
                            first_rows = 0
                    rows = int(row[1]) - first_id + 1
                    if rows != last_rows:
                        last_rows, last_progress = rows, now
                    if rows >= expected:
                        counted = conn.execute(f"SELECT count(*) FROM {table}").fetchone()
                        stored = int(counted[0]) if counted else 0
                        if stored >= expected:
                            return first_rows, seen_at, time.monotonic(), stored
                time.sleep(POLL_S)


def signal_child(proc: subprocess.Popen[bytes], sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        if os.getpgid(proc.pid) == proc.pid:
            os.killpg(proc.pid, sig)
        else:
            proc.send_signal(sig)


def tail(path: Path, chars: int = 600) -> str:
    try:
        return path.read_text(errors="replace")[-chars:].strip().replace("\n", " | ")
    except OSError:
        return "(no log)"


# --- the report


def fmt_rate(result: Result) -> str:
    if result.rate is None:
        return "not measured"
    return f"{result.rate:,.0f} {result.unit}"


def report(results: dict[str, Result], sizes: Sizes) -> None:
    out()
    out(
        f"## Peers, same servers: {sizes.messages:,} one-reading QoS 1 messages from "
        f"{sizes.devices:,} devices, each drained from a persistent session"
    )
    out()
    out("| subscriber | rate | rows stored | left in session | delivery |")
    out("|---|---|---|---|---|")
    for name in ALL:
        if name not in results:
            continue
        r = results[name]
        stored = f"{r.rows:,} of {r.expected:,}" if r.rate is not None else "-"
        left = "-" if r.left_in_session is None else f"{r.left_in_session:,}"
        out(f"| {LABELS[name]} | {fmt_rate(r)} | {stored} | {left} | {DELIVERY[name]} |")
    out()
    for name in ALL:
        if name in results and results[name].note:
            out(f"note, {name}: {results[name].note}")
        if name in results and results[name].rate is not None:
            r = results[name]
            if name != "paho" and r.rows != r.expected:
                out(f"ROW COUNT WRONG, {name}: {r.rows:,} stored, {r.expected:,} expected")
    out()
    iot = results.get("iothub")
    targets = (
        ("mqbridge", TARGET_VS_MQ_BRIDGE),
        ("nodered-join", TARGET_VS_NODE_RED_JOIN),
        ("paho", TARGET_VS_PAHO),
    )
    out("| ratio | value | target | verdict |")
    out("|---|---|---|---|")
    for name, target in targets:
        peer = results.get(name)
        label = f"iothub / {name}"
        if iot is None or iot.rate is None or peer is None or peer.rate is None:
            out(f"| {label} | not measured | >= {target:g} x | - |")
            continue
        ratio = iot.rate / peer.rate
        out(f"| {label} | {ratio:.2f} x | >= {target:g} x | {verdict(ratio >= target)} |")
    if iot is not None and iot.rate is not None and "nodered" in results:
        peer = results["nodered"]
        if peer.rate is not None:
            out(f"| iothub / nodered | {iot.rate / peer.rate:.2f} x | (no target) | - |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=200_000, help="backlog per subscriber")
    parser.add_argument("--devices", type=int, default=100, help="devices in the fleet")
    parser.add_argument(
        "--only",
        default=",".join(ALL),
        help=f"comma-separated subscribers to run, of: {', '.join(ALL)}",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        help="IOTHUB_WORKERS for iothub run (default: the daemon's own default)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs)")
    args = parser.parse_args(argv)
    if args.workers is not None:
        LABELS["iothub"] = f"iothub run (workers {args.workers}, other settings default)"
    only = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = sorted(set(only) - set(ALL))
    if unknown:
        parser.error(f"unknown subscriber(s): {', '.join(unknown)}")
    sizes = Sizes(
        devices=args.devices,
        messages=args.messages,
        messages_c10=args.messages,
        messages_scaling=args.messages,
        naive_seconds=0.0,
        naive_messages=0,
        latency_seconds=0.0,
    )

    # A SIGTERM (a CI timeout) must still stop the servers: pg_ctl detaches PostgreSQL.
    signal.signal(signal.SIGTERM, lambda *a: sys.exit(128 + signal.SIGTERM))
    workdir = Path(tempfile.mkdtemp(prefix="iothub-peers-"))
    found = Installed()
    peers: PeerBench | None = None
    results: dict[str, Result] = {}
    try:
        for line in machine():
            out(line)
        out(f"date: {datetime.now(UTC).isoformat(timespec='seconds')}")
        out(f"sizes: {sizes.messages:,} messages, {sizes.devices:,} devices, 1 reading each")
        if any(name.startswith("nodered") for name in only):
            install_node_red(workdir, found)
        if "mqbridge" in only:
            install_mq_bridge(workdir, found)
        for name, problem in found.problems.items():
            out(f"PEER NOT INSTALLED, {name}: {problem}")
        if found.versions:
            out("peer versions: " + ", ".join(f"{k} {v}" for k, v in found.versions.items()))
        out(f"iothub {metadata.version('iothub')}")
        peers = PeerBench(sizes, workdir, found, workers=args.workers)
        peers.start()
        out(
            f"servers: PostgreSQL on 127.0.0.1:{peers.bench.pg.port} (fsync, full_page_writes, "
            f"synchronous_commit on), Mosquitto on 127.0.0.1:{peers.port} (unlimited queues)"
        )
        out("what each writes:")
        for name in only:
            out(f"  {name}: {WRITES[name]}")
        bench = peers
        runs: dict[str, Callable[[], Result]] = {
            "paho": bench.paho,
            "iothub": bench.iothub,
            "mqbridge": bench.mqbridge,
            "nodered": lambda: bench.nodered(join=False),
            "nodered-join": lambda: bench.nodered(join=True),
        }
        for name in ALL:
            if name not in only:
                continue
            out(f"{name}: {LABELS[name]}")
            result = runs[name]()
            results[name] = result
            out(f"  {fmt_rate(result)}" + (f" ({result.note})" if result.note else ""))
        report(results, sizes)
        out()
        out(
            "figures from one run; on a small machine shared with other work they are noisy: "
            "compare ratios of the same run, not figures across runs"
        )
    finally:
        if peers is not None:
            peers.stop()
        if args.keep:
            out(f"work directory kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    failed = [
        n for n, r in results.items() if r.rate is not None and n != "paho" and r.rows != r.expected
    ]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
