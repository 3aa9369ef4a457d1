"""Ingestion benchmark: how fast `iothub run` stores and acknowledges telemetry, against the
ceilings and baselines it should be judged by, all measured in one run on one machine.

    .venv/bin/python bench/ingest_bench.py            # full run, a few minutes
    .venv/bin/python bench/ingest_bench.py --quick    # smoke run, under a minute

It starts its own throwaway PostgreSQL and Mosquitto (installed binaries, free ports, temporary
directories) and never touches another server. Figures:

(a)   receive ceiling: a paho QoS 1 subscriber that only counts, draining a backlog;
(b)   naive subscriber: one INSERT and one COMMIT per message (paho acknowledges after it);
(c1)  `iothub run` draining the same backlog, one reading per message (publish -> committed ->
      acknowledged), and the daemon's peak RSS (VmHWM) over that drain;
(c10) the same with 10 readings per message;
rules the c10 workload with 5 active rules on every device_metric, against (c10);
lat   publish -> commit latency with devices publishing live at half the (c1) rate.

Throughput runs drain a backlog: the consumer's persistent session is created first (clean
start off, session expiry set, subscribed), it goes offline, the backlog is published into the
broker from separate processes, and only then is the consumer started and its drain timed, so
that the publisher's speed cannot limit what is measured. Drain rates are taken between the
first and the last commit seen by a poller (every POLL_S), so process start-up is not counted.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import psycopg  # noqa: E402
from mqtt_wire import WirePublisher  # noqa: E402
from paho_api import CallbackAPIVersion, PacketTypes, Properties, assert_bare  # noqa: E402
from paho_api import client as mqtt  # noqa: E402

from schema import migrate  # noqa: E402

try:  # the throwaway servers are moving from the test support package into iothub
    from iothub.devtools.localservers import LocalMosquitto, LocalPostgres
except ImportError:
    from tests.support.services import LocalMosquitto, LocalPostgres

POLL_S = 0.02  # seconds between commit-visibility polls
COUNT_EVERY_S = 0.5  # seconds between count(*) checks of a drain's end
LATENCY_POLL_S = 0.01  # seconds between polls in the latency run (its resolution)
LATENCY_WARMUP_S = 1.0  # seconds of the latency run not counted (connections, caches)
SESSION_EXPIRY = 3600  # seconds: the benchmark's sessions outlive nothing else
METRICS_PER_DEVICE = 10
RULES_PER_BINDING = 5
DRAIN_TIMEOUT = 1800.0  # seconds
READY_TIMEOUT = 60.0  # seconds

TARGET_VS_CEILING = 0.8
TARGET_VS_NAIVE = 10.0
TARGET_ROWS_C10 = 100_000  # rows/s
TARGET_C10_VS_CEILING = 3.0  # (c10) rows/s against (a) msg/s of the same run (issue 14)
TARGET_P99 = 1.0  # seconds
TARGET_RSS_MB = 250.0
TARGET_RULES_COST = 0.15

# PostgreSQL: durable commits (fsync and synchronous_commit on, as in production); room for the
# WAL of a run so that no checkpoint lands in the middle of a measurement.
PG_SETTINGS = [
    "fsync = on",
    "full_page_writes = on",
    "synchronous_commit = on",
    "shared_buffers = 512MB",
    "wal_buffers = 16MB",
    "max_wal_size = 8GB",
    "checkpoint_timeout = 30min",
]

# Mosquitto: unlimited queues so that a million-message backlog waits for the offline session;
# persistence off (the broker is not restarted during the run, and a periodic save of a
# million queued messages would measure the broker's disk, not us).
MOSQUITTO_CONF = """listener {port} 127.0.0.1
allow_anonymous true
persistence false
max_queued_messages 0
max_queued_bytes 0
max_inflight_messages 0
memory_limit 0
log_type error
log_type warning
log_dest stderr
"""

RULES = [
    {"type": "threshold", "operator": ">", "value": 1000},
    {"type": "threshold", "operator": "<", "value": -1000, "duration_minutes": 5},
    {"type": "range", "operator": "outside", "min": -500, "max": 500},
    {"type": "delta", "operator": ">", "value": 1000, "absolute": True},
    {"type": "threshold", "operator": ">=", "value": 999, "cooldown_minutes": 10},
]
RULE_ACTION = {"type": "notify", "channel": "log", "message": "{device_name}: {value}"}


@dataclass(frozen=True)
class Sizes:
    devices: int
    messages: int  # backlog of (a) and (c1); the RSS figure is taken over its drain
    messages_c10: int  # backlog of (c10) and of the rules run
    messages_scaling: int  # backlog of each run of the scaling table (workers 1, 2, ...)
    naive_seconds: float
    naive_messages: int
    latency_seconds: float


FULL = Sizes(
    devices=100,
    messages=1_000_000,
    messages_c10=100_000,
    messages_scaling=200_000,
    naive_seconds=15.0,
    naive_messages=60_000,
    latency_seconds=30.0,
)
QUICK = Sizes(
    devices=20,
    messages=20_000,
    messages_c10=12_000,
    messages_scaling=20_000,
    naive_seconds=2.0,
    naive_messages=3_000,
    latency_seconds=3.0,
)


# --- the workload


def serial(i: int) -> str:
    return f"bench-{i:05d}"


def topic_for(prefix: str, device: int) -> bytes:
    return f"{prefix}/devices/{serial(device)}/telemetry".encode()


def backlog_items(
    prefix: str, devices: int, readings: int, *, n: int, part: int, parts: int, base: float
) -> Iterator[tuple[bytes, bytes]]:
    """This publisher's share of messages 0..n-1: message i is device i % devices' (i //
    devices)-th, 10 ms of device time after its previous one. A device belongs to one publisher
    (device % parts == part), so its messages reach the broker in device-time order, as a real
    device's do; splitting by message ranges instead made half of a device's readings arrive
    after newer ones (late, for the rule engine)."""
    topics = [topic_for(prefix, d) for d in range(devices)]
    for i in range(n):
        device, seq = i % devices, i // devices
        if device % parts != part:
            continue
        ts = datetime.fromtimestamp(base + seq * 0.01, UTC).isoformat(timespec="milliseconds")
        value = 20 + (i % 1000) / 100
        metrics = ",".join(f'"m{k}":{value + k}' for k in range(readings))
        body = f'{{"device":"{serial(device)}","ts":"{ts}","metrics":{{{metrics}}}}}'
        yield topics[device], body.encode()


def _publish_part(
    port: int,
    prefix: str,
    devices: int,
    readings: int,
    *,
    n: int,
    part: int,
    parts: int,
    base: float,
) -> None:
    pub = WirePublisher("127.0.0.1", port, f"bench-pub-{prefix}-{part}")
    items = backlog_items(prefix, devices, readings, n=n, part=part, parts=parts, base=base)
    acked = pub.publish_all(items)
    pub.close()
    expected = sum(1 for i in range(n) if (i % devices) % parts == part)
    if acked != expected:
        raise SystemExit(f"publisher {part}: {acked} of {expected} acknowledged")


def publish_backlog(port: int, prefix: str, devices: int, readings: int, n: int) -> float:
    """Load n messages into the broker from two processes; returns the seconds it took."""
    base = time.time() - 3600 - n / devices * 0.01  # all in the past, none older than 7 days
    parts = 2
    started = time.monotonic()
    procs = [
        mp.Process(
            target=_publish_part,
            args=(port, prefix, devices, readings),
            kwargs={"n": n, "part": k, "parts": parts, "base": base},
        )
        for k in range(parts)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
        if p.exitcode != 0:
            raise RuntimeError(f"backlog publisher failed ({p.exitcode})")
    return time.monotonic() - started


def _publish_live(port: int, prefix: str, devices: int, rate: float, seconds: float) -> None:
    topics = [topic_for(prefix, d) for d in range(devices)]

    def make(i: int, _now: float) -> tuple[bytes, bytes]:
        device = i % devices
        # The device time is the moment of sending: what the latency is measured from.
        ts = datetime.fromtimestamp(time.time(), UTC).isoformat()
        body = f'{{"device":"{serial(device)}","ts":"{ts}","metrics":{{"m0":{20 + i % 100}}}}}'
        return topics[device], body.encode()

    pub = WirePublisher("127.0.0.1", port, f"bench-live-{prefix}")
    pub.publish_paced(rate, seconds, make)
    pub.close()


# --- MQTT sessions


def _v5_client(port: int, client_id: str) -> mqtt.Client:
    return mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)


def _connect(client: mqtt.Client, port: int, clean: bool, expiry: int) -> None:
    props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    props.SessionExpiryInterval = expiry
    client.connect("127.0.0.1", port, clean_start=clean, properties=props)


def create_session(port: int, client_id: str, topic_filter: str) -> None:
    """A persistent session subscribed at QoS 1, left offline so that messages queue for it."""
    client = _v5_client(port, client_id)
    done = threading.Event()
    client.on_subscribe = lambda *a: done.set()
    client.on_connect = lambda c, *a: c.subscribe(topic_filter, qos=1)
    _connect(client, port, clean=True, expiry=SESSION_EXPIRY)
    client.loop_start()
    if not done.wait(10):
        raise RuntimeError("no SUBACK")
    client.disconnect()
    client.loop_stop()


def drop_session(port: int, client_id: str, settle: float = 0.0) -> int:
    """Count what the broker still holds for the session (left unacknowledged), then delete it."""
    client = _v5_client(port, client_id)
    got = {"n": 0}
    client.on_message = lambda *a: got.__setitem__("n", got["n"] + 1)
    _connect(client, port, clean=False, expiry=0)
    client.loop_start()
    time.sleep(settle)
    client.disconnect()
    client.loop_stop()
    return got["n"]


# --- (a) and (b): the subscribers iothub is compared with, each in a process of its own


def _count_subscriber(port: int, client_id: str, n: int, v311: bool = False, *, out: Any) -> None:
    """Counts, and acknowledges each message when its callback returns (paho's default)."""
    assert_bare()
    if v311:
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=mqtt.MQTTv311,
            clean_session=False,
        )
    else:
        client = _v5_client(port, client_id)
    state = {"n": 0, "first": 0.0, "cpu": 0.0}

    def on_message(c: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        state["n"] += 1
        if state["n"] == 1:
            state["first"] = time.monotonic()
            state["cpu"] = time.process_time()
        if state["n"] >= n:
            cpu = time.process_time() - state["cpu"]
            out.put((state["n"] - 1, time.monotonic() - state["first"], cpu))
            c.disconnect()

    client.on_message = on_message
    if v311:
        client.connect("127.0.0.1", port)
    else:
        _connect(client, port, clean=False, expiry=SESSION_EXPIRY)
    client.loop_forever()


def _naive_subscriber(
    port: int,
    client_id: str,
    db: tuple[str, dict[str, int]],
    limits: tuple[int, float],
    *,
    out: Any,
) -> None:
    dsn, bindings = db
    n, seconds = limits
    conn = psycopg.connect(dsn, autocommit=True)  # every statement is its own transaction
    client = _v5_client(port, client_id)
    state = {"n": 0, "first": 0.0}

    def on_message(c: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        doc = json.loads(msg.payload)
        for metric, value in doc["metrics"].items():
            conn.execute(
                "INSERT INTO telemetries (device_metric_id, ts, value_jsonb) VALUES (%s, %s, %s) "
                "ON CONFLICT (device_metric_id, ts) DO NOTHING",
                (
                    bindings[f"{doc['device']}/{metric}"],
                    datetime.fromisoformat(doc["ts"]),
                    json.dumps({"t": "numeric", "v": value}),
                ),
            )
        state["n"] += 1  # paho acknowledges when this callback returns: after the commit
        if state["n"] == 1:
            state["first"] = time.monotonic()
        elapsed = time.monotonic() - state["first"]
        if elapsed >= seconds or state["n"] >= n:
            out.put((state["n"] - 1, elapsed))
            c.disconnect()

    client.on_message = on_message
    _connect(client, port, clean=False, expiry=SESSION_EXPIRY)
    client.loop_forever()


def run_child(target: Callable[..., None], *args: Any, timeout: float) -> tuple[int, float, float]:
    """Runs a subscriber in a process of its own: (messages, seconds, CPU seconds of the
    process over them, 0 where the subscriber does not measure it)."""
    out: Any = mp.Queue()
    proc = mp.Process(target=target, args=args, kwargs={"out": out})
    proc.start()
    try:
        got = out.get(timeout=timeout)
    finally:
        proc.join(10)
        if proc.is_alive():
            proc.kill()
    return int(got[0]), float(got[1]), float(got[2]) if len(got) > 2 else 0.0


# --- the bench


@dataclass
class Drain:
    messages_per_s: float
    rows_per_s: float
    rows: int
    seconds: float
    peak_rss_mb: float
    redelivered: int
    batches: int  # transactions that stored the drain (rows share created_at = now())
    workers: int = 1
    cpu_receiver: float = 0.0  # CPU seconds per 100,000 readings: the process with the connection
    cpu_workers: float = 0.0  # the same, all worker processes together (0 with workers = 1)


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process from /proc/<pid>/stat, in seconds (0 once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    # After the command: state is field 3, utime 14 and stime 15 (1-based, man proc).
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def worker_pids(pid: int) -> list[int]:
    """The daemon's worker processes: its children started by multiprocessing's spawn (not the
    resource tracker)."""
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return []
    found = []
    for child in children:
        try:
            cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
        except OSError:
            continue
        if b"spawn_main" in cmdline and b"resource_tracker" not in cmdline:
            found.append(int(child))
    return found


@dataclass
class CpuMark:
    receiver: float
    workers: float

    @classmethod
    def take(cls, pid: int) -> CpuMark:
        return cls(cpu_seconds(pid), sum(cpu_seconds(w) for w in worker_pids(pid)))


@dataclass
class Watched:
    figures: tuple[float, int, float, float, float]
    first: CpuMark
    last: CpuMark
    workers: list[int]

    def cpu_per_100k(self, readings: int) -> tuple[float, float]:
        """CPU seconds per 100,000 readings between the marks: (receiver, workers)."""
        per = 100_000 / max(readings, 1)
        return (
            (self.last.receiver - self.first.receiver) * per,
            (self.last.workers - self.first.workers) * per,
        )


class Bench:
    def __init__(self, sizes: Sizes, workdir: Path, daemon_env: dict[str, str]) -> None:
        self.sizes = sizes
        self.workdir = workdir
        self.daemon_env = daemon_env
        self.pg = LocalPostgres(Path(tempfile.mkdtemp(prefix="iothub-bench-pg-")))
        self.broker = LocalMosquitto(workdir / "mosquitto")
        self.runs = 0
        self.bindings: dict[str, int] = {}

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.pg.port}/iothub"

    def start(self) -> None:
        self.pg.init()
        with (self.pg.data / "postgresql.conf").open("a") as fh:
            fh.write("\n# ingest_bench\n" + "\n".join(PG_SETTINGS) + "\n")
        self.pg.start()
        with psycopg.connect(self.pg.admin_dsn, autocommit=True) as admin:
            admin.execute("CREATE DATABASE iothub")
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            migrate.migrate(conn)
        conf = MOSQUITTO_CONF.format(port=self.broker.port)
        if os.geteuid() == 0:
            conf += "user root\n"
        self.broker.conf.write_text(conf)
        self.broker.start()
        self.make_fleet()

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self.broker.destroy()
        with contextlib.suppress(Exception):
            self.pg.destroy()

    def make_fleet(self) -> None:
        n = self.sizes.devices
        with psycopg.connect(self.dsn, autocommit=True) as conn, conn.transaction():
            conn.execute(
                "INSERT INTO metrics (metric_type, data_type) "
                "SELECT 'm' || k, 'numeric' FROM generate_series(0, %s) k",
                (METRICS_PER_DEVICE - 1,),
            )
            conn.execute(
                "INSERT INTO devices (serial_id, name, is_active) "
                "SELECT 'bench-' || lpad(i::text, 5, '0'), 'Bench device ' || i, true "
                "FROM generate_series(0, %s) i",
                (n - 1,),
            )
            conn.execute(
                "INSERT INTO device_metrics (device_id, metric_id) "
                "SELECT d.id, m.id FROM devices d CROSS JOIN metrics m"
            )
            rows = conn.execute(
                "SELECT d.serial_id || '/' || m.metric_type, dm.id FROM device_metrics dm "
                "JOIN devices d ON d.id = dm.device_id JOIN metrics m ON m.id = dm.metric_id"
            ).fetchall()
        self.bindings = {key: dm for key, dm in rows}

    def set_rules(self, on: bool) -> int:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            conn.execute("DELETE FROM rules")
            if on:
                for k, condition in enumerate(RULES):
                    conn.execute(
                        "INSERT INTO rules (name, condition, action, is_active, device_metric_id) "
                        "SELECT %s, %s, %s, true, id FROM device_metrics",
                        (f"bench rule {k}", json.dumps(condition), json.dumps(RULE_ACTION)),
                    )
            row = conn.execute("SELECT count(*) FROM rules").fetchone()
            return int(row[0]) if row else 0

    def reset_tables(self) -> None:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            conn.execute(
                "TRUNCATE telemetries, events, rule_states, rule_cursors, action_outbox, "
                "rejected_messages, rejected_payloads CASCADE"
            )
            conn.execute("CHECKPOINT")  # so that no checkpoint of the previous run lands in this

    def next_prefix(self) -> str:
        self.runs += 1
        return f"r{self.runs}"

    # (a)
    def ceiling(self, n: int | None = None, v311: bool = False) -> tuple[float, int]:
        rate, count, _cpu = self.ceiling_cpu(n, v311)
        return rate, count

    def ceiling_cpu(self, n: int | None = None, v311: bool = False) -> tuple[float, int, float]:
        """(a) with the counting subscriber's CPU seconds per 100,000 messages."""
        prefix, client_id = self.next_prefix(), f"bench-count-{'311' if v311 else '5'}"
        create_session(self.broker.port, client_id, f"{prefix}/devices/+/telemetry")
        n = n or self.sizes.messages
        publish_backlog(self.broker.port, prefix, self.sizes.devices, 1, n)
        count, seconds, cpu = run_child(
            _count_subscriber, self.broker.port, client_id, n, v311, timeout=DRAIN_TIMEOUT
        )
        drop_session(self.broker.port, client_id)
        return count / seconds, n, cpu * 100_000 / max(count, 1)

    # (b)
    def naive(self) -> tuple[float, int]:
        self.reset_tables()
        prefix, client_id = self.next_prefix(), "bench-naive"
        create_session(self.broker.port, client_id, f"{prefix}/devices/+/telemetry")
        publish_backlog(self.broker.port, prefix, self.sizes.devices, 1, self.sizes.naive_messages)
        count, seconds, _cpu = run_child(
            _naive_subscriber,
            self.broker.port,
            client_id,
            (self.dsn, self.bindings),
            (self.sizes.naive_messages, self.sizes.naive_seconds),
            timeout=DRAIN_TIMEOUT,
        )
        drop_session(self.broker.port, client_id)
        return count / seconds, count

    # (c1), (c10), rules
    def daemon(self, name: str, readings: int, n: int, workers: int | None = None) -> Drain:
        self.reset_tables()
        prefix = self.next_prefix()
        client_id = f"bench-iothub-{name}"
        create_session(self.broker.port, client_id, f"{prefix}/devices/+/telemetry")
        publish_backlog(self.broker.port, prefix, self.sizes.devices, readings, n)
        expected = n * readings
        extra = {} if workers is None else {"IOTHUB_WORKERS": str(workers)}
        proc = self.start_daemon(name, prefix, client_id, extra)
        try:
            watched = self.watch_drain(proc, expected)
            started, first_rows, seen_at, done_at, peak = watched.figures
            hwm = sum(vm_kb(p, "VmHWM") for p in [proc.pid, *worker_pids(proc.pid)]) / 1024
            rss_peak = max(peak, hwm)
            cpu = watched.cpu_per_100k(expected - first_rows)
        finally:
            code = stop_process(proc)
        if code != 0:
            raise RuntimeError(f"daemon {name} exited with {code}; see {self.log_of(name)}")
        redelivered = drop_session(self.broker.port, client_id, settle=1.0)
        stored = count_rows(self.dsn)
        if stored != expected:
            raise RuntimeError(f"daemon {name}: {stored} rows stored, {expected} expected")
        rows_per_s, batches = batch_rate(self.dsn)
        if rows_per_s is None:  # one batch only: fall back to what the poller saw
            if first_rows < expected:
                rows_per_s = (expected - first_rows) / max(done_at - seen_at, POLL_S)
            else:  # all in the first poll: counts start-up too, so it is a lower bound
                rows_per_s = expected / max(done_at - started, POLL_S)
        return Drain(
            messages_per_s=rows_per_s / readings,
            rows_per_s=rows_per_s,
            rows=expected,
            seconds=done_at - started,
            peak_rss_mb=rss_peak,
            redelivered=redelivered,
            batches=batches,
            workers=workers if workers is not None else len(watched.workers) or 1,
            cpu_receiver=cpu[0],
            cpu_workers=cpu[1],
        )

    def log_of(self, name: str) -> Path:
        return self.workdir / f"daemon-{name}.log"

    def start_daemon(
        self, name: str, prefix: str, client_id: str, extra: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("IOTHUB_")}
        env.update(
            {
                "IOTHUB_DATABASE_URL": self.dsn,
                "IOTHUB_MQTT_URL": self.broker.url,
                "IOTHUB_MQTT_CLIENT_ID": client_id,
                "IOTHUB_MQTT_TOPICS": f"{prefix}/devices/{{serial_id}}/telemetry",
                "IOTHUB_MQTT_SESSION_EXPIRY": str(SESSION_EXPIRY),
                "IOTHUB_HTTP_PORT": "0",
                "IOTHUB_LOG_FORMAT": "json",
                "IOTHUB_STATS_INTERVAL": "5",
            }
        )
        env.update(self.daemon_env)
        env.update(extra or {})
        with self.log_of(name).open("ab") as log:
            return subprocess.Popen(
                [sys.executable, "-m", "iothub.cli.main", "run"],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=REPO,
            )

    def watch_drain(self, proc: subprocess.Popen[bytes], expected: int) -> Watched:
        """Poll until `expected` rows are committed: start, rows at first sight, first seen,
        done, peak RSS in MB (all processes) sampled along the way, and the CPU marks taken at
        first sight and at the end (start-up and idle time not counted)."""
        started = time.monotonic()
        first_rows, seen_at, peak = 0, 0.0, 0.0
        first_id: int | None = None
        first_cpu = CpuMark(0.0, 0.0)
        last_count = 0.0
        workers: list[int] = []
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            while time.monotonic() - started < DRAIN_TIMEOUT:
                if proc.poll() is not None:
                    raise RuntimeError(f"daemon exited early ({proc.returncode})")
                # Workers start one after the other: keep looking until all are seen.
                found = worker_pids(proc.pid)
                if len(found) > len(workers):
                    workers = found
                rss = sum(vm_kb(p, "VmRSS") for p in [proc.pid, *workers])
                peak = max(peak, rss / 1024)
                row = conn.execute("SELECT max(id) FROM telemetries").fetchone()
                now = time.monotonic()
                if row and row[0] is not None:
                    if first_id is None:
                        # Several writers commit out of id order: count what is there.
                        first_rows = count_rows(self.dsn)
                        first_id = int(row[0]) - first_rows + 1
                        seen_at = now
                        first_cpu = CpuMark.take(proc.pid)
                        last_count = now
                    # No conflicts in a drain: ids are allocated without gaps, so the highest
                    # id is a cheap lower bound of rows that exist or will once their
                    # transactions commit; count(*) confirms the end (and is taken every
                    # COUNT_EVERY_S anyway: with several writers a later commit can fill in
                    # lower ids, so the span alone may never reach `expected`).
                    span = int(row[0]) - first_id + 1
                    if (span >= expected or now - last_count >= COUNT_EVERY_S) and (
                        count_rows(self.dsn) >= expected
                    ):
                        return Watched(
                            (started, first_rows, seen_at, now, peak),
                            first_cpu,
                            CpuMark.take(proc.pid),
                            workers,
                        )
                    if now - last_count >= COUNT_EVERY_S:
                        last_count = now
                time.sleep(POLL_S)
        raise RuntimeError(f"drain did not finish in {DRAIN_TIMEOUT}s")

    # latency
    def latency(self, rate: float) -> tuple[float, float, int]:
        self.reset_tables()
        prefix = self.next_prefix()
        client_id = "bench-iothub-latency"
        proc = self.start_daemon("latency", prefix, client_id)
        seen: list[tuple[float, datetime]] = []
        try:
            wait_log(self.log_of("latency"), "service_ready", proc)
            stop = threading.Event()
            poller = threading.Thread(target=self.poll_commits, args=(seen, stop), daemon=True)
            poller.start()
            pub = mp.Process(
                target=_publish_live,
                args=(
                    self.broker.port,
                    prefix,
                    self.sizes.devices,
                    rate,
                    self.sizes.latency_seconds,
                ),
            )
            pub.start()
            pub.join()
            time.sleep(2.0)  # the last batches
            stop.set()
            poller.join()
        finally:
            code = stop_process(proc)
        drop_session(self.broker.port, client_id)
        if code != 0:
            raise RuntimeError(f"latency daemon exited with {code}")
        if not seen:
            raise RuntimeError("no rows committed in the latency run")
        t0 = min(ts for _, ts in seen).timestamp() + LATENCY_WARMUP_S
        lat = sorted(at - ts.timestamp() for at, ts in seen if ts.timestamp() >= t0)
        if not lat:
            lat = sorted(at - ts.timestamp() for at, ts in seen)
        return percentile(lat, 0.50), percentile(lat, 0.99), len(lat)

    def poll_commits(self, seen: list[tuple[float, datetime]], stop: threading.Event) -> None:
        last = 0
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            while not stop.is_set():
                rows = conn.execute(
                    "SELECT id, ts FROM telemetries WHERE id > %s ORDER BY id", (last,)
                ).fetchall()
                now = time.time()
                for row_id, ts in rows:
                    seen.append((now, ts))
                    last = max(last, int(row_id))
                time.sleep(LATENCY_POLL_S)


def percentile(sorted_values: list[float], q: float) -> float:
    index = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[index]


def batch_rate(dsn: str) -> tuple[float | None, int]:
    """Rows per second between the first and the last batch transaction of a drain, and the
    number of batches.

    created_at is now(), the start of the batch's transaction, and the writer's transactions
    follow each other: the rows of all batches but the last were parsed, stored, committed and
    acknowledged between the first start and the last one. None with fewer than two batches.
    """
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(
            "SELECT extract(epoch FROM max(created_at) - min(created_at))::float8, "
            "count(*) FILTER (WHERE created_at < (SELECT max(created_at) FROM telemetries)), "
            "count(DISTINCT created_at) "
            "FROM telemetries"
        ).fetchone()
    if not row or not row[0]:
        return None, int(row[2]) if row else 0
    return float(row[1]) / float(row[0]), int(row[2])


def count_rows(dsn: str) -> int:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute("SELECT count(*) FROM telemetries").fetchone()
        return int(row[0]) if row else 0


def vm_kb(pid: int, field: str) -> float:
    """A field of /proc/<pid>/status in kB (VmRSS: now; VmHWM: the peak so far)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return float(line.split()[1])
    except OSError:
        pass
    return 0.0


def stop_process(proc: subprocess.Popen[bytes]) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    return int(proc.returncode)


def wait_log(path: Path, event: str, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        if f'"event": "{event}"' in path.read_text(errors="replace"):
            return
        if proc.poll() is not None:
            raise RuntimeError(f"daemon exited ({proc.returncode}); see {path}")
        time.sleep(0.05)
    raise RuntimeError(f"no {event} in {path}")


# --- report


def machine() -> list[str]:
    mem_kb = vm_meminfo()
    versions = []
    for tool, args in (("postgres", ["--version"]), ("mosquitto", ["-h"])):
        binary = shutil.which(tool) or f"/usr/sbin/{tool}"
        try:
            out = subprocess.run(
                [binary, *args], capture_output=True, text=True, timeout=10, check=False
            )
            versions.append((out.stdout or out.stderr).splitlines()[0].strip())
        except (OSError, IndexError, subprocess.TimeoutExpired):
            versions.append(f"{tool}: unknown")
    libs = ", ".join(f"{p} {metadata.version(p)}" for p in ("paho-mqtt", "psycopg"))
    return [
        f"machine: {os.cpu_count()} cores, {mem_kb / 1024 / 1024:.1f} GiB RAM, "
        f"{platform.system()} {platform.release()}",
        f"software: Python {platform.python_version()}, {libs}; {'; '.join(versions)}",
    ]


def vm_meminfo() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return float(line.split()[1])
    return 0.0


def verdict(ok: bool) -> str:
    return "MET" if ok else "MISSED"


def c1_figures(bench: Bench, sizes: Sizes, out: Callable[[str], None]) -> tuple[Drain, float]:
    """(a), (b), (c1) and the RSS figure; (c1) and the (a) rate."""
    rate_a, n_a = bench.ceiling()
    out(f"(a) receive ceiling, paho QoS 1 counting subscriber: {rate_a:,.0f} msg/s ({n_a:,})")
    rate_b, n_b = bench.naive()
    out(
        f"(b) naive subscriber, INSERT+COMMIT per message: {rate_b:,.0f} msg/s "
        f"({n_b:,} messages timed)"
    )
    c1 = bench.daemon("c1", 1, sizes.messages)
    ok_a = c1.messages_per_s >= TARGET_VS_CEILING * rate_a
    ok_b = c1.messages_per_s >= TARGET_VS_NAIVE * rate_b
    out(
        f"(c1) iothub run, 1 reading/message: {c1.messages_per_s:,.0f} msg/s "
        f"({c1.rows:,} rows, redelivered after stop: {c1.redelivered})"
    )
    out(
        f"  vs (a) {rate_a:,.0f} msg/s: {c1.messages_per_s / rate_a:.2f}x, target >= "
        f"{TARGET_VS_CEILING}x: {verdict(ok_a)}"
    )
    out(
        f"  vs (b) {rate_b:,.0f} msg/s: {c1.messages_per_s / rate_b:.1f}x, target >= "
        f"{TARGET_VS_NAIVE:g}x: {verdict(ok_b)}"
    )
    ok_rss = c1.peak_rss_mb < TARGET_RSS_MB
    out(
        f"(rss) peak RSS of iothub run draining {sizes.messages:,} messages: "
        f"{c1.peak_rss_mb:,.0f} MB, target < {TARGET_RSS_MB:g} MB: {verdict(ok_rss)}"
    )
    return c1, rate_a


def scaling_table(
    bench: Bench, sizes: Sizes, counts: list[int], out: Callable[[str], None]
) -> list[Drain]:
    """The same one-reading backlog drained with each `workers` count, plus the receive ceiling
    of one connection in MQTT 3.1.1 and 5, all in this run: rates to compare side by side, and
    CPU seconds per 100,000 readings by process kind (comparable across machines)."""
    n = sizes.messages_scaling
    v5, _, cpu5 = bench.ceiling_cpu(n)
    v311, _, cpu311 = bench.ceiling_cpu(n, v311=True)
    out(
        f"(a5/a311) one connection, paho counting subscriber, ack on return: MQTT 5 {v5:,.0f} "
        f"msg/s ({cpu5:.2f} CPU s / 100k), MQTT 3.1.1 {v311:,.0f} msg/s ({cpu311:.2f} CPU s / "
        f"100k), {n:,} messages each"
    )
    drains = [bench.daemon(f"scale-w{w}", 1, n, workers=w) for w in counts]
    base = drains[0].messages_per_s
    out(f"(scaling) iothub run draining {n:,} one-reading messages, {sizes.devices} devices:")
    out(
        "| workers | msg/s | vs first row | vs paho v5 counting | CPU s / 100k readings: "
        "receiver | workers | total | peak RSS, all processes |"
    )
    out("|---|---|---|---|---|---|---|---|")
    for d in drains:
        out(
            f"| {d.workers} | {d.messages_per_s:,.0f} | {d.messages_per_s / base:.2f}x | "
            f"{d.messages_per_s / v5:.2f}x | {d.cpu_receiver:.2f} | {d.cpu_workers:.2f} | "
            f"{d.cpu_receiver + d.cpu_workers:.2f} | {d.peak_rss_mb:,.0f} MB |"
        )
    return drains


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run")
    parser.add_argument("--devices", type=int, help="devices in the fleet")
    parser.add_argument("--messages", type=int, help="backlog of (a) and (c1), and the RSS run")
    parser.add_argument("--messages-c10", type=int, help="backlog of (c10) and the rules run")
    parser.add_argument("--naive-seconds", type=float, help="how long (b) is measured")
    parser.add_argument("--latency-seconds", type=float, help="how long devices publish live")
    parser.add_argument(
        "--daemon-env",
        action="append",
        default=[],
        metavar="IOTHUB_X=V",
        help="extra setting for the daemon, e.g. IOTHUB_BATCH_SIZE=2000 (repeatable)",
    )
    parser.add_argument(
        "--only-rules",
        action="store_true",
        help="run only (c10) and the rules run (the figures a rule-engine change moves)",
    )
    parser.add_argument(
        "--rules-rounds",
        type=int,
        default=1,
        help="alternate (c10) and the rules run this many times; the median cost is the figure",
    )
    parser.add_argument(
        "--workers",
        default="1,2",
        help="workers counts of the scaling table, comma-separated (default 1,2)",
    )
    parser.add_argument(
        "--only-scaling",
        action="store_true",
        help="run only the scaling table (workers counts, MQTT 5 vs 3.1.1 ceiling)",
    )
    parser.add_argument("--messages-scaling", type=int, help="backlog of each scaling run")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs)")
    args = parser.parse_args(argv)
    counts = [int(w) for w in args.workers.split(",") if w.strip()]
    sizes = QUICK if args.quick else FULL
    overrides = {
        "devices": args.devices,
        "messages": args.messages,
        "messages_c10": args.messages_c10,
        "messages_scaling": args.messages_scaling,
        "naive_seconds": args.naive_seconds,
        "latency_seconds": args.latency_seconds,
    }
    sizes = Sizes(**{**sizes.__dict__, **{k: v for k, v in overrides.items() if v is not None}})
    daemon_env = dict(item.split("=", 1) for item in args.daemon_env)

    # A SIGTERM (a CI timeout) must still stop the servers: pg_ctl detaches PostgreSQL.
    signal.signal(signal.SIGTERM, lambda *a: sys.exit(128 + signal.SIGTERM))
    workdir = Path(tempfile.mkdtemp(prefix="iothub-bench-"))
    bench = Bench(sizes, workdir, daemon_env)
    out = print
    for line in machine():
        out(line)
    out(f"sizes: {sizes}")
    if daemon_env:
        out(f"daemon settings: {daemon_env}")
    out(f"postgres: {', '.join(PG_SETTINGS)}")
    out("mosquitto: persistence false, max_queued_messages 0, max_queued_bytes 0 (unlimited)")
    try:
        bench.start()
        bench.set_rules(False)
        if not args.only_rules:
            scaling_table(bench, sizes, counts, out)
        if args.only_scaling:
            return 0
        c1: Drain | None = None
        rate_a: float | None = None
        if not args.only_rules:
            c1, rate_a = c1_figures(bench, sizes, out)
        costs = []
        for round_no in range(1, args.rules_rounds + 1):
            label = f" round {round_no}/{args.rules_rounds}" if args.rules_rounds > 1 else ""
            bench.set_rules(False)
            c10 = bench.daemon("c10", METRICS_PER_DEVICE, sizes.messages_c10)
            ok_rows = c10.rows_per_s >= TARGET_ROWS_C10
            out(
                f"(c10){label} iothub run, {METRICS_PER_DEVICE} readings/message: "
                f"{c10.messages_per_s:,.0f} msg/s, {c10.rows_per_s:,.0f} rows/s, target >= "
                f"{TARGET_ROWS_C10:,} rows/s: {verdict(ok_rows)} "
                f"(redelivered after stop: {c10.redelivered}; {c10.batches:,} batches, "
                f"{c10.rows / max(c10.batches, 1):,.0f} rows each)"
            )
            if rate_a:
                ratio = c10.rows_per_s / rate_a
                out(
                    f"  (c10) rows/s vs (a) {rate_a:,.0f} msg/s: {ratio:.2f}x, target >= "
                    f"{TARGET_C10_VS_CEILING:g}x: {verdict(ratio >= TARGET_C10_VS_CEILING)}"
                )
            n_rules = bench.set_rules(True)
            ruled = bench.daemon("rules", METRICS_PER_DEVICE, sizes.messages_c10)
            bench.set_rules(False)
            cost = 1 - ruled.rows_per_s / max(c10.rows_per_s, 1e-9)
            costs.append(cost)
            out(
                f"(rules){label} {n_rules:,} rules ({RULES_PER_BINDING} per device_metric), "
                f"c10 workload: {ruled.rows_per_s:,.0f} rows/s vs {c10.rows_per_s:,.0f} without: "
                f"{cost * 100:+.1f}% slower, target <= {TARGET_RULES_COST * 100:g}%: "
                f"{verdict(cost <= TARGET_RULES_COST)} ({ruled.batches:,} batches, "
                f"{ruled.rows / max(ruled.batches, 1):,.0f} rows each)"
            )
        if len(costs) > 1:
            median = statistics.median(costs)
            out(
                f"(rules) median of {len(costs)} rounds: {median * 100:+.1f}% slower "
                f"(each: {', '.join(f'{c * 100:+.1f}%' for c in costs)}), target <= "
                f"{TARGET_RULES_COST * 100:g}%: {verdict(median <= TARGET_RULES_COST)}"
            )
        if c1 is None:
            return 0
        rate = c1.messages_per_s / 2
        p50, p99, n_lat = bench.latency(rate)
        out(
            f"(latency) publish -> commit at {rate:,.0f} msg/s (half of c1), {n_lat:,} readings: "
            f"p50 {p50 * 1000:,.0f} ms, p99 {p99 * 1000:,.0f} ms, target p99 < "
            f"{TARGET_P99 * 1000:,.0f} ms: {verdict(p99 < TARGET_P99)} "
            f"(poll resolution {LATENCY_POLL_S * 1000:g} ms)"
        )
    finally:
        bench.stop()
        if args.keep:
            out(f"work directory kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
