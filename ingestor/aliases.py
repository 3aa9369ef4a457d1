"""Sparkplug B aliases: what the last birth of each edge node and device defined.

Sparkplug's NDATA/DDATA name their metrics by the aliases (and use the datatypes) that the
NBIRTH/DBIRTH of the same session defined; births are published once, at QoS 0, and never
retained. So what a birth defined is state, and it must outlive a restart of iothub:

- ``AliasStore`` holds it in memory for the decoder (``ingestor.decoders.sparkplug_b``), which
  only reads it. It is loaded whole from ``sparkplug_aliases`` before the first batch is
  prepared (``Pipeline``), and owned by the prepare thread from then on.
- A birth the decoder found comes back as a ``Birth`` in its ``ParseResult``; ``batch.prepare``
  applies it to the store before the next message is decoded (so data after a birth in the same
  batch resolves), and the writer stores it in that batch's transaction (``store``). Batches are
  written and acknowledged in order, so a birth is durable before any message after it is
  acknowledged; if the transaction fails, nothing of the batch is acknowledged and the broker
  delivers the birth again (at QoS 1; a QoS 0 birth is only as safe as its delivery).
- Only births of devices in the catalogue are kept (``batch.prepare`` checks), so the table
  grows with the fleet, not with whatever publishes under ``spBv1.0/``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal

import psycopg

from schema import sql as queries_mod

queries = queries_mod.load("ingestor", "aliases.sql")

Scope = tuple[str, str, str]
"""(group_id, edge_node_id, device_id); device_id is "" for the edge node's own metrics."""


@dataclass(frozen=True, slots=True)
class Definition:
    """One metric a birth defined: its name, its alias (None: the birth gave none), datatype."""

    name: str
    alias: int | None
    datatype: int


@dataclass(frozen=True, slots=True)
class Birth:
    """Everything one NBIRTH or DBIRTH defined; it replaces what its scope had before."""

    scope: Scope
    serial_id: str  # the iothub device of the birth: only known devices' births are kept
    definitions: tuple[Definition, ...]


class AliasStore:
    """What the last birth of each scope defined, by alias and by name."""

    def __init__(self) -> None:
        self._by_alias: dict[Scope, dict[int, Definition]] = {}
        self._by_name: dict[Scope, dict[str, Definition]] = {}

    def __len__(self) -> int:
        """The number of scopes (edge nodes and devices) with a birth."""
        return len(self._by_name)

    def by_alias(self, scope: Scope, alias: int) -> Definition | None:
        return self._by_alias.get(scope, {}).get(alias)

    def aliases(self, scope: Scope) -> Mapping[int, Definition] | None:
        """The scope's definitions by alias, or None before any birth of it. The same object
        until the scope's next birth (or ``load``), so a reader may cache what it derives from
        it and check that with ``is``."""
        return self._by_alias.get(scope)

    def by_name(self, scope: Scope, name: str) -> Definition | None:
        return self._by_name.get(scope, {}).get(name)

    def apply(self, birth: Birth) -> None:
        """Replace the scope's definitions with the birth's."""
        self._set(birth.scope, birth.definitions)

    def _set(self, scope: Scope, definitions: Sequence[Definition]) -> None:
        self._by_name[scope] = {d.name: d for d in definitions}
        self._by_alias[scope] = {d.alias: d for d in definitions if d.alias is not None}

    def load(self, conn: psycopg.Connection) -> int:
        """Replace everything with what the database holds; the number of scopes loaded."""
        scopes: dict[Scope, list[Definition]] = {}
        for group, node, device, name, alias, datatype in conn.execute(
            queries["load_sparkplug_aliases"]
        ).fetchall():
            number = None if alias is None else int(alias)
            scopes.setdefault((group, node, device), []).append(Definition(name, number, datatype))
        self._by_alias.clear()
        self._by_name.clear()
        for scope, definitions in scopes.items():
            self._set(scope, definitions)
        return len(scopes)


def store(conn: psycopg.Connection, births: Sequence[Birth]) -> None:
    """Write births in the caller's transaction, in order (a later birth of a scope wins)."""
    for birth in births:
        group, node, device = birth.scope
        scope = {"group": group, "node": node, "device": device}
        conn.execute(queries["forget_sparkplug_scope"], scope)
        if not birth.definitions:
            continue
        conn.execute(
            queries["insert_sparkplug_aliases"],
            {
                **scope,
                "serial": birth.serial_id,
                "names": [d.name for d in birth.definitions],
                "aliases": [
                    None if d.alias is None else Decimal(d.alias) for d in birth.definitions
                ],
                "datatypes": [d.datatype for d in birth.definitions],
            },
        )
