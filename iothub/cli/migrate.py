"""`iothub migrate`."""

from __future__ import annotations

import argparse

import psycopg
import structlog

from config.settings import Settings
from iothub import exitcodes
from schema import db, migrate

log = structlog.get_logger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--list", action="store_true", help="only list pending migrations, apply nothing"
    )


def main(settings: Settings, args: argparse.Namespace) -> int:
    try:
        conn = db.connect(settings, "migrate", autocommit=True)
    except psycopg.OperationalError as exc:
        log.error("db_unavailable", error=str(exc).strip())
        return exitcodes.CONNECTION_FAILED
    with conn:
        if args.list:
            todo = migrate.pending(conn)
            for m in todo:
                print(f"{m.version:04d} {m.name}")
            log.info("migrations_pending", count=len(todo))
            return exitcodes.OK
        applied = migrate.migrate(conn)
        log.info(
            "migrations_done",
            applied=[f"{m.version:04d}_{m.name}" for m in applied],
            up_to_date=not applied,
        )
    return exitcodes.OK
