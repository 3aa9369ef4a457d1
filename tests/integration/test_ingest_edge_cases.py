"""The traps of at-least-once ingestion, each on real servers."""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg

from config.settings import Settings
from config.topics import TopicRouter
from ingestor.intake import MqttIntake
from ingestor.messages import InboundMessage
from iothub.daemon.service import IngestService
from tests.integration.test_faults import daemon_env
from tests.support.daemon import running
from tests.support.faults import Daemon, refuse_value
from tests.support.fleet import Publisher, count, make_fleet, wait_for
from tests.support.services import LocalMosquitto, LocalPostgres


def test_acks_from_a_previous_connection_are_never_sent(
    make_settings: Callable[..., Settings], local_mosquitto: LocalMosquitto, unique: str
) -> None:
    """Message ids are only valid on the connection that delivered them: after a reconnect the
    old acknowledgements are skipped, the broker redelivers, and the new copies are acked."""
    settings = make_settings(mqtt_url=local_mosquitto.url)
    intake = MqttIntake(settings, TopicRouter.from_strings(settings.mqtt_topics))
    intake.start()
    pub = Publisher(local_mosquitto.url, f"pub-{unique}")
    try:
        assert intake.ever_connected.wait(10)
        for i in range(5):
            pub.publish(f"t{unique}/devices/SN-1/telemetry", {"metrics": {"temperature": i}})
        first = take(intake, 5)
        pub.close()
        local_mosquitto.stop()  # the session is saved: persistence is on
        assert wait_for(lambda: not intake.connected)
        local_mosquitto.start()
        assert wait_for(lambda: intake.connected, timeout=30)
        intake.ack(first)
        assert intake.stale_acks == 5
        again = take(intake, 5)
        assert sorted(m.payload for m in again) == sorted(m.payload for m in first)
        assert all(m.dup for m in again)
        intake.ack(again)
        assert intake.stale_acks == 5
        assert intake.pending == 0
    finally:
        intake.stop()


def take(intake: MqttIntake, n: int, timeout: float = 15.0) -> list[InboundMessage]:
    got: list[InboundMessage] = []
    deadline = time.monotonic() + timeout
    while len(got) < n and time.monotonic() < deadline:
        got += intake.take(n - len(got), 0.1)
    assert len(got) == n, f"received {len(got)} of {n}"
    return got


def test_a_device_added_while_running_is_accepted_within_a_second(
    make_settings: Callable[..., Settings], db_url: str, broker_url: str, unique: str
) -> None:
    """A device inserted into the database is known to the running daemon without a restart."""
    service = IngestService(make_settings())
    with running(service):
        fleet = make_fleet(db_url, f"SN-{unique}", 1)
        time.sleep(1.0)
        pub = Publisher(broker_url, f"pub-{unique}")
        try:
            pub.publish(
                f"t{unique}/devices/{fleet.serials[0]}/telemetry", {"metrics": {"temperature": 1.5}}
            )
        finally:
            pub.close()
        assert wait_for(lambda: service.totals["rows"] + service.totals["rejected"] >= 1)
    assert count(db_url, "SELECT count(*) FROM telemetries") == 1
    assert count(db_url, "SELECT count(*) FROM rejected_messages") == 0


def test_a_row_the_server_refuses_costs_only_itself(
    make_settings: Callable[..., Settings], db_url: str, broker_url: str, unique: str
) -> None:
    """A reading the database refuses (here a trigger raises a data exception for one value)
    is isolated by bisection and recorded as storage_error; the rest of its batch is stored."""
    fleet = make_fleet(db_url, f"SN-{unique}", 1)
    serial = fleet.serials[0]
    refuse_value(db_url, "poison")
    now = datetime.now(UTC).replace(microsecond=0)
    service = IngestService(make_settings(batch_interval=1.0))
    with running(service):
        pub = Publisher(broker_url, f"pub-{unique}")
        try:
            for i in range(40):
                status = "poison" if i == 17 else "OK"
                pub.publish(
                    f"t{unique}/devices/{serial}/telemetry",
                    {"ts": (now - timedelta(seconds=i)).isoformat(), "metrics": {"status": status}},
                )
        finally:
            pub.close()
        assert wait_for(lambda: service.totals["messages"] >= 40)
    assert count(db_url, "SELECT count(*) FROM telemetries") == 39
    assert (
        count(
            db_url,
            "SELECT count(*) FROM rejected_messages WHERE reason = 'storage_error'"
            " AND detail LIKE %s",
            "%refused by policy%",
        )
        == 1
    )


def test_second_signal_exits_at_once(
    local_postgres: LocalPostgres, broker_url: str, unique: str, tmp_path: Path
) -> None:
    """With the database gone the first SIGTERM waits to flush; a second one exits at once
    with the interrupted code, leaving the messages to the broker."""
    dsn = psycopg.conninfo.make_conninfo(local_postgres.admin_dsn, dbname="iothub")
    fleet = make_fleet(dsn, f"SN-{unique}", 1)
    daemon = Daemon(
        daemon_env(dsn, broker_url, unique) | {"IOTHUB_SHUTDOWN_TIMEOUT": "60"},
        tmp_path / "daemon.log",
    )
    daemon.start()
    daemon.wait_log("service_ready")
    local_postgres.stop("immediate")
    pub = Publisher(broker_url, f"pub-{unique}")
    try:
        pub.publish(
            f"t{unique}/devices/{fleet.serials[0]}/telemetry", {"metrics": {"temperature": 3}}
        )
    finally:
        pub.close()
    daemon.wait_log("db_unavailable")
    assert daemon.process is not None
    daemon.process.send_signal(signal.SIGTERM)
    daemon.wait_log("service_stopping")
    time.sleep(0.5)
    assert daemon.alive()
    started = time.monotonic()
    daemon.process.send_signal(signal.SIGTERM)
    assert daemon.process.wait(10) == 130
    assert time.monotonic() - started < 5


def test_a_read_only_database_is_retried_not_fatal(
    make_settings: Callable[..., Settings], db_url: str, broker_url: str, unique: str
) -> None:
    """A session that became read-only (as after a failover onto a standby) is an outage: the
    batch is retried on a fresh connection, and stored once the database accepts writes."""
    fleet = make_fleet(db_url, f"SN-{unique}", 1)
    dbname = psycopg.conninfo.conninfo_to_dict(db_url)["dbname"]
    service = IngestService(make_settings())
    with running(service):
        with psycopg.connect(db_url, autocommit=True) as conn:
            conn.execute(f'ALTER DATABASE "{dbname}" SET default_transaction_read_only = on')
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE application_name = 'iothub-ingest'"
            )
        pub = Publisher(broker_url, f"pub-{unique}")
        try:
            pub.publish(
                f"t{unique}/devices/{fleet.serials[0]}/telemetry", {"metrics": {"temperature": 7}}
            )
        finally:
            pub.close()
        assert wait_for(lambda: not service.db_ok, timeout=20)
        with psycopg.connect(db_url, autocommit=True) as conn:
            conn.execute("SET default_transaction_read_only = off")
            conn.execute(f'ALTER DATABASE "{dbname}" RESET default_transaction_read_only')
        assert wait_for(lambda: service.totals["rows"] == 1, timeout=30)
        assert service.fatal is None
    assert count(db_url, "SELECT count(*) FROM telemetries") == 1
