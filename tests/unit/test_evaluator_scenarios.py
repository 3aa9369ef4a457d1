"""The rule state machine, scenario by scenario: readings (device time, value) in, the exact
transitions (kind, time) out."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import UTC, date, datetime, timedelta
from typing import Any, Final
from zoneinfo import ZoneInfo

import pytest

from rules_engine.evaluate.compile import CompiledRule, compile_rule
from rules_engine.evaluate.replay import replay
from rules_engine.evaluate.state import RuleState
from rules_engine.evaluate.step import Reading, Transition, check_no_data, step
from rules_engine.model.conditions import DataType, InvalidRule

UTC_ZONE = ZoneInfo("UTC")
BERLIN = ZoneInfo("Europe/Berlin")
DAY = date(2026, 1, 27)
NOTIFY = {"type": "notify", "channel": "email", "message": "{rule_name}: {value}"}

Row = tuple[str, float | bool | str]


def at(text: str) -> datetime:
    """`HH:MM[:SS]` on 2026-01-27 in UTC, or a full ISO 8601 time with its offset."""
    if "T" in text:
        return datetime.fromisoformat(text)
    return datetime.fromisoformat(f"{DAY.isoformat()}T{text}+00:00")


def label(moment: datetime) -> str:
    """A transition time as the tables write it: UTC `HH:MM[:SS]`, prefixed `MM-DD ` off DAY."""
    utc = moment.astimezone(UTC)
    text = utc.strftime("%H:%M:%S" if utc.second else "%H:%M")
    return text if utc.date() == DAY else f"{utc:%m-%d} {text}"


def make_rule(condition: dict[str, Any], data_type: DataType = "numeric") -> CompiledRule:
    return compile_rule(1, "scenario", condition, NOTIFY, data_type)


def readings(rows: Sequence[Row]) -> list[Reading]:
    return [Reading(at(ts), value) for ts, value in rows]


def events(
    condition: dict[str, Any],
    rows: list[Row],
    data_type: DataType = "numeric",
    tz: ZoneInfo = UTC_ZONE,
) -> list[tuple[str, str]]:
    _, transitions = replay(make_rule(condition, data_type), readings(rows), tz)
    return [(t.kind, label(t.ts)) for t in transitions]


T: Final = "triggered"
R: Final = "resolved"
HOT = {"type": "threshold", "operator": ">", "value": 27.5}

SCENARIOS: list[tuple[str, dict[str, Any], DataType, list[Row], list[tuple[str, str]]]] = [
    (
        "threshold: one event per transition, not per matching reading",
        HOT,
        "numeric",
        [("00:00", 27), ("00:01", 28), ("00:02", 29), ("00:03", 30), ("00:04", 27), ("00:05", 26)],
        [(T, "00:01"), (R, "00:04")],
    ),
    (
        "duration not met (interrupted), then met",
        {**HOT, "duration_minutes": 10},
        "numeric",
        [
            ("00:00", 28),
            ("00:05", 28),
            ("00:08", 27),
            ("00:10", 28),
            ("00:15", 28),
            ("00:19", 29),
            ("00:20", 28),
            ("00:25", 27),
        ],
        [(T, "00:20"), (R, "00:25")],
    ),
    (
        "duration is confirmed by the first reading at or after its end",
        {**HOT, "duration_minutes": 10},
        "numeric",
        [("00:00", 28), ("00:30", 28)],
        [(T, "00:30")],
    ),
    (
        "flapping around the threshold without hysteresis",
        HOT,
        "numeric",
        [("00:00", 28), ("00:01", 27), ("00:02", 28), ("00:03", 27.4), ("00:04", 27.6)],
        [(T, "00:00"), (R, "00:01"), (T, "00:02"), (R, "00:03"), (T, "00:04")],
    ),
    (
        "flapping around the threshold with clear_value",
        {**HOT, "clear_value": 26},
        "numeric",
        [
            ("00:00", 28),
            ("00:01", 27),
            ("00:02", 28),
            ("00:03", 27.4),
            ("00:04", 26.5),
            ("00:05", 26),
            ("00:06", 27),
            ("00:07", 28),
        ],
        [(T, "00:00"), (R, "00:05"), (T, "00:07")],
    ),
    (
        "clear sub-condition with its own duration",
        {
            **HOT,
            "clear": {"type": "threshold", "operator": "<", "value": 26, "duration_minutes": 5},
        },
        "numeric",
        [
            ("00:00", 28),
            ("00:01", 25),
            ("00:03", 25),
            ("00:04", 27),
            ("00:05", 25),
            ("00:09", 25),
            ("00:10", 25),
        ],
        [(T, "00:00"), (R, "00:10")],
    ),
    (
        "cooldown: a re-trigger waits, resolve does not",
        {**HOT, "cooldown_minutes": 30},
        "numeric",
        [
            ("00:00", 28),
            ("00:05", 27),
            ("00:10", 28),
            ("00:20", 28),
            ("00:30", 28),
            ("00:31", 27),
        ],
        [(T, "00:00"), (R, "00:05"), (T, "00:30"), (R, "00:31")],
    ),
    (
        "cooldown: a condition gone before the cooldown ends fires on its next return",
        {**HOT, "cooldown_minutes": 30},
        "numeric",
        [("00:00", 28), ("00:05", 27), ("00:10", 28), ("00:15", 27), ("00:35", 28)],
        [(T, "00:00"), (R, "00:05"), (T, "00:35")],
    ),
    (
        "cooldown and duration together",
        {**HOT, "duration_minutes": 5, "cooldown_minutes": 30},
        "numeric",
        [
            ("00:00", 28),
            ("00:05", 28),
            ("00:06", 27),
            ("00:10", 28),
            ("00:20", 28),
            ("00:35", 28),
        ],
        [(T, "00:05"), (R, "00:06"), (T, "00:35")],
    ),
    (
        "range outside, bounds inclusive",
        {"type": "range", "operator": "outside", "min": 18, "max": 24},
        "numeric",
        [("00:00", 20), ("00:01", 25), ("00:02", 24), ("00:03", 17.9), ("00:04", 18)],
        [(T, "00:01"), (R, "00:02"), (T, "00:03"), (R, "00:04")],
    ),
    (
        "range inside",
        {"type": "range", "operator": "inside", "min": 40, "max": 60},
        "numeric",
        [("00:00", 30), ("00:01", 50), ("00:02", 60), ("00:03", 60.1)],
        [(T, "00:01"), (R, "00:03")],
    ),
    (
        "range outside with clear_value hysteresis",
        {"type": "range", "operator": "outside", "min": 18, "max": 24, "clear_value": [19, 23]},
        "numeric",
        [("00:00", 25), ("00:01", 24), ("00:02", 23.5), ("00:03", 23)],
        [(T, "00:00"), (R, "00:03")],
    ),
    (
        "boolean (original form without time_restriction)",
        {"type": "boolean", "operator": "==", "value": True},
        "boolean",
        [("00:00", False), ("00:01", True), ("00:02", True), ("00:03", False)],
        [(T, "00:01"), (R, "00:03")],
    ),
    (
        "string_match != (original form)",
        {"type": "string_match", "operator": "!=", "value": "OK"},
        "str",
        [("00:00", "OK"), ("00:01", "WARN"), ("00:02", "FAULT"), ("00:03", "OK")],
        [(T, "00:01"), (R, "00:03")],
    ),
    (
        "string_match in",
        {"type": "string_match", "operator": "in", "value": ["ALARM", "FAULT"]},
        "str",
        [("00:00", "OK"), ("00:01", "FAULT"), ("00:02", "ALARM"), ("00:03", "OK")],
        [(T, "00:01"), (R, "00:03")],
    ),
    (
        "string_match contains, case-sensitive",
        {"type": "string_match", "operator": "contains", "value": "ERR"},
        "str",
        [("00:00", "OK"), ("00:01", "E_ERR_42"), ("00:02", "ERR"), ("00:03", "err")],
        [(T, "00:01"), (R, "00:03")],
    ),
    (
        "rate: at least 3 readings in a sliding 1-minute window (half-open)",
        {"type": "rate", "count": 3, "duration_minutes": 1},
        "numeric",
        [
            ("00:00:00", 1),
            ("00:00:30", 1),
            ("00:01:00", 1),
            ("00:01:10", 1),
            ("00:01:20", 1),
            ("00:03:00", 1),
        ],
        [(T, "00:01:10"), (R, "00:03")],
    ),
    (
        "rate: a steady 4 readings a minute never matches 5 a minute",
        {"type": "rate", "count": 5, "duration_minutes": 1},
        "str",
        [(f"00:{second // 60:02d}:{second % 60:02d}", "x") for second in range(0, 180, 15)],
        [],
    ),
    (
        "delta: change per minute above a bound",
        {"type": "delta", "operator": ">", "value": 2},
        "numeric",
        [("00:00", 10), ("00:01", 11), ("00:02", 15), ("00:03", 16), ("00:10", 20)],
        [(T, "00:02"), (R, "00:03")],
    ),
    (
        "delta: the change is per minute, not per reading",
        {"type": "delta", "operator": ">", "value": 2},
        "numeric",
        [("00:00:00", 10), ("00:00:30", 11.5), ("00:01:30", 13)],
        [(T, "00:00:30"), (R, "00:01:30")],
    ),
    (
        "delta: absolute catches a fall",
        {"type": "delta", "operator": ">", "value": 2, "absolute": True},
        "numeric",
        [("00:00", 10), ("00:01", 5), ("00:02", 4)],
        [(T, "00:01"), (R, "00:02")],
    ),
    (
        "composite AND: hot and rising",
        {
            "type": "composite",
            "operator": "AND",
            "conditions": [
                {"type": "threshold", "operator": ">", "value": 30},
                {"type": "delta", "operator": ">", "value": 1},
            ],
        },
        "numeric",
        [("00:00", 31), ("00:01", 33), ("00:02", 33.5), ("00:03", 35)],
        [(T, "00:01"), (R, "00:02"), (T, "00:03")],
    ),
    (
        "composite OR: very hot at once, or hot for 10 minutes",
        {
            "type": "composite",
            "operator": "OR",
            "conditions": [
                {"type": "threshold", "operator": ">", "value": 40},
                {"type": "threshold", "operator": ">", "value": 30, "duration_minutes": 10},
            ],
        },
        "numeric",
        [
            ("00:00", 35),
            ("00:05", 35),
            ("00:10", 35),
            ("00:11", 25),
            ("00:12", 45),
            ("00:13", 35),
        ],
        [(T, "00:10"), (R, "00:11"), (T, "00:12"), (R, "00:13")],
    ),
]


@pytest.mark.parametrize(
    ("condition", "data_type", "rows", "expected"),
    [scenario[1:] for scenario in SCENARIOS],
    ids=[scenario[0] for scenario in SCENARIOS],
)
def test_scenario(
    condition: dict[str, Any],
    data_type: DataType,
    rows: list[Row],
    expected: list[tuple[str, str]],
) -> None:
    """Each scenario's readings produce exactly the listed transitions, at the listed times."""
    assert events(condition, rows, data_type) == expected


