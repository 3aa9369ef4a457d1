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

import zlib
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
# First key of the two-key session lock `(STANDBY_CLASS, standby_key(mqtt_client_id))`: held by
# the active instance of the instances that share one client id (iothub.daemon.election).
STANDBY_CLASS: Final = 0x1075


def standby_key(client_id: str) -> int:
    """The second key of the election lock of `client_id`: its CRC-32 as a signed int4.

    Stable across processes, versions and hosts (unlike `hash()`). Two client ids with the
    same CRC-32 on one database would share one active; at 32 bits that needs tens of
    thousands of client ids to become likely, and iothub pairs have a handful.
    """
    crc = zlib.crc32(client_id.encode("utf-8"))
    return crc - (1 << 32) if crc >= 1 << 31 else crc


__all__ = [
    "MIGRATION",
    "RULE_STATE_CLASS",
    "SEED",
    "STANDBY_CLASS",
    "TIMESCALE_SETUP",
    "standby_key",
]
