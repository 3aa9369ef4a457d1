"""`iothub rules check` and `iothub rules backtest`, run in-process against a real database."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
from psycopg.types.json import Jsonb

from config.settings import Settings
from iothub import exitcodes
from iothub.cli import main as cli
from iothub.cli import rules as commands
from tests.support.fleet import Fleet, make_fleet

T0 = datetime(2026, 1, 27, 12, 0, tzinfo=UTC)
THRESHOLD_10_MIN = {"type": "threshold", "operator": ">", "value": 27.5, "duration_minutes": 10}
NOTIFY = {"type": "notify", "channel": "email", "message": "High temperature: {value}"}
# (minutes after T0, temperature): above 27.5 from minute 1, so it fires at minute 11; back
# below at 15 (resolved); above again at 20 but only for 5 minutes (no event).
HISTORY = [
    (0, 25.0),
    (1, 28.0),
    (5, 29.0),
    (11, 30.0),
    (12, 31.0),
    (15, 20.0),
    (20, 28.0),
    (25, 26.0),
]


@pytest.fixture
def fleet(db_url: str, unique: str) -> Fleet:
    return make_fleet(db_url, f"SN-{unique}", 1)


@pytest.fixture
def run(monkeypatch: pytest.MonkeyPatch, db_url: str, capsys: pytest.CaptureFixture[str]) -> Any:
    """Runs `iothub <args>` in-process; returns (exit code, stdout lines, stderr)."""
    monkeypatch.setenv("IOTHUB_DATABASE_URL", db_url)

    def invoke(*args: str) -> tuple[int, list[str], str]:
        capsys.readouterr()
        code = cli.main(list(args))
        out, err = capsys.readouterr()
        return code, out.splitlines(), err

    return invoke


def add_rule(
    conn: psycopg.Connection,
    dm: int,
    name: str,
    condition: Any,
    *,
    action: Any = NOTIFY,
    active: bool = True,
) -> int:
    row = conn.execute(
        "INSERT INTO rules (name, condition, action, is_active, device_metric_id) "
        "VALUES (%s, %s, %s, %s, %s) RETURNING id",
        (name, Jsonb(condition), Jsonb(action), active, dm),
    ).fetchone()
    assert row
    return int(row[0])


def add_history(conn: psycopg.Connection, dm: int) -> None:
    with conn.cursor() as cur:
        cur.executemany(
            "INSERT INTO telemetries (device_metric_id, ts, value_jsonb) VALUES (%s, %s, %s)",
            [(dm, T0 + timedelta(minutes=m), Jsonb({"t": "numeric", "v": v})) for m, v in HISTORY],
        )


def snapshot(conn: psycopg.Connection) -> tuple[Any, ...]:
    """Everything a rule evaluation could write, as one comparable value."""
    row = conn.execute(
        "SELECT (SELECT count(*) FROM events), (SELECT count(*) FROM rule_states),"
        " (SELECT count(*) FROM action_outbox), (SELECT count(*) FROM telemetries)"
    ).fetchone()
    assert row
    return tuple(row)


def at(minutes: int) -> str:
    return (T0 + timedelta(minutes=minutes)).isoformat()


# --- check


def test_check_valid_rules_exits_ok_with_one_line_per_rule(
    run: Any, conn: psycopg.Connection, fleet: Fleet
) -> None:
    """Valid rules, active or not, are listed as ok with their binding; the exit code is 0."""
    serial = fleet.serials[0]
    temp = fleet.bindings[(serial, "temperature")]
    online = fleet.bindings[(serial, "online")]
    high = add_rule(conn, temp, "High temp", THRESHOLD_10_MIN)
    offline = add_rule(
        conn, online, "Offline", {"type": "boolean", "operator": "==", "value": False}, active=False
    )
    code, out, _ = run("rules", "check")
    assert code == exitcodes.OK
    assert out == [
        f'rule {high} "High temp" on {serial}/temperature: ok',
        f'rule {offline} "Offline" on {serial}/online (inactive): ok',
        "2 rule(s) checked (1 active, 1 inactive): 2 ok, 0 invalid",
    ]


def test_check_names_the_rule_and_the_problem_and_fails_on_an_active_invalid_rule(
    run: Any, conn: psycopg.Connection, fleet: Fleet
) -> None:
    """An invalid active rule gives exit 1 and a line with its id and the precise problem."""
    serial = fleet.serials[0]
    temp = fleet.bindings[(serial, "temperature")]
    status = fleet.bindings[(serial, "status")]
    good = add_rule(conn, temp, "High temp", THRESHOLD_10_MIN)
    on_text = add_rule(
        conn, status, "Status high", {"type": "threshold", "operator": ">", "value": 3}
    )
    typo = add_rule(conn, temp, "Typo", {**THRESHOLD_10_MIN, "duraton_minutes": 5}, active=False)
    code, out, _ = run("rules", "check")
    assert code == exitcodes.FAILURE
    assert out[0] == f'rule {good} "High temp" on {serial}/temperature: ok'
    assert out[1] == (
        f'rule {on_text} "Status high" on {serial}/status: INVALID: condition.type: a threshold '
        "condition needs a numeric metric, but this metric's data_type is 'str'"
    )
    assert out[2].startswith(f'rule {typo} "Typo" on {serial}/temperature (inactive): INVALID: ')
    assert "duraton_minutes" in out[2]
    assert out[3] == "3 rule(s) checked (2 active, 1 inactive): 1 ok, 2 invalid (1 of them active)"


def test_check_passes_when_only_inactive_rules_are_invalid(
    run: Any, conn: psycopg.Connection, fleet: Fleet
) -> None:
    """An invalid rule that is switched off is reported but does not fail the check."""
    temp = fleet.bindings[(fleet.serials[0], "temperature")]
    rule = add_rule(conn, temp, "Off", THRESHOLD_10_MIN, action={"type": "pager"}, active=False)
    code, out, _ = run("rules", "check")
    assert code == exitcodes.OK
    assert out[0].endswith(
        "(inactive): INVALID: action.type: unknown action type 'pager'; expected one of "
        "notify, webhook, mqtt"
    )
    assert out[0].startswith(f'rule {rule} "Off"')


def test_check_warns_about_unknown_placeholders(
    run: Any, conn: psycopg.Connection, fleet: Fleet
) -> None:
    """A template placeholder the renderer does not know is pointed out, without failing."""
    temp = fleet.bindings[(fleet.serials[0], "temperature")]
    action = {"type": "notify", "channel": "email", "message": "{device} is at {value}"}
    add_rule(conn, temp, "Placeholder", THRESHOLD_10_MIN, action=action)
    code, out, _ = run("rules", "check")
    assert code == exitcodes.OK
    assert out[0].endswith(
        ": ok (warning: message has unknown placeholder(s) {device}, left as written)"
    )


# --- backtest


def test_backtest_of_a_duration_rule_lists_exactly_its_events_and_writes_nothing(
    run: Any, conn: psycopg.Connection, fleet: Fleet
) -> None:
    """The replay fires once after 10 minutes above the bound, resolves once, and leaves
    events, rule states and the outbox as they were."""
    serial = fleet.serials[0]
    temp = fleet.bindings[(serial, "temperature")]
    add_history(conn, temp)
    rule = add_rule(conn, temp, "High temp", THRESHOLD_10_MIN)
    before = snapshot(conn)
    code, out, err = run("rules", "backtest", "--rule", str(rule))
    assert code == exitcodes.OK, err
    assert out == [
        f'backtest of rule {rule} "High temp" on {serial}/temperature: value > 27.5 for 10 min',
        "KIND       DEVICE TIME                VALUE  REASON",
        f"triggered  {at(11)}  30     value 30 > 27.5 for 10 min",
        f"resolved   {at(15)}  20     value 20 no longer > 27.5",
        f"2 event(s) (1 triggered, 1 resolved) from 8 reading(s) ({at(0)} .. {at(25)}); "
        "final state ok; nothing was written",
    ]
    assert snapshot(conn) == before


def test_backtest_window_bounds_the_readings(
    run: Any, conn: psycopg.Connection, fleet: Fleet
) -> None:
    """--since is inclusive, --until exclusive, and the replay starts fresh at --since."""
    temp = fleet.bindings[(fleet.serials[0], "temperature")]
    add_history(conn, temp)
    rule = add_rule(conn, temp, "High temp", THRESHOLD_10_MIN)
    code, out, _ = run("rules", "backtest", "--rule", str(rule), "--until", at(15))
    assert code == exitcodes.OK
    assert [line.split()[0] for line in out[2:-1]] == ["triggered"]
    assert out[-1].startswith("1 event(s) (1 triggered, 0 resolved) from 5 reading(s)")
    assert out[-1].endswith("final state firing; nothing was written")
    # Naive times are in the configured time zone (UTC here).
    code, out, _ = run("rules", "backtest", "--rule", str(rule), "--since", "2026-01-27T12:05:00")
    assert code == exitcodes.OK
    assert out[1:] == [
        f"0 event(s) (0 triggered, 0 resolved) from 6 reading(s) ({at(5)} .. {at(25)}); "
        "final state ok; nothing was written"
    ]


def test_backtest_of_a_condition_given_as_json_on_a_named_binding(
    run: Any, conn: psycopg.Connection, fleet: Fleet
) -> None:
    """--condition JSON with --device/--metric (or --device-metric) replays without a rule."""
    serial = fleet.serials[0]
    temp = fleet.bindings[(serial, "temperature")]
    add_history(conn, temp)
    before = snapshot(conn)
    cold = json.dumps({"type": "threshold", "operator": "<", "value": 21})
    code, out, err = run(
        "rules", "backtest", "--condition", cold, "--device", serial, "--metric", "Temperature"
    )
    assert code == exitcodes.OK, err
    assert out[0] == (
        f"backtest of --condition on {serial}/temperature (device_metric {temp}): value < 21"
    )
    assert out[2:4] == [
        f"triggered  {at(15)}  20     value 20 < 21",
        f"resolved   {at(20)}  28     value 28 no longer < 21",
    ]
    code, by_id, _ = run("rules", "backtest", "--condition", cold, "--device-metric", str(temp))
    assert code == exitcodes.OK
    assert by_id[1:] == out[1:]
    assert snapshot(conn) == before


def test_backtest_refuses_bad_input_with_a_clear_message(
    run: Any, conn: psycopg.Connection, fleet: Fleet
) -> None:
    """Bad JSON and missing bindings are usage errors; an invalid condition or unknown rule
    fails naming the problem."""
    serial = fleet.serials[0]
    temp = fleet.bindings[(serial, "temperature")]
    code, _, err = run("rules", "backtest", "--condition", "{nope", "--device-metric", str(temp))
    assert code == exitcodes.USAGE
    assert "--condition is not valid JSON" in err
    code, _, err = run("rules", "backtest", "--condition", '{"type": "threshold"}')
    assert code == exitcodes.USAGE
    assert "name the binding exactly once" in err
    code, _, err = run("rules", "backtest", "--rule", "999999")
    assert code == exitcodes.FAILURE
    assert "no rule with id 999999" in err
    bad = json.dumps({"type": "string_match", "operator": "==", "value": "OK"})
    code, _, err = run("rules", "backtest", "--condition", bad, "--device-metric", str(temp))
    assert code == exitcodes.FAILURE
    assert "INVALID: condition.type: a string_match condition needs a str metric" in err


def test_backtest_connection_refuses_writes(make_settings: Callable[..., Settings]) -> None:
    """The commands' connection is READ ONLY, so not even a bug could write an event."""
    with (
        commands.connect_read_only(make_settings(), "test") as conn,
        pytest.raises(psycopg.errors.ReadOnlySqlTransaction),
    ):
        conn.execute("DELETE FROM events")


def test_backtest_of_no_data_reports_silences_including_the_one_at_the_end(
    run: Any, conn: psycopg.Connection, fleet: Fleet
) -> None:
    """Gaps longer than the limit fire at the limit and resolve on the next reading; a silence
    running at --until fires as the live timer would have."""
    temp = fleet.bindings[(fleet.serials[0], "temperature")]
    add_history(conn, temp)
    silent = json.dumps({"type": "no_data", "minutes": 3})
    code, out, err = run(
        "rules", "backtest", "--condition", silent, "--device-metric", str(temp),
        "--until", at(40),
    )  # fmt: skip
    assert code == exitcodes.OK, err
    events = [(line.split()[0], line.split()[1]) for line in out[2:-1]]
    assert events == [
        ("triggered", at(4)), ("resolved", at(5)),
        ("triggered", at(8)), ("resolved", at(11)),
        ("triggered", at(18)), ("resolved", at(20)),
        ("triggered", at(23)), ("resolved", at(25)),
        ("triggered", at(28)),
    ]  # fmt: skip
    assert "final state firing" in out[-1]
