"""Whatever one stored rule's JSON holds, it makes that rule invalid and nothing else: every path
that reads rules (the engine's cache in a batch, the no-data timer, `iothub rules check`,
`iothub rules backtest`, the stored rule states) goes on with the others."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
from prometheus_client import CollectorRegistry
from psycopg_pool import ConnectionPool
from structlog.testing import capture_logs

from config.settings import Settings
from ingestor.hooks import BatchReading, HookResult
from iothub import exitcodes
from iothub.cli import main as cli
from iothub.daemon.service import IngestService
from rules_engine.engine import RuleEngine
from rules_engine.evaluate import step as evaluator
from rules_engine.evaluate.compile import CompiledRule
from rules_engine.metrics import RuleMetrics
from rules_engine.model import rule_json, templates
from rules_engine.no_data import NoDataWorker
from tests.integration.test_seed import run as run_seed
from tests.integration.test_seed import seeded
from tests.support.daemon import make_service, running
from tests.support.fleet import Publisher, count, make_fleet, wait_for

DEPTH = 3000  # PostgreSQL's jsonb takes this; every recursive decoder in Python raises on it
NOTIFY = {"type": "notify", "channel": "email", "message": "{rule_name}: {value}"}
HOT = {"type": "threshold", "operator": ">", "value": 25}


def nested(depth: int = DEPTH) -> str:
    return "[" * depth + "]" * depth


DEEP_CONDITION = '{"type": "threshold", "operator": ">", "value": ' + nested() + "}"
DEEP_ACTION = '{"type": "mqtt", "topic": "alerts/x", "payload": ' + nested() + "}"
HUGE_IN_LIST = json.dumps(
    {"type": "string_match", "operator": "in", "value": [f"S{i}" for i in range(5_000)]}
)


def insert_rule(dsn: str, dm: int, name: str, condition: str, action: str) -> int:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(
            "INSERT INTO rules (name, condition, action, device_metric_id) "
            "VALUES (%s, %s::jsonb, %s::jsonb, %s) RETURNING id",
            (name, condition, action, dm),
        ).fetchone()
        assert row
        return int(row[0])


def hostile_rules(dsn: str, temp: int, status: int) -> dict[str, int]:
    notify = json.dumps(NOTIFY)
    return {
        "deep condition": insert_rule(dsn, temp, "Deep condition", DEEP_CONDITION, notify),
        "deep action": insert_rule(dsn, temp, "Deep action", json.dumps(HOT), DEEP_ACTION),
        "huge in list": insert_rule(dsn, status, "Huge list", HUGE_IN_LIST, notify),
    }


def reading(dm: int, ts: datetime, value: float) -> BatchReading:
    return BatchReading(dm, ts, value, "numeric", "SN", "Device", "temperature")


def test_deep_and_huge_rules_cost_only_themselves_in_a_batch(db_url: str, unique: str) -> None:
    """A condition or action nested 3,000 deep, or an `in` list of 5,000 strings, is logged as
    rule_invalid with its id and reason and counted in iothub_rules_invalid; the sound rule on
    the same binding still fires in the same batch."""
    fleet = make_fleet(db_url, f"SN-{unique}", 1)
    temp = fleet.bindings[(fleet.serials[0], "temperature")]
    status = fleet.bindings[(fleet.serials[0], "status")]
    bad = hostile_rules(db_url, temp, status)
    good = insert_rule(db_url, temp, "Hot", json.dumps(HOT), json.dumps(NOTIFY))
    metrics = RuleMetrics(CollectorRegistry())
    engine = RuleEngine(Settings(database_url=db_url), metrics)
    ts = datetime.now(UTC).replace(microsecond=0)
    with (
        psycopg.connect(db_url, autocommit=True) as conn,
        capture_logs() as logs,
        conn.transaction(),
    ):
        result = engine.on_inserted(conn, [reading(temp, ts, 30.0)])
    assert result.events == {"triggered": 1}
    invalid = {e["rule_id"]: e["reason"] for e in logs if e["event"] == "rule_invalid"}
    assert invalid == {
        bad["deep condition"]: rule_json.TOO_DEEP,
        bad["deep action"]: rule_json.TOO_DEEP,
        bad["huge in list"]: rule_json.TOO_MANY_ITEMS,
    }
    assert count(db_url, "SELECT count(*) FROM events WHERE rule_id = %s", good) == 1
    gauge = metrics.registry.get_sample_value
    assert gauge("iothub_rules_invalid", {"reason": rule_json.TOO_DEEP}) == 2
    assert gauge("iothub_rules_invalid", {"reason": rule_json.TOO_MANY_ITEMS}) == 1


@pytest.mark.parametrize("column", ["condition", "action"])
def test_the_database_refuses_a_rule_document_the_service_could_not_read(
    db_url: str, unique: str, column: str
) -> None:
    """A condition or action over 65,536 characters is refused when it is written (migration
    0008), so no rule reload ever fetches megabytes of jsonb inside a batch transaction."""
    fleet = make_fleet(db_url, f"SN-{unique}", 1)
    temp = fleet.bindings[(fleet.serials[0], "temperature")]
    big = json.dumps({**HOT, "note": "x" * rule_json.MAX_TEXT_CHARS})
    documents = {"condition": json.dumps(HOT), "action": json.dumps(NOTIFY), column: big}
    with pytest.raises(psycopg.errors.CheckViolation, match=f"rules_{column}_size"):
        insert_rule(db_url, temp, "Huge", documents["condition"], documents["action"])
    # One just under the limit is stored (the service decides what it means).
    fits = json.dumps({**HOT, "note": "x" * 1000})
    assert insert_rule(db_url, temp, "Fits", fits, json.dumps(NOTIFY)) > 0


def test_the_no_data_timer_runs_beside_a_deep_rule(db_url: str, unique: str) -> None:
    """The no-data timer loads the same rules: a deep one beside a no_data rule neither crashes
    the pass nor stops the no_data rule from firing."""
    fleet = make_fleet(db_url, f"SN-{unique}", 1)
    temp = fleet.bindings[(fleet.serials[0], "temperature")]
    status = fleet.bindings[(fleet.serials[0], "status")]
    hostile_rules(db_url, temp, status)
    silent = {"type": "no_data", "minutes": 10}
    insert_rule(db_url, temp, "Silent", json.dumps(silent), json.dumps(NOTIFY))
    engine = RuleEngine(Settings(database_url=db_url), RuleMetrics(CollectorRegistry()))
    last = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=30)
    with psycopg.connect(db_url, autocommit=True) as conn, conn.transaction():
        engine.on_inserted(conn, [reading(temp, last, 20.0)])
    with ConnectionPool(db_url, min_size=1, max_size=1, kwargs={"autocommit": True}) as pool:
        worker = NoDataWorker(engine, pool)
        later = datetime.now(UTC) + timedelta(minutes=45)
        assert worker.check(later) == 1


def test_rules_check_reports_hostile_rules_and_the_others(
    monkeypatch: pytest.MonkeyPatch,
    db_url: str,
    unique: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`iothub rules check` names each hostile rule with its problem and bound, checks the
    rest, and exits 1 (an active rule is being skipped) instead of dying with exit 70."""
    fleet = make_fleet(db_url, f"SN-{unique}", 1)
    temp = fleet.bindings[(fleet.serials[0], "temperature")]
    status = fleet.bindings[(fleet.serials[0], "status")]
    bad = hostile_rules(db_url, temp, status)
    good = insert_rule(db_url, temp, "Hot", json.dumps(HOT), json.dumps(NOTIFY))
    monkeypatch.setenv("IOTHUB_DATABASE_URL", db_url)
    capsys.readouterr()
    code = cli.main(["rules", "check"])
    out = capsys.readouterr().out.splitlines()
    assert code == exitcodes.FAILURE
    by_id = {int(line.split()[1]): line for line in out[:-1]}
    assert by_id[good].endswith(": ok")
    assert by_id[bad["deep condition"]].endswith(
        f": INVALID: condition: nested {DEPTH + 1} levels deep (at most {rule_json.MAX_DEPTH}) "
        f"[{rule_json.TOO_DEEP}]"
    )
    assert f"[{rule_json.TOO_DEEP}]" in by_id[bad["deep action"]]
    assert f"[{rule_json.TOO_MANY_ITEMS}]" in by_id[bad["huge in list"]]
    assert out[-1] == "4 rule(s) checked (4 active, 0 inactive): 1 ok, 3 invalid (3 of them active)"


