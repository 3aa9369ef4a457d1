"""Rule states kept in memory between batches are used only while nobody else has written them.

Each test drives RuleEngine.on_inserted directly, in transactions of its own, against the real
database, with a second engine (another service instance), the no-data timer, a rollback or an
operator's statement changing the states in between.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

import psycopg
import pytest
from psycopg_pool import ConnectionPool

from config.settings import Settings
from ingestor import catalog
from iothub.metrics import Metrics
from rules_engine.engine import RuleEngine, RulePreloader
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
    return RuleEngine(Settings(database_url=db_url), Metrics())


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
    feed(db_url, engine, dm, (0, 20.0))
    with ConnectionPool(db_url, min_size=1, max_size=1, kwargs={"autocommit": True}) as pool:
        assert NoDataWorker(engine, pool).check(at(30)) == 1
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
