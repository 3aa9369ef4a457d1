"""Versioned plain-SQL migrations, applied in order, each in its own transaction."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from importlib import resources

import psycopg
import structlog

from schema import locks
from schema import sql as queries_mod

log = structlog.get_logger(__name__)

_FILENAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")

queries = queries_mod.load("schema")


class MigrationError(Exception):
    """The migrations cannot be applied."""


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def available() -> list[Migration]:
    """The migrations shipped with this version, in order."""
    found = []
    for entry in resources.files("schema").joinpath("migrations").iterdir():
        match = _FILENAME.match(entry.name)
        if match:
            found.append(
                Migration(int(match.group(1)), match.group(2), entry.read_text(encoding="utf-8"))
            )
    found.sort(key=lambda m: m.version)
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise MigrationError("two migration files share a version number")
    return found


def migrate(conn: psycopg.Connection) -> list[Migration]:
    """Apply pending migrations; return those applied. `conn` must be in autocommit mode."""
    if not conn.autocommit:
        raise MigrationError("migrate() needs an autocommit connection")
    conn.execute(queries["lock_migrations"], {"key": locks.MIGRATION})
    try:
        conn.execute(queries["create_migrations_table"])
        applied = {row[0]: (row[1], row[2]) for row in conn.execute(queries["applied_migrations"])}
        done: list[Migration] = []
        for migration in available():
            if migration.version in applied:
                name, checksum = applied[migration.version]
                if checksum != migration.checksum:
                    # Editing a migration after it shipped makes databases differ silently.
                    log.warning("migration_checksum_mismatch", version=migration.version, name=name)
                continue
            with conn.transaction():
                conn.execute(migration.sql.encode())  # bytes: several statements, no params
                conn.execute(
                    queries["record_migration"],
                    {
                        "version": migration.version,
                        "name": migration.name,
                        "checksum": migration.checksum,
                    },
                )
            log.info("migration_applied", version=migration.version, name=migration.name)
            done.append(migration)
        return done
    finally:
        conn.execute(queries["unlock_migrations"], {"key": locks.MIGRATION})


def pending(conn: psycopg.Connection) -> list[Migration]:
    """Migrations not yet applied to this database."""
    exists = conn.execute("SELECT to_regclass('schema_migrations') IS NOT NULL").fetchone()
    applied: set[int] = set()
    if exists and exists[0]:
        applied = {row[0] for row in conn.execute(queries["applied_migrations"])}
    return [m for m in available() if m.version not in applied]