def test_transition_carries_value_and_reason() -> None:
    """A triggered event holds the reading's value and a short reason naming bound and duration."""
    rows: list[Row] = [("00:00", 28), ("00:10", 28.1), ("00:12", 27)]
    _, transitions = replay(make_rule({**HOT, "duration_minutes": 10}), readings(rows), UTC_ZONE)
    assert transitions == [
        Transition(T, at("00:10"), 28.1, "value 28.1 > 27.5 for 10 min"),
        Transition(R, at("00:12"), 27, "value 27 no longer > 27.5"),
    ]


# --- time_restriction ---------------------------------------------------------------------------

NIGHT_DOOR = {"type": "boolean", "operator": "==", "value": True, "time_restriction": "22:00-06:00"}
NIGHT_ROWS: list[Row] = [
    ("2026-01-27T20:30:00Z", True),  # 21:30 in Berlin: before the window
    ("2026-01-27T21:00:00Z", True),  # 22:00 in Berlin: the window opens
    ("2026-01-27T23:30:00Z", True),
    ("2026-01-28T05:30:00Z", True),  # 06:30 in Berlin: window closed, still FIRING
    ("2026-01-28T06:00:00Z", False),  # resolves outside the window
    ("2026-01-28T06:30:00Z", True),  # cannot trigger outside the window
    ("2026-01-28T21:15:00Z", True),  # 22:15 in Berlin
]


