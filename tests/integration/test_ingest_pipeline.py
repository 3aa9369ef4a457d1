"""The ingestion daemon end to end: real broker, real database, in-process service."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta

import pytest

from config.settings import Settings
from iothub.daemon.service import IngestService
from tests.support.fleet import Publisher, count, make_fleet, wait_for


@pytest.fixture
def running(make_settings: Callable[..., Settings]) -> Iterator[Callable[..., IngestService]]:
    started: list[tuple[IngestService, threading.Thread]] = []

    def start(**overrides: object) -> IngestService:
        service = IngestService(make_settings(**overrides))
        result: dict[str, int] = {}
        thread = threading.Thread(
            target=lambda: result.setdefault("rc", service.run()), name="test-service"
        )
        thread.start()
        assert service.wait_ready(30), "service did not become ready"
        started.append((service, thread))
        return service

    yield start
    for service, thread in started:
        service.request_stop("test over")
        thread.join(30)
        assert not thread.is_alive()


def test_readings_are_stored_once_and_bad_ones_rejected_with_reason(
    running: Callable[..., IngestService], db_url: str, broker_url: str, unique: str
) -> None:
    """Good readings land in telemetries, bad neighbours in rejected_messages, none lost."""
    fleet = make_fleet(db_url, f"SN-{unique}", 2)
    service = running()
    pub = Publisher(broker_url, f"pub-{unique}")
    now = datetime.now(UTC).replace(microsecond=0)
    serial = fleet.serials[0]
    try:
        pub.publish(
            f"t{unique}/devices/{serial}/telemetry",
            {
                "ts": now.isoformat(),
                "metrics": {
                    "temperature": 21.5,
                    "humidity": "wet",
                    "online": True,
                    "status": "OK",
                    "nosuch": 1,
                },
            },
        )
        pub.publish(
            f"t{unique}/telemetry",
            [
                {
                    "device": fleet.serials[1],
                    "ts": (now - timedelta(minutes=1)).isoformat(),
                    "metrics": {"temperature": {"value": 19, "unit": "celsius"}},
                },
                {"device": "SN-UNKNOWN", "metrics": {"temperature": 1}},
            ],
        )
        pub.publish(f"t{unique}/devices/{serial}/telemetry", b"{not json")
        assert wait_for(lambda: count(db_url, "SELECT count(*) FROM rejected_messages") >= 4)
        assert wait_for(lambda: count(db_url, "SELECT count(*) FROM telemetries") >= 4)
        # The same reading again (a redelivery) is dropped by the unique key.
        pub.publish(
            f"t{unique}/devices/{serial}/telemetry",
            {"ts": now.isoformat(), "metrics": {"temperature": 21.5}},
        )
        assert wait_for(lambda: service.totals["duplicates"] >= 1)
    finally:
        pub.close()
    assert count(db_url, "SELECT count(*) FROM telemetries") == 4
    assert count(db_url, "SELECT count(*) FROM telemetries WHERE value_numeric = 21.5") == 1
    reasons = {
        r: count(db_url, "SELECT count(*) FROM rejected_messages WHERE reason = %s", r)
        for r in ("type_mismatch", "unknown_metric", "unknown_device", "bad_json")
    }
    assert reasons == {"type_mismatch": 1, "unknown_metric": 1, "unknown_device": 1, "bad_json": 1}
