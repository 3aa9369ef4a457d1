"""Active/standby through a database outage: the active holds its acknowledgements and makes
no broker connection while its election lock is unconfirmed, takes the lock back when the
database answers, and leaves the broker for good when another instance has it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
import pytest

from config.settings import Settings
from ingestor import mqtt as mqttclient
from ingestor import sources
from ingestor.intake import RECONNECT_MIN, MqttIntake
from iothub.daemon.election import Election
from schema import locks
from tests.integration.test_faults import check_no_loss, daemon_env
from tests.integration.test_ingest_edge_cases import take
from tests.integration.test_standby import (
    Series,
    Stream,
    Watched,
    Watcher,
    _healthz,
    _http_port,
    _rows,
    _wait,
    check_one_instance,
    settle,
)
from tests.support.daemon import make_service, running
from tests.support.faults import Daemon, NumberedPublisher
from tests.support.fleet import Publisher, make_fleet
from tests.support.services import LocalPostgres

pytestmark = pytest.mark.slow

# Seconds a session taken over by another connection is watched for a reconnect: paho would
# try again after RECONNECT_MIN, so three times that shows it does not.
NO_RECONNECT_WATCH = 3.0 * RECONNECT_MIN + 1.0
READINGS = 3000  # of the outage test's stream, per device


class Thief:
    """A connection with someone else's client id, as the instance that took the lock makes
    it: persistent session, manual acknowledgements (it acknowledges nothing), and it
    records whether the broker ever disconnected it."""

    def __init__(self, broker_url: str, client_id: str) -> None:
        self.client = mqttclient.make_client(broker_url, client_id, manual_ack=True)
        self.connected = threading.Event()
        self.kicked = threading.Event()
        self.client.on_connect = lambda *args: self.connected.set()
        self.client.on_disconnect = lambda *args: self.kicked.set()
        self._broker_url = broker_url

    def connect(self) -> None:
        props = mqttclient.connect_properties(
            session_expiry=300, receive_maximum=100, maximum_packet_size=1 << 20
        )
        host, port = mqttclient.host_port(self._broker_url)
        self.client.connect_async(host, port, clean_start=False, properties=props)
        self.client.loop_start()
        assert self.connected.wait(10), "the second connection was not accepted"

    def leave(self) -> None:
        """Disconnect cleanly; the session (and what it holds) stays on the broker."""
        self.kicked.clear()
        self.client.disconnect()
        mqttclient.stop_loop(self.client)


@contextmanager
def _intake(settings: Settings) -> Iterator[MqttIntake]:
    intake = MqttIntake(settings, sources.router_for(settings.mqtt_topics, ()))
    intake.start()
    try:
        assert intake.ever_connected.wait(10), "the intake did not connect"
        yield intake
    finally:
        intake.stop()


def test_a_held_intake_keeps_its_acks_and_does_not_take_the_session_back(
    make_settings: Callable[..., Settings], broker_url: str, unique: str
) -> None:
    """While held, acknowledgements wait (their room still counted) and a session taken over
    by another connection with our client id is not taken back, past paho's reconnect delay;
    `resume()` sends what waited on the same connection, skips it after a takeover, and lets
    paho reconnect, which gets exactly the unacknowledged messages again."""
    settings = make_settings()
    topic = f"t{unique}/telemetry"
    pub = Publisher(broker_url, f"pub-{unique}")
    with _intake(settings) as intake:
        # On the same connection: held, then sent by resume().
        for i in range(5):
            pub.publish(topic, {"n": i})
        first = take(intake, 5)
        intake.hold()
        intake.ack(first)
        assert intake.pending == 5, "held acknowledgements must keep their room"
        assert intake.resume() == 5
        assert intake.pending == 0
        # Held across a takeover: never sent, and no reconnect while held.
        for i in range(5, 8):
            pub.publish(topic, {"n": i})
        second = take(intake, 3)
        intake.hold()
        intake.ack(second)
        thief = Thief(broker_url, settings.mqtt_client_id)
        thief.connect()
        _wait(lambda: not intake.connected, 10, "the broker to drop the held intake")
        time.sleep(NO_RECONNECT_WATCH)
        assert not thief.kicked.is_set(), "the held intake took the session back"
        assert not intake.connected
        thief.leave()
        stale_before = intake.stale_acks
        assert intake.resume() == 3
        assert intake.stale_acks == stale_before + 3, "acks of the old connection were sent"
        _wait(lambda: intake.connected, 10, "the intake to reconnect after resume()")
        again = take(intake, 3)
        assert sorted(m.payload for m in again) == sorted(m.payload for m in second)
        intake.ack(again)
    pub.close()
    # Everything was acknowledged in the end: a new connection of the session gets nothing.
    with _intake(settings) as check:
        assert check.take(10, 2.0) == []


def _lock_holder_pid(conn: psycopg.Connection, client_id: str) -> int:
    row = conn.execute(
        "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted AND classid = %s"
        " AND objid = %s::int::oid AND objsubid = 2",
        (locks.STANDBY_CLASS, locks.standby_key(client_id)),
    ).fetchone()
    assert row, "no granted election lock"
    return int(row[0])


def test_an_election_takes_its_lock_back_or_finds_it_taken(
    make_settings: Callable[..., Settings], db_url: str
) -> None:
    """The server ends the lock's session: with the lock free, the guard reports it
    unconfirmed, takes it back on a new session and reports it regained; when another
    session took it meanwhile, it reports it unconfirmed, then lost."""
    settings = make_settings()
    election = Election(settings, threading.Event())
    assert election.acquire(on_wait=lambda: None)
    watcher = Watcher()
    election.guard(watcher)
    try:
        with psycopg.connect(db_url, autocommit=True) as admin:
            admin.execute(
                "SELECT pg_terminate_backend(%s)",
                (_lock_holder_pid(admin, settings.mqtt_client_id),),
            )
            _wait(lambda: "regained" in watcher.calls, 10, "the lock taken back")
            assert election.role == "active"
            assert watcher.calls[0].startswith("unconfirmed: lock connection failed")
            assert watcher.calls[1:] == ["regained"]
            admin.execute(
                "SELECT pg_terminate_backend(%s), pg_advisory_lock(%s, %s)",
                (
                    _lock_holder_pid(admin, settings.mqtt_client_id),
                    locks.STANDBY_CLASS,
                    locks.standby_key(settings.mqtt_client_id),
                ),
            )
            _wait(lambda: election.role == "fenced", 10, "the lock found taken")
        assert watcher.calls[2].startswith("unconfirmed: ")
        assert watcher.calls[3:] == ["lost: another instance holds the lock"]
    finally:
        election.release()


def test_an_active_whose_lock_was_taken_while_cut_off_never_reconnects(
    *, pg_admin_dsn: str, db_url: str, broker_url: str, unique: str, tmp_path: Path
) -> None:
    """The active's lock session ends and another session takes the lock while the active
    cannot reach the database: it holds its acknowledgements, a new active's broker
    connection is not taken back, and once the database answers it sees the lock taken and
    exits 69. Restarted, the instance that then gets the lock stores every acknowledged
    reading once."""
    env = daemon_env(db_url, broker_url, unique)
    client_id = env["IOTHUB_MQTT_CLIENT_ID"]
    fleet = make_fleet(db_url, f"SN-{unique}", 1)
    serial = fleet.serials[0]
    dm_id = fleet.bindings[(serial, "temperature")]
    daemon = Daemon(env, tmp_path / "daemon.log")
    daemon.start()
    daemon.wait_log("service_ready")
    pub = NumberedPublisher(broker_url, f"t{unique}/devices/{serial}/telemetry", n=1500, rate=300)
    pub.run()
    time.sleep(1.0)
    dbname = psycopg.conninfo.conninfo_to_dict(db_url)["dbname"]
    with (
        psycopg.connect(db_url, autocommit=True) as taker,
        psycopg.connect(pg_admin_dsn, autocommit=True) as admin,
    ):
        # New sessions are refused (the daemon's pool and catalogue keep theirs): the daemon's
        # attempts to take its lock back fail, as if the network to the database were cut.
        admin.execute(f'ALTER DATABASE "{dbname}" ALLOW_CONNECTIONS false')
        try:
            pid = _lock_holder_pid(taker, client_id)
            # One statement: the lock is ours the moment the daemon's session frees it.
            taker.execute(
                "SELECT pg_terminate_backend(%s), pg_advisory_lock(%s, %s)",
                (pid, locks.STANDBY_CLASS, locks.standby_key(client_id)),
            )
            daemon.wait_log("lock_unconfirmed")
            daemon.wait_log("lock_retry")
            # The instance that has the lock now connects to the broker, as a standby would.
            thief = Thief(broker_url, client_id)
            thief.connect()
            daemon.wait_log("mqtt_disconnected")
            time.sleep(NO_RECONNECT_WATCH)
            assert not thief.kicked.is_set(), f"the daemon took the session back: {daemon.tail()}"
            assert daemon.alive()
            status, body = _healthz(_http_port(daemon))
            assert (status, body["role"]) == (503, "unconfirmed")
        finally:
            admin.execute(f'ALTER DATABASE "{dbname}" ALLOW_CONNECTIONS true')
        assert daemon.process is not None
        assert daemon.process.wait(30) == 69
        log = daemon.log_path.read_text()
        assert "another instance holds the lock" in log
        assert log.count('"event": "mqtt_connected"') == 1
        assert not thief.kicked.is_set()
        thief.leave()
    # The lock is free again (the taker's session ended): the restarted daemon is the active
    # and gets everything that was not acknowledged.
    daemon.start()
    daemon.wait_log("service_ready", occurrences=2)
    pub.wait(60)
    check_no_loss(db_url, dm_id, pub, daemon)
    assert daemon.terminate() == 0


def _role(daemon: Daemon) -> str:
    return str(_healthz(_http_port(daemon))[1]["role"])


def test_a_database_restart_under_a_pair_leaves_one_active_and_the_events_of_one_instance(
    *,
    make_settings: Callable[..., Settings],
    local_postgres: LocalPostgres,
    db_url: str,
    broker_url: str,
    unique: str,
    tmp_path: Path,
) -> None:
    """PostgreSQL under an active/standby pair stopped with `-m immediate` mid-stream and
    started again: exactly one instance is active afterwards (the other a standby, restarted
    as its supervisor would if it exited 69), every acknowledged reading is stored once, and
    the rule events equal those of one uninterrupted instance (on the other database)."""
    dsn = psycopg.conninfo.make_conninfo(local_postgres.admin_dsn, dbname="iothub")
    tested_fleet = make_fleet(dsn, f"SN-{unique}", 1)
    tested = tested_fleet.serials[0]
    ref_fleet = make_fleet(db_url, f"SR-{unique}", 1)
    reference = ref_fleet.serials[0]
    tested_dms = Watched.with_scenarios(dsn, tested_fleet.bindings, tested)
    reference_dms = Watched.with_scenarios(db_url, ref_fleet.bindings, reference)
    env = daemon_env(dsn, broker_url, unique)
    pair = [Daemon(env, tmp_path / "a.log"), Daemon(env, tmp_path / "b.log")]
    pair[0].start()
    pair[0].wait_log("service_ready")
    pair[1].start()
    pair[1].wait_log("standby")
    series = Series.make(READINGS)
    ref = make_service(
        make_settings(
            mqtt_client_id=f"ref-{unique}",
            mqtt_topics=(f"r{unique}/devices/{{serial_id}}/telemetry",),
        )
    )
    try:
        with running(ref):
            stream = Stream(
                broker_url,
                (
                    f"t{unique}/devices/{tested}/telemetry",
                    f"r{unique}/devices/{reference}/telemetry",
                ),
                series,
            )
            stream.thread.start()
            time.sleep(2.0)
            assert _rows(dsn, tested_dms.temperature)[0] > 0, f"nothing stored: {pair[0].tail()}"
            local_postgres.stop("immediate")
            time.sleep(2.0)
            local_postgres.start()
            assert stream.done.wait(90), "the stream did not finish"
            assert stream.acked, "the broker acknowledged nothing: the test proves nothing"
            settle(stream, tested_dms, reference_dms, timeout=90)
        for daemon in pair:
            if not daemon.alive():
                assert daemon.process is not None
                assert daemon.process.returncode == 69, daemon.tail()
                daemon.start()  # what systemd's Restart=on-failure does
                daemon.wait_log("standby", occurrences=2)
        roles = sorted(_role(daemon) for daemon in pair)
        assert roles == ["active", "standby"], [daemon.tail() for daemon in pair]
        check_one_instance(stream, tested_dms, reference_dms)
        for daemon in pair:
            assert daemon.terminate() == 0
    finally:
        for daemon in pair:
            if daemon.alive():
                daemon.kill9()
