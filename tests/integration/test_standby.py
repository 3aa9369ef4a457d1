"""Active/standby: two `iothub run` processes with one client id, one active, one waiting on
the election lock; the active killed with -9, or drained with SIGTERM, mid-stream.

Every acknowledged reading is stored once, the takeover (from the kill to the standby's first
committed batch) stays under TAKEOVER_LIMIT, and the rule events equal those that one
instance, never interrupted, writes for the same readings on a reference device.
"""

from __future__ import annotations

import json
import random
import socket
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest

from config.settings import Settings
from ingestor import mqtt as mqttclient
from iothub.daemon.election import Election
from schema import locks
from tests.integration.test_faults import daemon_env
from tests.integration.test_rules_in_pipeline import add_rule
from tests.support.daemon import make_service, running
from tests.support.faults import Daemon, NumberedPublisher, wait_stored
from tests.support.fleet import make_fleet
from tests.support.paho_api import client as mqtt

pytestmark = pytest.mark.slow

TAKEOVER_LIMIT = 10.0  # seconds: the target with default settings
READINGS = 3000  # per device
RATE = 300.0  # readings per second per device
KILL_AFTER = 3.0  # seconds of publishing before the active is stopped

# One scenario per rule kind the pipeline keeps state for; readings of one device, in
# device-time order, feed all of them.
SCENARIOS: dict[str, tuple[str, dict[str, object]]] = {
    "duration": (
        "temperature",
        {"type": "threshold", "operator": ">", "value": 30, "duration_minutes": 2},
    ),
    "cooldown": (
        "temperature",
        {"type": "threshold", "operator": ">", "value": 28, "cooldown_minutes": 10},
    ),
    "clear_value": (
        "temperature",
        {"type": "threshold", "operator": ">", "value": 29, "clear_value": 24},
    ),
    "clear_duration": (
        "temperature",
        {
            "type": "threshold",
            "operator": ">",
            "value": 27,
            "clear": {"type": "threshold", "operator": "<", "value": 22, "duration_minutes": 1},
        },
    ),
    "delta": ("temperature", {"type": "delta", "operator": ">", "value": 6}),
    "rate": ("temperature", {"type": "rate", "count": 8, "duration_minutes": 1}),
    "range": (
        "temperature",
        {"type": "range", "operator": "outside", "min": 15, "max": 32, "clear_value": [17, 30]},
    ),
    "composite_or": (
        "temperature",
        {
            "type": "composite",
            "operator": "OR",
            "conditions": [
                {"type": "threshold", "operator": "<", "value": 13, "duration_minutes": 1},
                {"type": "delta", "operator": "<", "value": -8},
            ],
        },
    ),
    "string_in": (
        "status",
        {"type": "string_match", "operator": "in", "value": ["ALARM", "FAULT"]},
    ),
}


@dataclass
class Series:
    """The readings both devices get: irregular device-time gaps (so that rate windows differ),
    a random walk of temperatures, and a status that is now and then an alarm."""

    t0: datetime
    stamps: list[datetime] = field(default_factory=list)
    temperatures: list[float] = field(default_factory=list)
    statuses: list[str] = field(default_factory=list)

    @classmethod
    def make(cls, n: int, seed: int = 12) -> Series:
        rng = random.Random(seed)
        series = cls(datetime.now(UTC).replace(microsecond=0) - timedelta(days=1))
        ts, value = series.t0, 22.0
        for _ in range(n):
            ts += timedelta(seconds=rng.choice((3, 5, 10, 20, 40)))
            value = min(40.0, max(8.0, value + rng.uniform(-4, 4)))
            series.stamps.append(ts)
            series.temperatures.append(round(value, 1))
            series.statuses.append(rng.choice(("OK",) * 12 + ("ALARM", "FAULT", "WARN")))
        return series

    def body(self, i: int) -> bytes:
        return json.dumps(
            {
                "ts": self.stamps[i].isoformat(),
                "metrics": {"temperature": self.temperatures[i], "status": self.statuses[i]},
            }
        ).encode()