def test_time_restriction_across_midnight_in_berlin() -> None:
    """22:00-06:00 is Berlin wall time (UTC+1 in winter): triggers only inside the window; a
    FIRING rule stays FIRING past 06:00 and resolves whenever the condition stops holding."""
    assert events(NIGHT_DOOR, NIGHT_ROWS, "boolean", BERLIN) == [
        (T, "21:00"),
        (R, "01-28 06:00"),
        (T, "01-28 21:15"),
    ]


def test_time_restriction_depends_on_the_configured_zone() -> None:
    """The same readings judged in UTC open the window an hour later."""
    assert events(NIGHT_DOOR, NIGHT_ROWS, "boolean", UTC_ZONE) == [
        (T, "23:30"),
        (R, "01-28 06:00"),
    ]


def test_time_restriction_follows_summer_time() -> None:
    """In July Berlin is UTC+2, so 22:00 local is 20:00 UTC."""
    rows: list[Row] = [("2026-07-15T19:59:00Z", True), ("2026-07-15T20:00:00Z", True)]
    assert events(NIGHT_DOOR, rows, "boolean", BERLIN) == [(T, "07-15 20:00")]


def test_a_pending_duration_must_fit_inside_the_window() -> None:
    """A PENDING run that reaches the end of the window goes back to OK without an event."""
    condition = {**NIGHT_DOOR, "duration_minutes": 30}
    rows: list[Row] = [
        ("2026-01-28T04:40:00Z", True),  # 05:40 Berlin: PENDING
        ("2026-01-28T04:59:00Z", True),  # 05:59: still PENDING
        ("2026-01-28T05:10:00Z", True),  # 06:10: outside, back to OK
        ("2026-01-28T05:20:00Z", True),
    ]
    assert events(condition, rows, "boolean", BERLIN) == []
    unrestricted = {k: v for k, v in condition.items() if k != "time_restriction"}
    assert events(unrestricted, rows, "boolean", BERLIN) == [(T, "01-28 05:10")]


