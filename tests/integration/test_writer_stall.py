"""A blocked writer: batches time out and are retried, and /healthz says the writer is stuck.

Real PostgreSQL (a LOCK TABLE or a slow trigger held by the test), real broker, the daemon
in-process.
"""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

import psycopg
from structlog.testing import capture_logs

from config.settings import Settings
from iothub import exitcodes
from iothub.daemon.service import IngestService
from tests.support.fleet import Publisher, count, make_fleet, wait_for

STOP_TIMEOUT = 30.0  # seconds
HTTP_TIMEOUT = 5.0  # seconds


@contextmanager
def daemon(settings: Settings) -> Iterator[IngestService]:
    """The daemon (no rules) in a thread until the block ends; it must stop cleanly (exit 0)."""
    service = IngestService(settings)
    result: dict[str, int] = {}
    thread = threading.Thread(target=lambda: result.setdefault("rc", service.run()), name="svc")
    thread.start()
    try:
        assert service.wait_ready(30), "service did not become ready"
        yield service
    finally:
        service.request_stop("test")
        thread.join(STOP_TIMEOUT)
        assert not thread.is_alive(), "service did not stop"
    assert result.get("rc") == exitcodes.OK


def healthz(service: IngestService) -> tuple[int, dict[str, Any]]:
    url = f"{service.http.url}/healthz"
    try:
        with urllib.request.urlopen(url, timeout=HTTP_TIMEOUT) as r:  # noqa: S310 - our own server
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def events(logs: Sequence[Mapping[str, Any]], name: str) -> list[Mapping[str, Any]]:
    return [e for e in list(logs) if e["event"] == name]


def test_locked_table_times_the_batch_out_and_healthz_reports_the_stalled_writer(
    db_url: str, broker_url: str, make_settings: Callable[..., Settings], unique: str
) -> None:
    """With telemetries locked, the batch fails on lock_timeout and is retried (not
    acknowledged, the writer alive); after writer_stall_timeout /healthz is 503 naming the
    writer; once the lock goes, the reading is stored once and /healthz is 200 again."""
    fleet = make_fleet(db_url, f"SN-{unique}", 1)
    serial = fleet.serials[0]
    dm_id = fleet.bindings[(serial, "temperature")]
    settings = make_settings(ingest_lock_timeout=0.2, writer_stall_timeout=1.0)
    stored = "SELECT count(*) FROM telemetries WHERE device_metric_id = %s"
    ts = datetime.now(UTC).replace(microsecond=0).isoformat()

    with capture_logs() as logs, daemon(settings) as service:
        assert healthz(service)[0] == 200
        with psycopg.connect(db_url) as locker:
            locker.execute("LOCK TABLE telemetries IN ACCESS EXCLUSIVE MODE")
            pub = Publisher(broker_url, f"pub-{unique}")
            try:
                pub.publish(
                    f"t{unique}/devices/{serial}/telemetry",
                    {"ts": ts, "metrics": {"temperature": 7}},
                )
            finally:
                pub.close()
            assert wait_for(lambda: len(events(logs, "batch_timed_out")) >= 2)
            assert wait_for(lambda: healthz(service)[0] == 503)
            status, body = healthz(service)
            pending_while_locked = service.intake.pending
            locker.rollback()
        assert wait_for(lambda: count(db_url, stored, dm_id) == 1)
        assert wait_for(lambda: healthz(service)[0] == 200)
        assert wait_for(lambda: events(logs, "writer_progressing"))

    assert (status, body["down"]) == (503, ["writer"])
    assert body["checks"]["database"] is True
    assert pending_while_locked == 1
    timed_out = events(logs, "batch_timed_out")
    assert all("lock timeout" in e["error"] for e in timed_out)
    assert len(events(logs, "writer_stalled")) == 1
    assert not events(logs, "writer_crashed")
    assert count(db_url, stored, dm_id) == 1


def test_a_statement_over_statement_timeout_is_cancelled_and_the_batch_retried(
    db_url: str, broker_url: str, make_settings: Callable[..., Settings], unique: str
) -> None:
    """A batch whose insert runs past ingest_statement_timeout is cancelled and retried, and
    stored once when the statement gets fast again."""
    fleet = make_fleet(db_url, f"SN-{unique}", 1)
    serial = fleet.serials[0]
    dm_id = fleet.bindings[(serial, "temperature")]
    stored = "SELECT count(*) FROM telemetries WHERE device_metric_id = %s"
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute(
            "CREATE FUNCTION test_slow_insert() RETURNS trigger LANGUAGE plpgsql AS "
            "$$ BEGIN PERFORM pg_sleep(2); RETURN NEW; END $$"
        )
        conn.execute(
            "CREATE TRIGGER test_slow BEFORE INSERT ON telemetries "
            "FOR EACH ROW EXECUTE FUNCTION test_slow_insert()"
        )
    settings = make_settings(ingest_statement_timeout=0.3)
    ts = datetime.now(UTC).replace(microsecond=0).isoformat()

    with capture_logs() as logs, daemon(settings):
        pub = Publisher(broker_url, f"pub-{unique}")
        try:
            pub.publish(
                f"t{unique}/devices/{serial}/telemetry", {"ts": ts, "metrics": {"temperature": 8}}
            )
        finally:
            pub.close()
        assert wait_for(lambda: len(events(logs, "batch_timed_out")) >= 1)
        with psycopg.connect(db_url, autocommit=True) as conn:
            conn.execute("DROP TRIGGER test_slow ON telemetries")
        assert wait_for(lambda: count(db_url, stored, dm_id) == 1)

    assert all("statement timeout" in e["error"] for e in events(logs, "batch_timed_out"))
    assert not events(logs, "writer_crashed")
    assert count(db_url, stored, dm_id) == 1


def test_a_writer_hung_on_a_lock_fails_healthz(
    db_url: str, broker_url: str, make_settings: Callable[..., Settings], unique: str
) -> None:
    """Even with no timeouts at all (0: no limit), a writer that hangs with a message waiting
    turns /healthz to 503 after writer_stall_timeout, while broker and database look fine."""
    fleet = make_fleet(db_url, f"SN-{unique}", 1)
    serial = fleet.serials[0]
    settings = make_settings(
        ingest_lock_timeout=0, ingest_statement_timeout=0, writer_stall_timeout=1.0
    )
    ts = datetime.now(UTC).replace(microsecond=0).isoformat()

    with daemon(settings) as service, psycopg.connect(db_url) as locker:
        locker.execute("LOCK TABLE telemetries IN ACCESS EXCLUSIVE MODE")
        pub = Publisher(broker_url, f"pub-{unique}")
        try:
            pub.publish(
                f"t{unique}/devices/{serial}/telemetry", {"ts": ts, "metrics": {"temperature": 9}}
            )
        finally:
            pub.close()
        assert wait_for(lambda: healthz(service)[0] == 503)
        status, body = healthz(service)
        locker.rollback()
        assert wait_for(lambda: healthz(service)[0] == 200)

    assert (status, body["down"]) == (503, ["writer"])
    assert body["checks"] == {
        "mqtt": True,
        "database": True,
        "database_disk": True,
        "writer": False,
    }