class Stream:
    """Publishes the series to both devices' topics at RATE, QoS 1, and remembers which
    readings of the device under test the broker acknowledged."""

    def __init__(self, broker_url: str, topics: tuple[str, str], series: Series) -> None:
        self.broker_url = broker_url
        self.topics = topics
        self.series = series
        self.acked: set[int] = set()
        self.reference_acked: set[int] = set()
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, name="standby-stream", daemon=True)

    def _run(self) -> None:
        client = mqttclient.make_client(self.broker_url, f"stream-{id(self)}")
        client.max_inflight_messages_set(200)
        client.max_queued_messages_set(0)
        connected = threading.Event()
        client.on_connect = lambda *args: connected.set()
        client.connect_async(*mqttclient.host_port(self.broker_url))
        client.loop_start()
        assert connected.wait(10), "stream publisher could not connect"
        infos = []
        next_at = time.monotonic()
        for i in range(len(self.series.stamps)):
            body = self.series.body(i)
            infos.append(
                (
                    i,
                    client.publish(self.topics[0], body, qos=1),
                    client.publish(self.topics[1], body, qos=1),
                )
            )
            next_at += 1.0 / RATE
            if (delay := next_at - time.monotonic()) > 0:
                time.sleep(delay)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not all(_acked(a) and _acked(b) for _, a, b in infos):
            time.sleep(0.1)
        self.acked = {i for i, a, _ in infos if _acked(a)}
        self.reference_acked = {i for i, _, b in infos if _acked(b)}
        client.disconnect()
        mqttclient.stop_loop(client)
        self.done.set()


def _acked(info: mqtt.MQTTMessageInfo) -> bool:
    try:
        return info.is_published()
    except (RuntimeError, ValueError):
        return False


def _rows(dsn: str, dm_id: int) -> tuple[int, int]:
    """(rows, distinct device times) of one device_metric."""
    with psycopg.connect(dsn, autocommit=True, connect_timeout=5) as conn:
        row = conn.execute(
            "SELECT count(*), count(DISTINCT ts) FROM telemetries WHERE device_metric_id = %s",
            (dm_id,),
        ).fetchone()
    assert row
    return int(row[0]), int(row[1])


def _stored_indexes(dsn: str, dm_id: int, series: Series) -> set[int]:
    index = {ts: i for i, ts in enumerate(series.stamps)}
    with psycopg.connect(dsn, autocommit=True) as conn:
        rows = conn.execute("SELECT ts FROM telemetries WHERE device_metric_id = %s", (dm_id,))
        return {index[ts] for (ts,) in rows}


def _events(dsn: str, dm_ids: list[int], t0: datetime) -> list[tuple[str, str, float]]:
    """(rule name, kind, seconds after t0) of every event of the device_metrics."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        rows = conn.execute(
            'SELECT r.name, e.kind::text, e."timestamp" FROM events e JOIN rules r'
            " ON r.id = e.rule_id WHERE e.device_metric_id = ANY(%s)"
            ' ORDER BY r.name, e."timestamp", e.id',
            (dm_ids,),
        ).fetchall()
    return [(name, kind, (ts - t0).total_seconds()) for name, kind, ts in rows]


def _wait(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _http_port(daemon: Daemon) -> int:
    """The port of the daemon's latest start (a restarted daemon appends to its log)."""
    for line in reversed(daemon.log_path.read_text().splitlines()):
        if '"event": "http_server_started"' in line:
            return int(json.loads(line)["port"])
    raise AssertionError(f"no http_server_started line: {daemon.tail()}")


