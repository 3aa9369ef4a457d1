"""The steps of `iothub setup-timescaledb` as schema/timescale.py reads them from
schema/timescale.sql, and how a failure of each kind is reported (no database needed)."""

from __future__ import annotations

import psycopg

from schema import timescale


def test_only_the_history_refreshes_run_after_the_commit() -> None:
    """Steps 1..14 run in the transaction; 15 and 16 (the aggregates' history refresh, which
    TimescaleDB refuses in a transaction block) after it, each with its in-place check."""
    steps = timescale.steps()
    assert [step.number for step in steps] == list(range(1, 17))
    later = [step for step in steps if step.after_commit]
    assert [(step.number, step.name) for step in later] == [
        (15, "hourly_history"),
        (16, "daily_history"),
    ]
    for step in later:
        assert step.one_line.startswith("CALL refresh_continuous_aggregate(")
        assert step.done_sql is not None and "continuous_aggregates" in step.done_sql


def test_a_failed_step_after_the_commit_is_not_reported_as_rolled_back() -> None:
    """A failure of steps 1..14 rolled everything back; one of step 15 did not (the others had
    committed), and its event says so and carries the statement to run by hand."""
    steps = {step.number: step for step in timescale.steps()}
    error = psycopg.errors.LockNotAvailable("canceling statement due to lock timeout")
    inside = timescale.Failure(error, steps[8]).fields()
    assert inside["rolled_back"] is True and "hint" not in inside
    after = timescale.Failure(error, steps[15]).fields()
    assert after["rolled_back"] is False
    assert after["step"] == 15 and after["step_name"] == "hourly_history"
    assert after["sqlstate"] == "55P03"
    assert after["error"] == "canceling statement due to lock timeout"
    assert str(after["hint"]).endswith(steps[15].one_line)
