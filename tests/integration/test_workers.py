"""`iothub run` with worker processes (`workers` = 2): one receiving connection, device-affine
workers; against real PostgreSQL and Mosquitto.

Numbered readings from many devices: every one stored once; rule events the same as with one
process; a worker killed with SIGKILL stops the service (exit 70) and, after a restart, nothing
is lost or stored twice; SIGTERM drains; /metrics sums the workers, /healthz is the worst of
them.
"""

from __future__ import annotations

import json
import os
import re
import signal
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest

from config.settings import Settings
from ingestor import handoff, mqtt, ownership, sources
from iothub import exitcodes
from iothub.daemon import assemble
from iothub.daemon.fanout import Fanout
from tests.integration.test_faults import check_no_loss, daemon_env
from tests.support.daemon import running
from tests.support.faults import Daemon, NumberedPublisher
from tests.support.fleet import Fleet, Publisher, make_fleet, wait_for
from tests.support.mqtt_proxy import MqttProxy
from tests.support.services import LocalPostgres

pytestmark = pytest.mark.slow

DEVICES = 24
READINGS = 40


def owners(settings: Settings, serials: tuple[str, ...], topic: Callable[[str], str]) -> set[int]:
    router = sources.router_for(settings.mqtt_topics, ())
    return {
        handoff.owners_of(topic(s), b"{}", router, settings.workers, settings.max_payload_bytes)[0]
        for s in serials
    }


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:  # noqa: S310 (our own server)
            return int(response.status), bytes(response.read())
    except urllib.error.HTTPError as exc:
        return int(exc.code), bytes(exc.read())


def metric(body: bytes, name: str) -> float:
    match = re.search(rf"^{re.escape(name)} (\S+)$", body.decode(), re.MULTILINE)
    return float(match.group(1)) if match else -1.0


def test_many_devices_lost_0_dup_0_metrics_summed(
    make_settings: Callable[..., Settings], db_url: str, broker_url: str, unique: str
) -> None:
    """24 devices × 40 numbered readings through two workers, half on the shared topic: each
    stored once with its own value; /metrics counts every message once, summed over workers."""
    settings = make_settings(workers=2)
    fleet = make_fleet(db_url, f"SN-{unique}", DEVICES)
    assert owners(settings, fleet.serials, lambda s: f"t{unique}/devices/{s}/telemetry") == {0, 1}
    base = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=1)
    items: list[tuple[str, Any]] = []
    for i in range(READINGS):
        for d, serial in enumerate(fleet.serials):
            ts = (base + timedelta(seconds=i)).isoformat()
            if d % 2:
                items.append(
                    (
                        f"t{unique}/telemetry",
                        {"device": serial, "ts": ts, "metrics": {"temperature": i}},
                    )
                )
            else:
                items.append(
                    (
                        f"t{unique}/devices/{serial}/telemetry",
                        {"ts": ts, "metrics": {"temperature": i}},
                    )
                )
    pub = Publisher(broker_url, f"pub-{unique}")
    try:
        with running(assemble.build(settings, rules_on=True)) as handle:
            assert isinstance(handle.service.pipeline, Fanout)
            assert pub.publish_many(items) == len(items)
            assert wait_for(lambda: handle.service.totals["messages"] >= len(items), timeout=60)
            url = handle.service.http.url
            assert wait_for(
                lambda: (
                    metric(get(f"{url}/metrics")[1], "iothub_messages_received_total") == len(items)
                ),
                timeout=10,
            )
            body = get(f"{url}/metrics")[1]
            assert metric(body, "iothub_readings_stored_total") == len(items)
            status, health = get(f"{url}/healthz")
            assert status == 200, health
            assert json.loads(health)["status"] == "ok"
            assert handle.service.totals["rows"] == len(items)
    finally:
        pub.close()
    with psycopg.connect(db_url, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT device_metric_id, (value_jsonb->>'v')::int FROM telemetries"
        ).fetchall()
    assert len(rows) == len(items)
    by_dm: dict[int, list[int]] = {}
    for dm, value in rows:
        by_dm.setdefault(dm, []).append(value)
    for serial in fleet.serials:
        assert sorted(by_dm[fleet.bindings[(serial, "temperature")]]) == list(range(READINGS))


THRESHOLD = {"type": "threshold", "operator": ">", "value": 27.5, "duration_minutes": 5}
NOTIFY = {"type": "notify", "channel": "email", "message": "{device_name}: {value}"}