def _healthz(port: int) -> tuple[int, dict[str, object]]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _metrics(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return str(response.read().decode())


@dataclass(frozen=True)
class Watched:
    """The device_metrics of one device of the scenarios, in one database."""

    dsn: str
    temperature: int
    status: int

    @classmethod
    def of(cls, dsn: str, bindings: dict[tuple[str, str], int], serial: str) -> Watched:
        return cls(dsn, bindings[(serial, "temperature")], bindings[(serial, "status")])

    @classmethod
    def with_scenarios(cls, dsn: str, bindings: dict[tuple[str, str], int], serial: str) -> Watched:
        """The device's device_metrics, each scenario's rule added to its own."""
        for name, (metric, condition) in SCENARIOS.items():
            add_rule(dsn, bindings[(serial, metric)], condition, name=name)
        return cls.of(dsn, bindings, serial)

    def events(self, t0: datetime) -> list[tuple[str, str, float]]:
        return _events(self.dsn, [self.temperature, self.status], t0)


def settle(stream: Stream, tested: Watched, reference: Watched, timeout: float = 60.0) -> None:
    """Wait until every acknowledged reading of both devices is stored, then for the rule
    transactions of the last batches."""
    _wait(
        lambda: stream.acked <= _stored_indexes(tested.dsn, tested.temperature, stream.series),
        timeout,
        "every acknowledged reading",
    )
    _wait(
        lambda: _rows(reference.dsn, reference.temperature)[0] >= len(stream.reference_acked),
        timeout,
        "the reference device's readings",
    )
    time.sleep(1.0)


def check_one_instance(stream: Stream, tested: Watched, reference: Watched) -> None:
    """Every acknowledged reading stored once, and the events those of the reference: one
    instance, never interrupted."""
    stored = _stored_indexes(tested.dsn, tested.temperature, stream.series)
    lost = stream.acked - stored
    rows, distinct = _rows(tested.dsn, tested.temperature)
    assert not lost, f"{len(lost)} acknowledged readings lost, e.g. {sorted(lost)[:10]}"
    assert rows == distinct, f"{rows - distinct} duplicate rows"
    readings = len(stream.series.stamps)
    assert stream.acked == stream.reference_acked == set(range(readings))
    expected = reference.events(stream.series.t0)
    fired = {name for name, _, _ in expected}
    assert fired == set(SCENARIOS), f"scenarios that never fired: {set(SCENARIOS) - fired}"
    assert tested.events(stream.series.t0) == expected


class Watcher:
    """An election's watcher that records what it was told."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def lock_unconfirmed(self, why: str) -> None:
        self.calls.append(f"unconfirmed: {why}")

    def lock_regained(self) -> int:
        self.calls.append("regained")
        return 0

    def lock_lost(self, why: str) -> None:
        self.calls.append(f"lost: {why}")


@pytest.fixture
def pair(
    db_url: str, broker_url: str, unique: str, tmp_path: Path
) -> Iterator[tuple[Daemon, Daemon]]:
    """Two daemons with one client id: the first active, the second a standby."""
    env = daemon_env(db_url, broker_url, unique)
    first = Daemon(env, tmp_path / "first.log")
    second = Daemon(env, tmp_path / "second.log")
    first.start()
    first.wait_log("service_ready")
    second.start()
    second.wait_log("standby")
    try:
        yield first, second
    finally:
        for daemon in (first, second):
            if daemon.alive():
                daemon.kill9()


def _run_takeover(
    *,
    make_settings: Callable[..., Settings],
    db_url: str,
    broker_url: str,
    unique: str,
    pair: tuple[Daemon, Daemon],
    stop_active: Callable[[Daemon], None],
) -> float:
    """Stream the scenarios, stop the active with `stop_active` mid-stream, check no loss, no
    duplicates and the one-instance events; return the takeover time."""
    active, standby = pair
    fleet = make_fleet(db_url, f"SN-{unique}", 2)
    tested, reference = fleet.serials
    tested_dms = Watched.with_scenarios(db_url, fleet.bindings, tested)
    reference_dms = Watched.with_scenarios(db_url, fleet.bindings, reference)
    temperature = tested_dms.temperature
    active.wait_log("catalog_reloaded")  # the new devices are known before their first reading
    series = Series.make(READINGS)
    # The reference: one instance of its own, never interrupted, on topics of its own.
    ref = make_service(
        make_settings(
            mqtt_client_id=f"ref-{unique}",
            mqtt_topics=(f"r{unique}/devices/{{serial_id}}/telemetry",),
        )
    )
    with running(ref):
        # A healthy standby is not restarted by an orchestrator: 200, and it says what it is.
        status, body = _healthz(_http_port(standby))
        assert (status, body["status"], body["role"]) == (200, "standby", "standby")
        assert "iothub_active 0.0" in _metrics(_http_port(standby))
        stream = Stream(
            broker_url,
            (f"t{unique}/devices/{tested}/telemetry", f"r{unique}/devices/{reference}/telemetry"),
            series,
        )
        stream.thread.start()
        time.sleep(KILL_AFTER)
        assert _rows(db_url, temperature)[0] > 0, f"the active stored nothing: {active.tail()}"
        stopped_at = time.monotonic()
        stop_active(active)  # returns once the process has exited
        # The stopped instance commits no more, so the first new row is the standby's. (After
        # SIGTERM the standby may have committed before the drained process exited: then
        # this measures its second batch, an upper bound.)
        before, _ = _rows(db_url, temperature)
        after = before
        while after == before and time.monotonic() - stopped_at < 60:
            time.sleep(0.02)
            after, _ = _rows(db_url, temperature)
        takeover = time.monotonic() - stopped_at
        assert after > before, f"the standby never committed: {standby.tail()}"
        assert stream.done.wait(60), "the stream did not finish"
        assert stream.acked, "the broker acknowledged nothing: the test proves nothing"
        settle(stream, tested_dms, reference_dms)
    check_one_instance(stream, tested_dms, reference_dms)
    assert takeover < TAKEOVER_LIMIT, f"takeover took {takeover:.2f}s"
    standby.wait_log("became_active")
    assert "iothub_active 1.0" in _metrics(_http_port(standby))
    assert _healthz(_http_port(standby))[1]["role"] == "active"
    return takeover


def test_kill_9_of_the_active_hands_over_without_loss_and_with_the_same_events(
    make_settings: Callable[..., Settings],
    db_url: str,
    broker_url: str,
    unique: str,
    pair: tuple[Daemon, Daemon],
) -> None:
    """The active killed with -9 mid-stream: the standby gets the lock, resumes the broker
    session, and every acknowledged reading is stored once, the events are exactly those of
    one uninterrupted instance, and the takeover takes under TAKEOVER_LIMIT."""
    takeover = _run_takeover(
        make_settings=make_settings,
        db_url=db_url,
        broker_url=broker_url,
        unique=unique,
        pair=pair,
        stop_active=lambda daemon: daemon.kill9(),
    )
    print(f"takeover after kill -9: {takeover:.2f}s")
    active, standby = pair
    assert standby.terminate() == 0
    assert active.starts == 1


def test_sigterm_drains_the_active_and_hands_over(
    make_settings: Callable[..., Settings],
    db_url: str,
    broker_url: str,
    unique: str,
    pair: tuple[Daemon, Daemon],
) -> None:
    """SIGTERM on the active: it flushes, commits, acknowledges, leaves the broker and
    releases the lock (exit 0); the standby takes over with nothing lost or doubled."""
    codes: list[int] = []
    takeover = _run_takeover(
        make_settings=make_settings,
        db_url=db_url,
        broker_url=broker_url,
        unique=unique,
        pair=pair,
        stop_active=lambda daemon: codes.append(daemon.terminate()),
    )
    print(f"takeover after SIGTERM: {takeover:.2f}s")
    active, standby = pair
    assert codes == [0]
    log = active.log_path.read_text()
    assert '"event": "lock_released"' in log
    assert log.index('"event": "mqtt_disconnected"') < log.index('"event": "lock_released"')
    assert standby.terminate() == 0


def test_a_second_election_waits_until_the_first_releases(
    make_settings: Callable[..., Settings],
) -> None:
    """Two elections of one client id: the second stays standby while the first holds the
    lock (also for a key that is negative as an int4), and becomes active once it is released."""
    client_id = next(f"neg-{i}" for i in range(100) if locks.standby_key(f"neg-{i}") < 0)
    settings = make_settings(mqtt_client_id=client_id)
    stop = threading.Event()
    first, second = Election(settings, stop), Election(settings, stop)
    assert first.acquire(on_wait=lambda: None)
    watcher = Watcher()
    first.guard(watcher)
    waiter = threading.Thread(target=second.acquire, kwargs={"on_wait": lambda: None})
    waiter.start()
    time.sleep(3 * settings.standby_lock_check_interval)
    assert (first.role, second.role, watcher.calls) == ("active", "standby", [])
    first.release()
    waiter.join(5)
    assert second.role == "active"
    second.release()


def test_an_active_that_loses_its_lock_session_fences_itself(
    db_url: str, broker_url: str, unique: str, pair: tuple[Daemon, Daemon]
) -> None:
    """The server ends the active's election session (what a failover or an administrator
    does): the active logs lock_lost, stops acknowledging, leaves the broker and exits 69; the
    standby takes over and every acknowledged reading is stored once."""
    active, standby = pair
    fleet = make_fleet(db_url, f"SN-{unique}", 1)
    serial = fleet.serials[0]
    dm_id = fleet.bindings[(serial, "temperature")]
    active.wait_log("catalog_reloaded")  # the new device is known before its first reading
    pub = NumberedPublisher(broker_url, f"t{unique}/devices/{serial}/telemetry", n=2000, rate=400)
    pub.run()
    time.sleep(1.5)
    with psycopg.connect(db_url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_locks WHERE locktype = 'advisory'"
            " AND granted AND classid = %s AND objid = %s::int::oid AND objsubid = 2",
            (locks.STANDBY_CLASS, locks.standby_key(f"iothub-fault-{unique}")),
        ).fetchone()
    assert row and row[0], "no granted election lock to end"
    assert active.process is not None
    assert active.process.wait(30) == 69
    log = active.log_path.read_text()
    assert '"event": "lock_lost"' in log
    standby.wait_log("became_active")
    pub.wait(60)
    numbers, total = wait_stored(db_url, dm_id, pub.base, pub.acked, timeout=60)
    assert pub.acked and pub.acked <= numbers, f"lost: {sorted(pub.acked - numbers)[:10]}"
    assert total == len(numbers), f"{total - len(numbers)} duplicate rows"
    assert standby.terminate() == 0


def test_a_standby_tells_systemd_it_is_started_and_waiting(
    make_settings: Callable[..., Settings],
    db_url: str,
    broker_url: str,
    unique: str,
    tmp_path: Path,
) -> None:
    """While another session holds the lock, `iothub run` sends READY=1 (systemd must not
    time its start out) and a standby STATUS; once the lock is free it becomes active and says
    so; SIGTERM then stops it with 0."""
    env = daemon_env(db_url, broker_url, unique)
    holder = Election(make_settings(mqtt_client_id=env["IOTHUB_MQTT_CLIENT_ID"]), threading.Event())
    assert holder.acquire(on_wait=lambda: None)
    sock_dir = Path(tempfile.mkdtemp(prefix="iothub-sd-"))  # short: a socket path has 108 bytes
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(sock_dir / "notify"))
        sock.settimeout(10)
        daemon = Daemon({**env, "NOTIFY_SOCKET": str(sock_dir / "notify")}, tmp_path / "d.log")
        daemon.start()
        try:
            messages = [sock.recv(4096).decode() for _ in range(2)]
            assert messages[0] == "READY=1"
            assert messages[1].startswith("STATUS=standby: waiting for the lock of ")
            daemon.wait_log("standby")
            time.sleep(1.5)
            assert '"event": "became_active"' not in daemon.log_path.read_text()
            holder.release()
            daemon.wait_log("service_ready")
            assert sock.recv(4096).decode() == "STATUS=active: ingesting"
            assert daemon.terminate() == 0
        finally:
            if daemon.alive():
                daemon.kill9()
            holder.release()
