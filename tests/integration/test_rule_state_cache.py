"""Rule states kept in memory between batches are used only while nobody else has written them.

Each test drives RuleEngine.on_inserted directly, in transactions of its own, against the real
database, with a second engine (another service instance), the no-data timer, a rollback or an
operator's statement changing the states in between.
"""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
from psycopg_pool import ConnectionPool

from config.settings import Settings
from ingestor import catalog
from rules_engine.engine import RuleEngine, RulePreloader
from rules_engine.metrics import RuleMetrics
from rules_engine.no_data import NoDataWorker
from tests.integration.test_rule_engine_robustness import HOT, reading
from tests.integration.test_rules_in_pipeline import add_rule, events
from tests.support.fleet import make_fleet, wait_for

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def at(minute: float) -> datetime:
    return T0 + timedelta(minutes=minute)


def feed(db_url: str, engine: RuleEngine, dm: int, *readings: tuple[float, float]) -> None:
    """One committed batch of (minute, value) readings through this engine."""
    with psycopg.connect(db_url, autocommit=True) as conn, conn.transaction():
        engine.on_inserted(conn, [reading(dm, at(minute), value) for minute, value in readings])


def binding(db_url: str, unique: str) -> int:
    fleet = make_fleet(db_url, f"SN-{unique}", 1)
    return fleet.bindings[(fleet.serials[0], "temperature")]


def new_engine(db_url: str) -> RuleEngine:
    return RuleEngine(Settings(database_url=db_url), RuleMetrics())


def test_two_instances_take_turns_on_one_binding(db_url: str, unique: str) -> None:
    """Each instance sees what the other wrote since its own last batch: an alarm raised by one
    is resolved by the other, and raised again by the first, one event per transition."""
    dm = binding(db_url, unique)
    add_rule(db_url, dm, HOT, "Hot")
    a, b = new_engine(db_url), new_engine(db_url)
    feed(db_url, a, dm, (0, 20.0))
    feed(db_url, b, dm, (1, 20.0))  # b caches "ok"
    feed(db_url, a, dm, (2, 30.0))  # a fires: b's memory is now out of date
    feed(db_url, b, dm, (3, 20.0))  # b must see FIRING to resolve
    feed(db_url, a, dm, (4, 31.0))  # a must see OK (b's write) to fire again
    feed(db_url, a, dm, (5, 32.0))  # a's own memory: still firing, no event
    assert events(db_url) == [("triggered", at(2)), ("resolved", at(3)), ("triggered", at(4))]


def test_a_reading_late_to_another_instance_does_not_move_the_state(
    db_url: str, unique: str
) -> None:
    """The newest evaluated reading is shared through the database: a reading older than what
    another instance evaluated is late here too."""
    dm = binding(db_url, unique)
    add_rule(db_url, dm, HOT, "Hot")
    a, b = new_engine(db_url), new_engine(db_url)
    feed(db_url, a, dm, (0, 20.0))
    feed(db_url, b, dm, (10, 20.0))
    with psycopg.connect(db_url, autocommit=True) as conn, conn.transaction():
        result = a.on_inserted(conn, [reading(dm, at(5), 30.0)])
    assert result.late == 1
    assert events(db_url) == []


def test_a_rolled_back_batch_leaves_no_trace_in_memory(db_url: str, unique: str) -> None:
    """The engine updates its memory before the batch commits; when the commit does not happen
    the stored version differs from the remembered one, and the states are read again."""
    dm = binding(db_url, unique)
    add_rule(db_url, dm, HOT, "Hot")
    engine = new_engine(db_url)
    feed(db_url, engine, dm, (0, 20.0))
    with (
        psycopg.connect(db_url, autocommit=True) as conn,
        pytest.raises(RuntimeError),
        conn.transaction(),
    ):
        engine.on_inserted(conn, [reading(dm, at(1), 30.0)])  # fires, in memory
        raise RuntimeError("the batch fails after the hook")
    feed(db_url, engine, dm, (2, 30.0))  # must fire (again): the first never happened
    assert events(db_url) == [("triggered", at(2))]


