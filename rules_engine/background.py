"""The rule engine's background workers: the rule preloader, the no-data timer and the outbox.

They run once per service, in the process that holds the MQTT connection (with worker processes,
the receiving process: docs/architecture.md, "Worker processes"), never in a worker process. They
are put together here rather than in `rules_engine.engine` because the engine is also the batch
hook of every worker process, which only writes outbox rows inside its transaction: the outbox's
senders import httpx, smtplib and a paho client, tens of MB per process that a worker never uses.
"""

from __future__ import annotations

from typing import Any

from rules_engine.actions.outbox import OutboxWorker
from rules_engine.engine import RuleEngine
from rules_engine.no_data import NoDataWorker
from rules_engine.preload import RulePreloader
from rules_engine.workers import PoolKeeper
from schema import db


def workers(engine: RuleEngine) -> list[Any]:
    """The engine's workers, on a pool of their own (opened first, closed last)."""
    actions_pool = db.make_pool(engine.settings, "actions", size=3)
    return [
        PoolKeeper(actions_pool),
        RulePreloader(engine, actions_pool),
        NoDataWorker(engine, actions_pool),
        OutboxWorker(engine.settings, actions_pool, metrics=engine.metrics),
    ]