def test_backtest_of_a_deep_rule_is_refused_with_a_message(
    monkeypatch: pytest.MonkeyPatch,
    db_url: str,
    unique: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`iothub rules backtest` of a stored deep rule, or of a deep --condition, fails with exit 1
    or the usage code and a message naming the bound, not a traceback."""
    fleet = make_fleet(db_url, f"SN-{unique}", 1)
    temp = fleet.bindings[(fleet.serials[0], "temperature")]
    rule = insert_rule(db_url, temp, "Deep", DEEP_CONDITION, json.dumps(NOTIFY))
    monkeypatch.setenv("IOTHUB_DATABASE_URL", db_url)
    capsys.readouterr()
    assert cli.main(["rules", "backtest", "--rule", str(rule)]) == exitcodes.FAILURE
    assert "nested 3001 levels deep" in capsys.readouterr().err
    given = cli.main(["rules", "backtest", "--device-metric", str(temp), "--condition", nested()])
    assert given == exitcodes.USAGE
    assert f"({rule_json.TOO_DEEP})" in capsys.readouterr().err


def test_a_deep_stored_rule_state_is_reset_not_fatal(db_url: str, unique: str) -> None:
    """A rule_states row edited by hand into a deep document is reset (rule_state_reset) and
    the rule evaluates from OK."""
    fleet = make_fleet(db_url, f"SN-{unique}", 1)
    temp = fleet.bindings[(fleet.serials[0], "temperature")]
    rule = insert_rule(db_url, temp, "Hot", json.dumps(HOT), json.dumps(NOTIFY))
    engine = RuleEngine(Settings(database_url=db_url), RuleMetrics(CollectorRegistry()))
    ts = datetime.now(UTC).replace(microsecond=0)
    with psycopg.connect(db_url, autocommit=True) as conn:
        with conn.transaction():
            engine.on_inserted(conn, [reading(temp, ts, 30.0)])  # fires: a state row exists
        conn.execute(
            "UPDATE rule_states SET state = %s::jsonb WHERE rule_id = %s",
            ('{"status": "firing", "nodes": ' + nested() + "}", rule),
        )
        engine.on_failed()  # forget the states kept in memory, as after a restart
        with capture_logs() as logs, conn.transaction():
            result = engine.on_inserted(conn, [reading(temp, ts + timedelta(seconds=1), 31.0)])
    assert [e["rule_id"] for e in logs if e["event"] == "rule_state_reset"] == [rule]
    assert result.events == {"triggered": 1}  # from OK again


def test_the_daemon_ingests_and_runs_sound_rules_beside_hostile_ones(
    make_settings: Callable[..., Settings], db_url: str, broker_url: str, unique: str
) -> None:
    """End to end over the real broker: with hostile rules stored, readings are stored and
    acknowledged, and the sound rule fires; the writer does not crash."""
    fleet = make_fleet(db_url, f"SN-{unique}", 1)
    serial = fleet.serials[0]
    temp = fleet.bindings[(serial, "temperature")]
    hostile_rules(db_url, temp, fleet.bindings[(serial, "status")])
    good = insert_rule(db_url, temp, "Hot", json.dumps(HOT), json.dumps(NOTIFY))
    topic = f"t{unique}/devices/{serial}/telemetry"
    now = datetime.now(UTC).replace(microsecond=0)
    pub = Publisher(broker_url, f"pub-{unique}")
    try:
        with running(make_service(make_settings())) as handle:
            for second, value in ((2, 20.0), (1, 30.0)):
                body: dict[str, Any] = {
                    "ts": (now - timedelta(seconds=second)).isoformat(),
                    "metrics": {"temperature": value, "status": "OK"},
                }
                pub.publish(topic, body)
            assert wait_for(lambda: handle.service.totals["rows"] >= 4)
            assert wait_for(
                lambda: count(db_url, "SELECT count(*) FROM events WHERE rule_id = %s", good)
            )
    finally:
        pub.close()
    assert handle.exit_code == exitcodes.OK


def test_seed_sees_a_deep_seeded_rule_as_changed(
    db_url: str,
    conn: psycopg.Connection,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`iothub seed` compares the seeded rules with what is stored: a seeded rule made 3,000
    deep is a difference (the run refuses, exit 4), and --force restores it; neither dies."""
    seeded(monkeypatch, capsys, db_url)
    row = conn.execute("SELECT id FROM rules ORDER BY id LIMIT 1").fetchone()
    assert row
    conn.execute("UPDATE rules SET condition = %s::jsonb WHERE id = %s", (DEEP_CONDITION, row[0]))
    refused = run_seed(monkeypatch, capsys, db_url)
    assert refused.code == exitcodes.REFUSED
    assert "condition" in refused.events("seed_refused")[0]["differences"][0]
    assert run_seed(monkeypatch, capsys, db_url, "--force").code == exitcodes.OK
    assert run_seed(monkeypatch, capsys, db_url).code == exitcodes.OK


class CrashingHook:
    """A batch hook with a bug: it raises something that is not a database error."""

    def on_inserted(self, conn: psycopg.Connection, rows: Sequence[BatchReading]) -> HookResult:
        raise RuntimeError("a bug in the hook")

    def on_failed(self) -> None:
        pass


def test_a_crashed_writer_does_not_report_a_flushed_stop(
    make_settings: Callable[..., Settings], db_url: str, broker_url: str, unique: str
) -> None:
    """When the writer crashes (exit 70), its batch is left to the broker, so the stop line
    says flushed false instead of claiming a clean flush."""
    fleet = make_fleet(db_url, f"SN-{unique}", 1)
    serial = fleet.serials[0]
    service = IngestService(make_settings(), hook=CrashingHook())
    pub = Publisher(broker_url, f"pub-{unique}")
    try:
        with capture_logs() as logs, running(service) as handle:
            body = {"ts": datetime.now(UTC).isoformat(), "metrics": {"temperature": 20.0}}
            pub.publish(f"t{unique}/devices/{serial}/telemetry", body)
            assert wait_for(lambda: any(e["event"] == "writer_crashed" for e in logs))
            handle.thread.join(30)
    finally:
        pub.close()
    assert handle.exit_code == exitcodes.CRASH
    assert [e["flushed"] for e in logs if e["event"] == "service_stopped"] == [False]


def test_a_no_data_rule_that_raises_costs_only_itself(
    db_url: str, unique: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug in one no_data rule's check (injected: no valid input raises there) skips that
    rule for the pass, logged once and counted; the other no_data rule still fires."""
    fleet = make_fleet(db_url, f"SN-{unique}", 1)
    temp = fleet.bindings[(fleet.serials[0], "temperature")]
    silent = json.dumps({"type": "no_data", "minutes": 10})
    broken = insert_rule(db_url, temp, "Broken", silent, json.dumps(NOTIFY))
    sound = insert_rule(db_url, temp, "Sound", silent, json.dumps(NOTIFY))
    metrics = RuleMetrics(CollectorRegistry())
    engine = RuleEngine(Settings(database_url=db_url), metrics)
    with psycopg.connect(db_url, autocommit=True) as conn, conn.transaction():
        engine.on_inserted(conn, [reading(temp, datetime.now(UTC), 20.0)])
    real = evaluator.check_no_data

    def check_no_data(rule: CompiledRule, *args: Any, **kw: Any) -> Any:
        if rule.rule_id == broken:
            raise ZeroDivisionError("a bug")
        return real(rule, *args, **kw)

    monkeypatch.setattr(evaluator, "check_no_data", check_no_data)
    later = datetime.now(UTC) + timedelta(minutes=30)
    with (
        ConnectionPool(db_url, min_size=1, max_size=1, kwargs={"autocommit": True}) as pool,
        capture_logs() as logs,
    ):
        worker = NoDataWorker(engine, pool)
        assert worker.check(later) == 1
        assert worker.check(later + timedelta(minutes=1)) == 0  # sound one is firing already
    assert [e["rule_id"] for e in logs if e["event"] == "rule_no_data_failed"] == [broken]
    assert count(db_url, "SELECT count(*) FROM events WHERE rule_id = %s", sound) == 1
    failures = metrics.registry.get_sample_value
    assert failures("iothub_rule_failures_total", {"stage": "no_data"}) == 2


def test_a_rule_whose_message_cannot_be_rendered_still_gets_its_event(
    db_url: str, unique: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug while rendering one rule's message (injected) writes that rule's event with a
    plain message and no delivery; the other rule's event and delivery are untouched."""
    fleet = make_fleet(db_url, f"SN-{unique}", 1)
    temp = fleet.bindings[(fleet.serials[0], "temperature")]
    poison = {"type": "notify", "channel": "email", "message": "POISON {value}"}
    broken = insert_rule(db_url, temp, "Broken", json.dumps(HOT), json.dumps(poison))
    sound = insert_rule(db_url, temp, "Sound", json.dumps(HOT), json.dumps(NOTIFY))
    real = templates.render

    def render(template: str, context: Any, **kw: Any) -> str:
        if template.startswith("POISON"):
            raise MemoryError("a bug")
        return real(template, context, **kw)

    monkeypatch.setattr(templates, "render", render)
    engine = RuleEngine(Settings(database_url=db_url), RuleMetrics(CollectorRegistry()))
    with (
        psycopg.connect(db_url, autocommit=True) as conn,
        capture_logs() as logs,
        conn.transaction(),
    ):
        result = engine.on_inserted(conn, [reading(temp, datetime.now(UTC), 30.0)])
    assert result.events == {"triggered": 2}
    assert [e["rule_id"] for e in logs if e["event"] == "rule_render_failed"] == [broken]
    with psycopg.connect(db_url, autocommit=True) as conn:
        messages: dict[int, str] = dict(
            conn.execute("SELECT rule_id, context->>'message' FROM events").fetchall()
        )
        outbox = [r[0] for r in conn.execute("SELECT rule_id FROM action_outbox")]
    assert messages[broken] == "Broken: triggered (message could not be rendered)"
    assert messages[sound] == "Sound: 30.0"
    assert outbox == [sound]


def test_a_deep_cursor_value_is_reset_not_fatal(db_url: str, unique: str) -> None:
    """A rule_cursors row whose last value was edited by hand into a deep document is read as
    "no previous value" (rule_cursor_value_reset); the batch and its rules go on."""
    fleet = make_fleet(db_url, f"SN-{unique}", 1)
    temp = fleet.bindings[(fleet.serials[0], "temperature")]
    insert_rule(db_url, temp, "Hot", json.dumps(HOT), json.dumps(NOTIFY))
    engine = RuleEngine(Settings(database_url=db_url), RuleMetrics(CollectorRegistry()))
    ts = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=1)
    with psycopg.connect(db_url, autocommit=True) as conn:
        with conn.transaction():
            engine.on_inserted(conn, [reading(temp, ts, 20.0)])
        conn.execute("UPDATE rule_cursors SET last_value = %s::jsonb", (nested(),))
        engine.on_failed()  # forget the states kept in memory, as after a restart
        with capture_logs() as logs, conn.transaction():
            result = engine.on_inserted(conn, [reading(temp, ts + timedelta(seconds=1), 31.0)])
    assert [e["device_metric_id"] for e in logs if e["event"] == "rule_cursor_value_reset"] == [
        temp
    ]
    assert result.events == {"triggered": 1}