# --- late readings ---------------------------------------------------------------------------


def test_late_readings_are_reported_and_change_nothing() -> None:
    """A reading older than or as old as the last evaluated one is late: same state, no events."""
    rule = make_rule({**HOT, "duration_minutes": 10})
    state = RuleState.initial()
    for ts in ("00:00", "00:05"):
        state = step(rule, state, Reading(at(ts), 28), UTC_ZONE).state
    assert state.status == "pending"
    for ts, value in (("00:03", 99), ("00:05", 10), ("2026-01-26T23:59:00Z", 1)):
        result = step(rule, state, Reading(at(ts), value), UTC_ZONE)
        assert result.late
        assert result.state is state
        assert result.transitions == ()
    fired = step(rule, state, Reading(at("00:10"), 28), UTC_ZONE)
    assert not fired.late
    assert [(t.kind, label(t.ts)) for t in fired.transitions] == [(T, "00:10")]


def test_a_late_reading_cannot_resolve_a_firing_rule() -> None:
    """While FIRING, a late reading below the threshold neither resolves nor moves the state."""
    rule = make_rule(HOT)
    state = step(rule, RuleState.initial(), Reading(at("00:10"), 30), UTC_ZONE).state
    assert state.status == "firing"
    result = step(rule, state, Reading(at("00:09"), 20), UTC_ZONE)
    assert (result.late, result.state.status, result.transitions) == (True, "firing", ())


# --- no_data ---------------------------------------------------------------------------------

SILENCE = {"type": "no_data", "minutes": 15}