def run_through(
    settings: Settings, broker_url: str, client_id: str, items: list[tuple[str, Any]], burst: int
) -> dict[str, int]:
    """Publish `items` in bursts (so that batches are cut anywhere) through a service with
    `settings` and rules on, until it has counted and acknowledged them all; its totals."""
    pub = Publisher(broker_url, client_id)
    try:
        with running(assemble.build(settings, rules_on=True)) as handle:
            for start in range(0, len(items), burst):
                part = items[start : start + burst]
                assert pub.publish_many(part) == len(part)
            assert wait_for(lambda: handle.service.totals["messages"] >= len(items), timeout=60)
            assert wait_for(lambda: not handle.service.pipeline.oldest_unacked_age(), timeout=10)
            return dict(handle.service.totals)
    finally:
        pub.close()


def hot_rules(db_url: str, fleet: Fleet) -> dict[int, int]:
    """A THRESHOLD rule on each device's temperature: the rules' ids, to the device's index."""
    rule_device: dict[int, int] = {}
    with psycopg.connect(db_url, autocommit=True) as conn:
        for d, serial in enumerate(fleet.serials):
            row = conn.execute(
                "INSERT INTO rules (name, condition, action, device_metric_id)"
                " VALUES (%s, %s, %s, %s) RETURNING id",
                (
                    f"hot {d}",
                    json.dumps(THRESHOLD),
                    json.dumps(NOTIFY),
                    fleet.bindings[(serial, "temperature")],
                ),
            ).fetchone()
            assert row
            rule_device[int(row[0])] = d
    return rule_device