def test_a_no_data_alarm_raised_by_the_timer_is_seen_by_the_batch(db_url: str, unique: str) -> None:
    """The no-data timer writes the state in its own transaction; the next batch reads it and
    resolves the alarm instead of raising it a second time."""
    dm = binding(db_url, unique)
    add_rule(db_url, dm, {"type": "no_data", "minutes": 10}, "Silent")
    engine = new_engine(db_url)
    engine.clock = lambda: at(0)  # the service's clock agrees with the device's
    feed(db_url, engine, dm, (0, 20.0))
    with ConnectionPool(db_url, min_size=1, max_size=1, kwargs={"autocommit": True}) as pool:
        assert NoDataWorker(engine, pool).check(at(30)) == 1
    engine.clock = lambda: at(40)
    feed(db_url, engine, dm, (40, 20.0))
    assert events(db_url) == [("triggered", at(10)), ("resolved", at(40))]


def test_states_reset_by_an_operator_are_not_brought_back(db_url: str, unique: str) -> None:
    """`TRUNCATE rule_states` (or a DELETE) while the service runs: the batch starts the rules
    afresh instead of writing back what it remembered."""
    dm = binding(db_url, unique)
    add_rule(db_url, dm, {**HOT, "duration_minutes": 10}, "Hot for 10 min")
    engine = new_engine(db_url)
    feed(db_url, engine, dm, (0, 30.0))  # PENDING since minute 0
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("TRUNCATE rule_states")
    feed(db_url, engine, dm, (10, 30.0))  # a fresh PENDING run starts here: no event yet
    assert events(db_url) == []
    feed(db_url, engine, dm, (20, 30.0))
    assert events(db_url) == [("triggered", at(20))]


def test_steady_batches_write_one_cursor_row_and_no_rule_rows(db_url: str, unique: str) -> None:
    """What makes the cache worth having: a batch in which no state machine moves writes the
    binding's cursor, not a row per rule."""
    dm = binding(db_url, unique)
    for k in range(5):
        add_rule(db_url, dm, {"type": "threshold", "operator": ">", "value": 100 + k}, f"R{k}")
    engine = new_engine(db_url)
    feed(db_url, engine, dm, (0, 20.0))
    with psycopg.connect(db_url, autocommit=True) as conn:
        before = conn.execute("SELECT count(*) FROM rule_states").fetchone()
        feed(db_url, engine, dm, (1, 21.0), (2, 22.0))
        cursor = conn.execute(
            "SELECT last_ts, last_value FROM rule_cursors WHERE device_metric_id = %s", (dm,)
        ).fetchone()
        after = conn.execute("SELECT count(*) FROM rule_states").fetchone()
    assert before == after == (0,)
    assert cursor == (at(2), 22.0)


def test_rules_are_compiled_at_start_not_in_the_first_batch(db_url: str, unique: str) -> None:
    """The preloader waits for the catalogue's first load (which marks the rule cache stale),
    then loads the rules; the first batch finds them loaded and does not load them again."""
    dm = binding(db_url, unique)
    add_rule(db_url, dm, HOT, "Hot")
    engine = new_engine(db_url)
    with ConnectionPool(db_url, min_size=1, max_size=1, kwargs={"autocommit": True}) as pool:
        preloader = RulePreloader(engine, pool)
        preloader.start()
        time.sleep(0.3)
        assert engine.cache.generation == 0  # the catalogue has not loaded yet: nothing done
        with psycopg.connect(db_url, autocommit=True) as conn:
            engine.on_catalog_change(catalog.load(conn), frozenset({"*"}))
        assert wait_for(lambda: engine.cache.generation == 1)
        preloader.stop(5.0)
    feed(db_url, engine, dm, (0, 30.0))
    assert engine.cache.generation == 1
    assert events(db_url) == [("triggered", at(0))]