def test_no_data_fires_on_the_timer_and_resolves_on_the_next_reading() -> None:
    """check_no_data fires once the silence exceeds the limit, at the moment it did; the next
    reading resolves it."""
    rule = make_rule(SILENCE)
    assert check_no_data(rule, RuleState.initial(), at("05:00"), UTC_ZONE).transitions == ()
    state = step(rule, RuleState.initial(), Reading(at("00:00"), 1), UTC_ZONE).state
    for now in ("00:10", "00:15"):
        assert check_no_data(rule, state, at(now), UTC_ZONE).transitions == ()
    fired = check_no_data(rule, state, at("00:16"), UTC_ZONE)
    assert fired.transitions == (
        Transition(T, at("00:15"), None, "no reading for 15 min (last 2026-01-27T00:00:00+00:00)"),
    )
    assert fired.state.status == "firing"
    again = check_no_data(rule, fired.state, at("00:20"), UTC_ZONE)
    assert (again.transitions, again.state) == ((), fired.state)
    resolved = step(rule, fired.state, Reading(at("00:30"), 2), UTC_ZONE)
    assert [(t.kind, label(t.ts), t.value) for t in resolved.transitions] == [(R, "00:30", 2)]
    assert resolved.state.status == "ok"


def test_no_data_silence_counts_from_the_given_moment() -> None:
    """With `silent_since` (the service's receipt time) the silence is measured from it, not
    from the reading's device time: a device clock 3 minutes behind does not look silent."""
    rule = make_rule(SILENCE)
    state = step(rule, RuleState.initial(), Reading(at("00:00"), 1), UTC_ZONE).state
    received = at("00:03")  # the device's clock is 3 minutes behind the service's
    assert check_no_data(rule, state, at("00:16"), UTC_ZONE).transitions != ()
    assert (
        check_no_data(rule, state, at("00:16"), UTC_ZONE, silent_since=received).transitions == ()
    )
    fired = check_no_data(rule, state, at("00:19"), UTC_ZONE, silent_since=received)
    assert [(t.kind, label(t.ts)) for t in fired.transitions] == [(T, "00:18")]


def test_no_data_never_resolves_before_it_triggered() -> None:
    """A reading whose device time is before the timer's trigger (its clock runs behind)
    resolves the alarm at the trigger's time, not earlier."""
    rule = make_rule(SILENCE)
    state = step(rule, RuleState.initial(), Reading(at("00:00"), 1), UTC_ZONE).state
    fired = check_no_data(rule, state, at("00:19"), UTC_ZONE, silent_since=at("00:03"))
    resolved = step(rule, fired.state, Reading(at("00:17"), 2), UTC_ZONE)
    assert [(t.kind, label(t.ts), t.value) for t in resolved.transitions] == [(R, "00:18", 2)]
    assert resolved.state.last_ts == at("00:17")


def test_no_data_in_a_replay_finds_the_gaps() -> None:
    """A backtest reports each gap longer than the limit as a triggered/resolved pair."""
    rows: list[Row] = [("00:00", 1), ("00:10", 1), ("00:40", 1), ("00:50", 1), ("01:06", 1)]
    assert events(SILENCE, rows) == [(T, "00:25"), (R, "00:40"), (T, "01:05"), (R, "01:06")]
    assert events(SILENCE, rows[:4]) == [(T, "00:25"), (R, "00:40")]


def test_no_data_gap_without_a_timer_is_still_recorded() -> None:
    """If no timer ran during the gap (service down), the next reading records both events."""
    rule = make_rule(SILENCE)
    state = step(rule, RuleState.initial(), Reading(at("00:00"), 1), UTC_ZONE).state
    result = step(rule, state, Reading(at("00:40"), 1), UTC_ZONE)
    assert [(t.kind, label(t.ts)) for t in result.transitions] == [(T, "00:15"), (R, "00:40")]
    assert result.state.status == "ok"


def test_no_data_with_time_restriction_waits_for_the_window() -> None:
    """A silence that passes its limit outside the window fires when the window next opens."""
    rule = make_rule({**SILENCE, "time_restriction": "08:00-18:00"})
    state = step(rule, RuleState.initial(), Reading(at("17:50"), 1), UTC_ZONE).state
    for now in ("18:30", "2026-01-28T07:59:00Z"):
        assert check_no_data(rule, state, at(now), UTC_ZONE).transitions == ()
    fired = check_no_data(rule, state, at("2026-01-28T08:01:00Z"), UTC_ZONE)
    assert [(t.kind, label(t.ts)) for t in fired.transitions] == [(T, "01-28 08:00")]