def scenario_events(
    settings: Settings, db_url: str, broker_url: str, prefix: str
) -> list[tuple[int, str, datetime, str]]:
    """A fixed rule scenario over 12 devices, run through the service with `settings`: the
    events it wrote, as (device index, kind, time, value seen), in device then time order."""
    fleet = make_fleet(db_url, prefix, 12)
    rule_device = hot_rules(db_url, fleet)
    t0 = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)
    items: list[tuple[str, Any]] = []
    for minute in range(60):
        for d, serial in enumerate(fleet.serials):
            # Each device its own rhythm of hot and cool spells (some too short to fire).
            hot = (minute // (3 + d)) % 2 == 1
            value = 30.0 + d if hot else 20.0
            topic = f"{settings.mqtt_topics[0].split('/')[0]}/devices/{serial}/telemetry"
            ts = (t0 + timedelta(minutes=minute)).isoformat()
            items.append((topic, {"ts": ts, "metrics": {"temperature": value}}))
    run_through(settings, broker_url, f"pub-{prefix}", items, burst=97)
    with psycopg.connect(db_url, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT rule_id, kind::text, \"timestamp\", context->>'value' FROM events"
        ).fetchall()
    return sorted((rule_device[r], kind, ts, str(v)) for r, kind, ts, v in rows if r in rule_device)


def test_rule_events_identical_with_one_and_two_workers(
    make_settings: Callable[..., Settings], db_url: str, broker_url: str, unique: str
) -> None:
    """The same readings, through one process and through two workers: the same events."""
    one = scenario_events(make_settings(workers=1), db_url, broker_url, f"A-{unique}")
    two = scenario_events(
        make_settings(workers=2, mqtt_client_id=f"iothub-test-{unique}-2"),
        db_url,
        broker_url,
        f"B-{unique}",
    )
    assert len(one) > 10, "the scenario fires too little to compare"
    assert two == one


def worker_pids(daemon: Daemon, start: int) -> list[int]:
    """The pids of the workers of the daemon's `start`-th run (1-based), from its log."""
    lines = [
        json.loads(line)
        for line in daemon.log_path.read_text().splitlines()
        if '"event": "workers_started"' in line
    ]
    return [int(p) for p in lines[start - 1]["pids"]]


def test_kill_9_of_one_worker_stops_the_service_and_loses_nothing(
    db_url: str, broker_url: str, unique: str, tmp_path: Path
) -> None:
    """SIGKILL to the worker that owns the device mid-stream: the service logs worker_died and
    exits 70; the other worker's process ends too; after a restart every reading the broker
    acknowledged is stored once."""
    fleet = make_fleet(db_url, f"SN-{unique}", 1)
    serial = fleet.serials[0]
    dm_id = fleet.bindings[(serial, "temperature")]
    env = daemon_env(db_url, broker_url, unique) | {"IOTHUB_WORKERS": "2"}
    daemon = Daemon(env, tmp_path / "daemon.log")
    daemon.start()
    daemon.wait_log("service_ready")
    topic = f"t{unique}/devices/{serial}/telemetry"
    router = sources.router_for((env["IOTHUB_MQTT_TOPICS"],), ())
    owner = handoff.owners_of(topic, b"", router, 2, 1 << 20)[0]
    pids = worker_pids(daemon, 1)
    pub = NumberedPublisher(broker_url, topic, n=3000, rate=500)
    pub.run()
    time.sleep(1.5)
    os.kill(pids[owner], signal.SIGKILL)
    assert daemon.process is not None
    assert daemon.process.wait(60) == exitcodes.CRASH
    assert '"event": "worker_died"' in daemon.log_path.read_text()
    for pid in pids:
        assert wait_for(lambda pid=pid: not pid_alive(pid), timeout=10), f"worker {pid} lingers"
    daemon.start()
    daemon.wait_log("service_ready", occurrences=2)
    pub.wait(60)
    check_no_loss(db_url, dm_id, pub, daemon)
    assert daemon.terminate() == 0


def test_kill_9_of_the_receiver_takes_the_workers_with_it(
    db_url: str, broker_url: str, unique: str, tmp_path: Path
) -> None:
    """SIGKILL to the receiving process: its workers notice and exit instead of lingering."""
    make_fleet(db_url, f"SN-{unique}", 1)
    env = daemon_env(db_url, broker_url, unique) | {"IOTHUB_WORKERS": "2"}
    daemon = Daemon(env, tmp_path / "daemon.log")
    daemon.start()
    daemon.wait_log("service_ready")
    pids = worker_pids(daemon, 1)
    daemon.kill9()
    for pid in pids:
        assert wait_for(lambda pid=pid: not pid_alive(pid), timeout=10), f"worker {pid} lingers"


def test_sigterm_drains_every_worker(
    db_url: str, broker_url: str, unique: str, tmp_path: Path
) -> None:
    """SIGTERM mid-stream with two workers: exit 0, flushed; after a restart nothing is lost
    and nothing is stored twice."""
    fleet = make_fleet(db_url, f"SN-{unique}", 1)
    serial = fleet.serials[0]
    dm_id = fleet.bindings[(serial, "temperature")]
    daemon = Daemon(
        daemon_env(db_url, broker_url, unique) | {"IOTHUB_WORKERS": "2"}, tmp_path / "daemon.log"
    )
    daemon.start()
    daemon.wait_log("service_ready")
    pub = NumberedPublisher(broker_url, f"t{unique}/devices/{serial}/telemetry", n=2000, rate=500)
    pub.run()
    time.sleep(1.5)
    assert daemon.terminate() == 0
    assert '"flushed": true' in daemon.log_path.read_text()
    daemon.start()
    daemon.wait_log("service_ready", occurrences=2)
    pub.wait(60)
    check_no_loss(db_url, dm_id, pub, daemon)
    assert daemon.terminate() == 0


def test_healthz_is_the_worst_of_the_workers(
    local_postgres: LocalPostgres, broker_url: str, unique: str, tmp_path: Path
) -> None:
    """PostgreSQL stopped under two workers: /healthz answers 503 naming the database (the
    workers' writers fail), the stats line counts the readings waiting in the workers, and
    /healthz is 200 again once a batch commits after the restart."""
    dsn = psycopg.conninfo.make_conninfo(local_postgres.admin_dsn, dbname="iothub")
    fleet = make_fleet(dsn, f"SN-{unique}", 1)
    serial = fleet.serials[0]
    env = daemon_env(dsn, broker_url, unique) | {"IOTHUB_WORKERS": "2", "IOTHUB_HTTP_PORT": "0"}
    daemon = Daemon(env, tmp_path / "daemon.log")
    daemon.start()
    daemon.wait_log("service_ready")
    port = next(
        json.loads(line)["port"]
        for line in daemon.log_path.read_text().splitlines()
        if '"event": "http_server_started"' in line
    )
    url = f"http://127.0.0.1:{port}/healthz"
    assert get(url)[0] == 200
    pub = NumberedPublisher(broker_url, f"t{unique}/devices/{serial}/telemetry", n=600, rate=100)
    pub.run()
    time.sleep(1.0)
    local_postgres.stop("immediate")
    daemon.wait_log("db_unavailable")
    assert wait_for(lambda: get(url)[0] == 503, timeout=10)
    assert "database" in json.loads(get(url)[1])["down"]
    # The readings published during the outage wait in the owning worker's queue, not in the
    # receiving process's: the stats line counts both.
    assert wait_for(lambda: max_stats_queue_depth(daemon) > 0, timeout=15), daemon.tail()
    local_postgres.start()
    daemon.wait_log("db_recovered", timeout=60)
    assert wait_for(lambda: get(url)[0] == 200, timeout=30)
    pub.wait(60)
    check_no_loss(dsn, fleet.bindings[(serial, "temperature")], pub, daemon)
    assert daemon.terminate() == 0


def max_stats_queue_depth(daemon: Daemon) -> int:
    """The highest queue_depth of the daemon's stats lines so far."""
    depths = [
        int(json.loads(line)["queue_depth"])
        for line in daemon.log_path.read_text(errors="replace").splitlines()
        if '"event": "stats"' in line
    ]
    return max(depths, default=0)


def pid_alive(pid: int) -> bool:
    """Whether the process exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(") ", 1)[1][0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def test_pubacks_leave_in_arrival_order(
    make_settings: Callable[..., Settings], db_url: str, broker_url: str, unique: str
) -> None:
    """Through a recording proxy: with two workers committing independently, the PUBACKs on the
    connection are exactly the PUBLISHes' packet ids, in the order they arrived."""
    target = mqtt.target_of(broker_url)
    proxy = MqttProxy(target.host, target.port)
    url = broker_url.replace(f":{target.port}", f":{proxy.port}")
    settings = make_settings(workers=2, mqtt_url=url, batch_size=37)
    fleet = make_fleet(db_url, f"SN-{unique}", DEVICES)
    base = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=1)
    items = [
        (
            f"t{unique}/devices/{serial}/telemetry",
            {"ts": (base + timedelta(seconds=i)).isoformat(), "metrics": {"temperature": i}},
        )
        for i in range(60)
        for serial in fleet.serials
    ]
    pub = Publisher(broker_url, f"pub-{unique}")
    try:
        with running(assemble.build(settings, rules_on=False)) as handle:
            assert pub.publish_many(items) == len(items)
            assert wait_for(lambda: handle.service.totals["messages"] >= len(items), timeout=60)
            assert wait_for(lambda: len(proxy.recorded.acked) >= len(items), timeout=10)
    finally:
        pub.close()
        proxy.close()
    recorded = proxy.recorded
    assert len(recorded.published) == len(items)
    assert recorded.acked == recorded.published