def test_an_operator_reset_during_a_batch_is_not_overwritten(
    db_url: str, unique: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`TRUNCATE rule_states` issued while a batch holds the binding, between its version check
    and its cursor write: the reset must wait for the batch (the cursor rows are locked at the
    check), or the batch's cursor write would bury the reset's version bump."""
    dm = binding(db_url, unique)
    add_rule(db_url, dm, {**HOT, "duration_minutes": 10}, "Hot for 10 min")
    engine = new_engine(db_url)
    feed(db_url, engine, dm, (0, 30.0))  # PENDING since minute 0
    reset_done = threading.Event()

    def operator() -> None:
        with psycopg.connect(db_url, autocommit=True) as op:
            op.execute("TRUNCATE rule_states")
        reset_done.set()

    reset = threading.Thread(target=operator)
    save_cursors = engine.save_cursors

    def reset_first(conn: psycopg.Connection, after: Any) -> int | None:
        reset.start()
        assert not reset_done.wait(1.0), "the reset went through under the batch"
        return save_cursors(conn, after)

    monkeypatch.setattr(engine, "save_cursors", reset_first)
    feed(db_url, engine, dm, (5, 30.0))  # still PENDING; the reset waits for this commit
    monkeypatch.undo()
    reset.join(10)
    assert reset_done.is_set()
    feed(db_url, engine, dm, (10, 30.0))  # the reset started a fresh run: no event yet
    assert events(db_url) == []
    feed(db_url, engine, dm, (20, 30.0))
    assert events(db_url) == [("triggered", at(20))]


def test_a_rule_deactivated_mid_flight_keeps_its_stored_state(db_url: str, unique: str) -> None:
    """A rule deactivated before the reload notification arrives loses the batch's writes, and
    the memory keeps what the database holds: reactivated, it is still FIRING."""
    dm = binding(db_url, unique)
    rule = add_rule(db_url, dm, HOT, "Hot")
    add_rule(db_url, dm, {"type": "threshold", "operator": ">", "value": 1000}, "Other")
    engine = new_engine(db_url)
    feed(db_url, engine, dm, (0, 30.0))  # Hot fires
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("UPDATE rules SET is_active = false WHERE id = %s", (rule,))
    feed(db_url, engine, dm, (1, 20.0))  # would resolve: dropped, the rule is inactive
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("UPDATE rules SET is_active = true WHERE id = %s", (rule,))
    engine.cache.mark_stale()  # what the catalogue notification does
    feed(db_url, engine, dm, (2, 31.0))  # still FIRING as stored: no second trigger
    feed(db_url, engine, dm, (3, 20.0))
    assert events(db_url) == [("triggered", at(0)), ("resolved", at(3))]


def test_a_binding_without_rules_for_a_while_has_no_stale_silence(db_url: str, unique: str) -> None:
    """The cursor goes with the binding's last active rule: a no_data rule added later does not
    measure a silence from a reading of long ago (the device kept reporting meanwhile)."""
    dm = binding(db_url, unique)
    rule = add_rule(db_url, dm, HOT, "Hot")
    engine = new_engine(db_url)
    feed(db_url, engine, dm, (0, 20.0))
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("DELETE FROM rules WHERE id = %s", (rule,))
        cursors = conn.execute(
            "SELECT count(*) FROM rule_cursors WHERE device_metric_id = %s", (dm,)
        ).fetchone()
    assert cursors == (0,)
    add_rule(db_url, dm, {"type": "no_data", "minutes": 10}, "Silent")
    engine.cache.mark_stale()
    with ConnectionPool(db_url, min_size=1, max_size=1, kwargs={"autocommit": True}) as pool:
        assert NoDataWorker(engine, pool).check(at(120)) == 0  # nothing to measure from yet
    feed(db_url, engine, dm, (121, 20.0))  # the first reading the new rule sees
    assert events(db_url) == []


def test_a_cursor_edited_by_hand_is_read_again(db_url: str, unique: str) -> None:
    """An UPDATE of rule_cursors that leaves the version alone still gets a new one, so the
    service reads the rewound cursor instead of overwriting it."""
    dm = binding(db_url, unique)
    add_rule(db_url, dm, HOT, "Hot")
    engine = new_engine(db_url)
    feed(db_url, engine, dm, (10, 20.0))
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute(
            "UPDATE rule_cursors SET last_ts = %s WHERE device_metric_id = %s", (at(0), dm)
        )
    with psycopg.connect(db_url, autocommit=True) as conn, conn.transaction():
        result = engine.on_inserted(conn, [reading(dm, at(5), 30.0)])
    assert result.late == 0  # minute 5 is after the rewound cursor: evaluated, and fires
    assert events(db_url) == [("triggered", at(5))]