def test_no_data_cooldown_spaces_its_triggers() -> None:
    """With cooldown_minutes, a second silence fires no earlier than the cooldown allows."""
    rule = make_rule({**SILENCE, "cooldown_minutes": 60})
    state = step(rule, RuleState.initial(), Reading(at("00:00"), 1), UTC_ZONE).state
    state = check_no_data(rule, state, at("00:16"), UTC_ZONE).state
    state = step(rule, state, Reading(at("00:20"), 1), UTC_ZONE).state
    assert check_no_data(rule, state, at("01:00"), UTC_ZONE).transitions == ()
    fired = check_no_data(rule, state, at("01:16"), UTC_ZONE)
    assert [(t.kind, label(t.ts)) for t in fired.transitions] == [(T, "01:15")]


def test_check_no_data_ignores_other_rules() -> None:
    """The timer path is a no-op for rules that are not no_data."""
    rule = make_rule(HOT)
    state = step(rule, RuleState.initial(), Reading(at("00:00"), 20), UTC_ZONE).state
    result = check_no_data(rule, state, at("23:00"), UTC_ZONE)
    assert (result.state, result.transitions, result.late) == (state, (), False)


# --- restart safety -------------------------------------------------------------------------


def roundtrip(state: RuleState) -> RuleState:
    return RuleState.from_json(json.loads(json.dumps(state.to_json())))


def test_restart_in_the_middle_of_a_pending_duration() -> None:
    """A state stored while PENDING and loaded again continues exactly as without the restart."""
    rule = make_rule({**HOT, "duration_minutes": 10})
    rows = readings([(f"00:{minute:02d}", 28) for minute in range(0, 22, 2)] + [("00:23", 20)])
    straight_state, straight = replay(rule, rows, UTC_ZONE)
    first_state, first = replay(rule, rows[:3], UTC_ZONE)
    assert first_state.status == "pending"
    assert first == []
    final_state, rest = replay(rule, rows[3:], UTC_ZONE, roundtrip(first_state))
    assert (
        rest
        == straight
        == [
            Transition(T, at("00:10"), 28, "value 28 > 27.5 for 10 min"),
            Transition(R, at("00:23"), 20, "value 20 no longer > 27.5"),
        ]
    )
    assert final_state == straight_state


BUSY_RULE = {
    "type": "composite",
    "operator": "OR",
    "conditions": [
        {"type": "threshold", "operator": ">", "value": 30, "duration_minutes": 4},
        {"type": "rate", "count": 3, "duration_minutes": 2},
        {"type": "delta", "operator": ">", "value": 5, "absolute": True},
    ],
    "duration_minutes": 1,
    "cooldown_minutes": 5,
    "clear": {"type": "threshold", "operator": "<", "value": 10, "duration_minutes": 1},
}
BUSY_ROWS: list[Row] = [
    ("00:00", 5),
    ("00:03", 31),
    ("00:05", 32),
    ("00:07", 33),
    ("00:08", 20),
    ("00:08:30", 21),
    ("00:09", 9),
    ("00:09:40", 8),
    ("00:10:20", 9),
    ("00:11", 31),
    ("00:11:20", 32),
    ("00:11:40", 33),
    ("00:12", 33),
    ("00:12:30", 5),
    ("00:13", 33),
    ("00:14", 5),
    ("00:15:30", 5),
    ("00:30", 40),
    ("00:31", 41),
    ("00:36", 42),
    ("00:37", 2),
    ("00:39", 2),
]


@pytest.mark.parametrize("split", range(len(BUSY_ROWS) + 1))
def test_restart_at_any_point_gives_the_same_result(split: int) -> None:
    """Durations, rate windows, sub-condition and clear state, cooldown and the last value all
    survive to_json/json/from_json: splitting the stream anywhere changes nothing."""
    rule = make_rule(BUSY_RULE)
    rows = readings(BUSY_ROWS)
    straight_state, straight = replay(rule, rows, UTC_ZONE)
    head_state, head = replay(rule, rows[:split], UTC_ZONE)
    final_state, tail = replay(rule, rows[split:], UTC_ZONE, roundtrip(head_state))
    assert head + tail == straight
    assert final_state == straight_state


