"""Every PostgreSQL advisory-lock key iothub takes, in one place so that no two collide.

Advisory locks are shared by everything connected to the database, so a key is a promise
between every iothub process (and any other program using the same database): one table of
them keeps that promise checkable. The SQL takes them as parameters (`%(key)s`,
`%(lock_class)s`), never as literals.

The single-key form (`pg_advisory_lock(bigint)`) and the two-key form (`pg_advisory_xact_lock(
int, int)`) are separate key spaces in PostgreSQL, so RULE_STATE_CLASS cannot meet the others.
The `0x107_4B_` prefix only makes our keys recognisable in `pg_locks`.
"""

from __future__ import annotations

from typing import Final

# Session lock held while `iothub migrate` applies migrations: two at once apply each once.
MIGRATION: Final = 0x107_4B_0001
# Transaction lock shared by every `iothub seed`: two at once do not write the data set twice.
SEED: Final = 0x107_4B_0002
# Transaction lock shared by every `iothub setup-timescaledb` run.
TIMESCALE_SETUP: Final = 0x107_4B_0003
# First key of the two-key lock `(RULE_STATE_CLASS, device_metric_id)`: "iothub rule state",
# taken by the batch transaction and the no-data timer around a device_metric's rule states.
RULE_STATE_CLASS: Final = 0x1074

__all__ = ["MIGRATION", "RULE_STATE_CLASS", "SEED", "TIMESCALE_SETUP"]