GATEWAY_DEVICES = 8


def gateway_scenario(
    settings: Settings, db_url: str, broker_url: str, prefix: str
) -> dict[str, Any]:
    """A fixed rule scenario over 8 devices behind one gateway, run through the service with
    `settings`: every minute one array on the shared topic with a reading of each device (the
    first element's device changing from message to message), and half the devices also on
    their own topic half a minute later; one array with a bad element naming a device the
    first element's worker does not own. What the service wrote, keyed by device index."""
    fleet = make_fleet(db_url, prefix, GATEWAY_DEVICES)
    by_dm = {fleet.bindings[(s, "temperature")]: d for d, s in enumerate(fleet.serials)}
    rule_device = hot_rules(db_url, fleet)
    owner = {s: ownership.device_owner(s, 2) for s in fleet.serials}
    assert set(owner.values()) == {0, 1}, "the fleet must span both workers"
    shared, topic_prefix = settings.mqtt_topics[1], settings.mqtt_topics[0].split("/")[0]
    t0 = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)
    items: list[tuple[str, Any]] = []
    bad_minute = 30
    for minute in range(60):
        at = t0 + timedelta(minutes=minute)
        order = (
            fleet.serials[minute % GATEWAY_DEVICES :] + fleet.serials[: minute % GATEWAY_DEVICES]
        )
        array: list[dict[str, Any]] = []
        for serial in order:
            d = fleet.serials.index(serial)
            hot = (minute // (3 + d)) % 2 == 1
            array.append(
                {
                    "device": serial,
                    "ts": at.isoformat(),
                    "metrics": {"temperature": 30.0 + d if hot else 20.0},
                }
            )
        if minute == bad_minute:
            other = next(s for s in fleet.serials if owner[s] != owner[order[0]])
            array.append({"device": other, "ts": at.isoformat(), "metrics": "not an object"})
        items.append((shared, array))
        for d, serial in enumerate(fleet.serials[::2]):
            own = (at + timedelta(seconds=30)).isoformat()
            value = 29.0 + d if minute % 4 else 21.0
            items.append(
                (
                    f"{topic_prefix}/devices/{serial}/telemetry",
                    {"ts": own, "metrics": {"temperature": value}},
                )
            )
    totals = run_through(settings, broker_url, f"pub-{prefix}", items, burst=23)
    with psycopg.connect(db_url, autocommit=True) as conn:
        events = conn.execute(
            "SELECT rule_id, kind::text, \"timestamp\", context->>'value' FROM events"
        ).fetchall()
        # A state back at its start (ok, nothing pending, never fired) has a row or not
        # depending on where batches were cut: such a row says nothing, and is left out.
        states = conn.execute(
            "SELECT rule_id, status, state FROM rule_states WHERE status <> 'ok'"
            " OR state->>'pending_since' IS NOT NULL OR state->>'last_triggered' IS NOT NULL"
        ).fetchall()
        cursors = conn.execute(
            "SELECT device_metric_id, last_ts, last_value FROM rule_cursors"
            " WHERE device_metric_id = ANY(%s)",
            (list(by_dm),),
        ).fetchall()
        rows = conn.execute(
            "SELECT device_metric_id, ts, value_jsonb FROM telemetries"
            " WHERE device_metric_id = ANY(%s)",
            (list(by_dm),),
        ).fetchall()
        rejected = conn.execute(
            "SELECT p.rejections, m.reason, m.serial_id FROM rejected_payloads p"
            " JOIN rejected_messages m ON m.payload_id = p.id"
            " WHERE convert_from(p.payload, 'UTF8') LIKE %s",
            (f"%{prefix}-%",),
        ).fetchall()
    serial_index = {s: d for d, s in enumerate(fleet.serials)}
    return {
        "messages": len(items),
        "totals": totals,
        "events": sorted(
            (rule_device[r], kind, ts, str(v)) for r, kind, ts, v in events if r in rule_device
        ),
        "states": sorted(
            (rule_device[r], status, json.dumps(state, sort_keys=True))
            for r, status, state in states
            if r in rule_device
        ),
        "cursors": sorted((by_dm[dm], ts, json.dumps(value)) for dm, ts, value in cursors),
        "rows": sorted((by_dm[dm], ts, json.dumps(v, sort_keys=True)) for dm, ts, v in rows),
        "rejected": [(n, reason, serial_index.get(s)) for n, reason, s in rejected],
    }


def test_gateway_arrays_evaluated_as_by_one_process(
    make_settings: Callable[..., Settings], db_url: str, broker_url: str, unique: str
) -> None:
    """Arrays naming devices of both workers on the shared topic: with two workers the events,
    rule states and stored rows equal one process's, every reading stored once, one
    rejected_messages row for the array with a bad element naming the other worker's device,
    every message counted once and acknowledged (none comes back after a restart)."""
    one = gateway_scenario(make_settings(workers=1), db_url, broker_url, f"GA-{unique}")
    two_settings = make_settings(workers=2, mqtt_client_id=f"iothub-test-{unique}-2")
    two = gateway_scenario(two_settings, db_url, broker_url, f"GB-{unique}")
    assert len(one["events"]) > 10, "the scenario fires too little to compare"
    assert two["events"] == one["events"]
    assert two["states"] == one["states"]
    assert two["cursors"] == one["cursors"]
    assert len(one["cursors"]) == GATEWAY_DEVICES and one["states"]
    assert two["rows"] == one["rows"]
    readings = 60 * GATEWAY_DEVICES + 60 * (GATEWAY_DEVICES // 2)
    assert len(two["rows"]) == len(set(two["rows"])) == readings
    assert two["rejected"] == one["rejected"]
    assert [(n, reason) for n, reason, _ in two["rejected"]] == [(1, "bad_schema")]
    for run in (one, two):
        assert run["totals"]["messages"] == run["messages"]
        assert run["totals"]["rows"] == readings
    # Acknowledged: the same session again gets nothing redelivered.
    with running(assemble.build(two_settings, rules_on=True)) as handle:
        time.sleep(2.0)
        assert handle.service.totals["messages"] == 0