def test_busy_rule_exercises_every_path() -> None:
    """The restart test's rule really triggers and resolves, so it compares something."""
    assert events(BUSY_RULE, BUSY_ROWS) == [
        (T, "00:08"),  # threshold for 4 min at 00:07 starts PENDING; |delta| keeps it 1 min
        (R, "00:10:20"),  # clear: below 10 since 00:09, for 1 min
        (T, "00:13"),  # rate holds from 00:11 on, but the cooldown runs until 00:13
        (R, "00:15:30"),
        (T, "00:37"),
        (R, "00:39"),
    ]


def test_no_data_state_survives_a_restart_while_firing() -> None:
    """A FIRING no_data state stored and loaded is not fired again by the timer."""
    rule = make_rule(SILENCE)
    state = step(rule, RuleState.initial(), Reading(at("00:00"), 1), UTC_ZONE).state
    state = roundtrip(check_no_data(rule, state, at("00:16"), UTC_ZONE).state)
    assert state.status == "firing"
    assert check_no_data(rule, state, at("00:30"), UTC_ZONE).transitions == ()


# --- state format and bounds ------------------------------------------------------------------


def test_state_json_is_plain_and_small() -> None:
    """to_json gives plain JSON types; a rate window never holds more than `count` times."""
    rule = make_rule({"type": "rate", "count": 5, "duration_minutes": 60})
    start = at("00:00")
    state = RuleState.initial()
    for second in range(2000):
        state = step(rule, state, Reading(start + timedelta(seconds=second), 1.0), UTC_ZONE).state
        assert all(len(node.window) <= 5 for _, node in state.nodes)
    text = json.dumps(state.to_json())
    assert len(text) < 600
    assert json.loads(text)["nodes"][""]["window"][-1] == "2026-01-27T00:33:19+00:00"


def test_from_json_none_is_the_initial_state() -> None:
    """A device_metric with no stored state starts OK with nothing remembered."""
    assert RuleState.from_json(None) == RuleState.initial() == RuleState()
    assert RuleState.from_json(RuleState.initial().to_json()) == RuleState.initial()


@pytest.mark.parametrize(
    "raw",
    [
        {"status": "exploded"},
        {"status": "ok", "last_ts": "yesterday"},
        {"status": "ok", "last_ts": "2026-01-27T00:00:00"},
        {"status": "ok", "version": 99},
        {"status": "ok", "nodes": {"": {"window": ["soon"]}}},
    ],
)
def test_from_json_refuses_malformed_states(raw: dict[str, Any]) -> None:
    """A corrupt, naive-timed or newer state is a ValueError, never a silently wrong state."""
    with pytest.raises(ValueError, match="rule state"):
        RuleState.from_json(raw)


# --- contract checks --------------------------------------------------------------------------


def test_step_refuses_naive_times_and_mistyped_values() -> None:
    """Readings must carry aware device time and a value of the rule's data type."""
    rule = make_rule(HOT)
    with pytest.raises(ValueError, match="timezone-aware"):
        step(rule, RuleState(), Reading(datetime(2026, 1, 27, 12), 1.0), UTC_ZONE)
    for wrong in (True, "28", float("nan")):
        with pytest.raises(TypeError, match="numeric rule got the reading value"):
            step(rule, RuleState(), Reading(at("00:00"), wrong), UTC_ZONE)


def test_compile_rule_reports_condition_and_action_problems_together() -> None:
    """An invalid rule is reported once, with its id and every problem of both JSON columns."""
    with pytest.raises(InvalidRule) as caught:
        compile_rule(9, "bad", {"type": "threshold", "operator": ">", "value": "x"}, {}, "numeric")
    assert caught.value.rule_id == 9
    assert str(caught.value) == (
        "rule 9: condition.value: a numeric threshold needs a number, got 'x'; "
        "action.type: is required (notify or mqtt), unless the action is "
        '{"webhook": {...}, "notification": {...}}'
    )


def test_compiled_rule_derives_its_clear_condition() -> None:
    """compile_rule keeps the parsed models and precomputes the hysteresis clear condition."""
    rule = make_rule({**HOT, "clear_value": 26})
    assert (rule.rule_id, rule.name, rule.data_type) == (1, "scenario", "numeric")
    assert rule.clear_condition is not None
    assert rule.clear_condition.model_dump(exclude_unset=True) == {
        "type": "threshold",
        "operator": "<=",
        "value": 26,
    }
