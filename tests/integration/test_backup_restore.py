"""scripts/backup_db.sh and scripts/restore_db.sh against a real server: a seeded database
survives a dump and a restore with every table's rows, and old dumps are cleaned up."""

from __future__ import annotations

import os
import re
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from iothub import exitcodes
from iothub.cli import main as cli
from tests.conftest import drop_database

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"
DAY = 24 * 3600  # seconds
TIMEOUT = 120  # seconds per script run


def script(name: str, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(SCRIPTS / name), *args],
        env={**{k: v for k, v in os.environ.items() if not k.startswith("IOTHUB_")}, **env},
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )


def row_counts(dsn: str) -> dict[str, int]:
    """Rows of every table in schema public."""
    with psycopg.connect(dsn) as conn:
        tables = [
            r[0]
            for r in conn.execute(
                "SELECT tablename::text FROM pg_tables WHERE schemaname = 'public' ORDER BY 1"
            )
        ]
        counts = {}
        for table in tables:
            row = conn.execute(
                psycopg.sql.SQL("SELECT count(*) FROM {}").format(psycopg.sql.Identifier(table))
            ).fetchone()
            assert row is not None
            counts[table] = row[0]
        return counts


@pytest.fixture
def seeded_db(db_url: str, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("IOTHUB_DATABASE_URL", db_url)
    monkeypatch.setenv("IOTHUB_LOG_FORMAT", "json")
    assert cli.main(["seed"]) == exitcodes.OK
    return db_url


@pytest.fixture
def target_name(pg_admin_dsn: str) -> Iterator[str]:
    """A database name for the restore, dropped afterwards."""
    name = f"iothub_restored_{uuid.uuid4().hex[:8]}"
    yield name
    drop_database(pg_admin_dsn, name)


def test_scripts_are_strict_bash() -> None:
    """Both scripts stop on errors, failed pipes and unset variables."""
    for name in ("backup_db.sh", "restore_db.sh"):
        text = (SCRIPTS / name).read_text()
        assert text.startswith("#!/usr/bin/env bash\n")
        assert "set -o errexit -o pipefail -o nounset" in text
        assert os.access(SCRIPTS / name, os.X_OK), f"{name} is not executable"


def test_backup_and_restore_keep_every_row(
    seeded_db: str, target_name: str, tmp_path: Path
) -> None:
    """A dump of a seeded database restores into a new one with the same rows in every table."""
    backup = script(
        "backup_db.sh", env={"IOTHUB_DATABASE_URL": seeded_db, "BACKUP_DIR": str(tmp_path)}
    )
    assert backup.returncode == 0, backup.stderr
    dumps = sorted(tmp_path.glob("iothub_*.dump"))
    assert len(dumps) == 1
    assert re.fullmatch(r"iothub_\d{8}_\d{6}\.dump", dumps[0].name)
    assert backup.stdout.strip() == str(dumps[0])
    assert not list(tmp_path.glob("*.partial"))
    log = backup.stderr.splitlines()
    assert log and all(
        re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ backup_db: ", line) for line in log
    )

    restore = script(
        "restore_db.sh", str(dumps[0]), target_name, env={"IOTHUB_DATABASE_URL": seeded_db}
    )
    assert restore.returncode == 0, restore.stderr
    restored = psycopg.conninfo.make_conninfo(seeded_db, dbname=target_name)
    source = row_counts(seeded_db)
    assert source["telemetries"] > 5000 and source["events"] == 8
    assert row_counts(restored) == source

    # Restoring over an existing database is refused, and --force replaces it.
    again = script(
        "restore_db.sh", str(dumps[0]), target_name, env={"IOTHUB_DATABASE_URL": seeded_db}
    )
    assert again.returncode != 0
    assert "exists; use --force" in again.stderr
    with psycopg.connect(restored, autocommit=True) as conn:
        conn.execute("DELETE FROM events")
    forced = script(
        "restore_db.sh",
        "--force",
        str(dumps[0]),
        target_name,
        env={"IOTHUB_DATABASE_URL": seeded_db},
    )
    assert forced.returncode == 0, forced.stderr
    assert row_counts(restored) == source


def test_old_dumps_are_removed_recent_ones_kept(seeded_db: str, tmp_path: Path) -> None:
    """A dump last modified 8 days ago is removed; one from 1 day ago and other files stay."""
    now = time.time()
    old = tmp_path / "iothub_20200101_000000.dump"
    recent = tmp_path / "iothub_20200108_000000.dump"
    unrelated = tmp_path / "notes.txt"
    for path, age in ((old, 8 * DAY), (recent, 1 * DAY), (unrelated, 30 * DAY)):
        path.write_bytes(b"x")
        os.utime(path, (now - age, now - age))
    result = script(
        "backup_db.sh", env={"IOTHUB_DATABASE_URL": seeded_db, "BACKUP_DIR": str(tmp_path)}
    )
    assert result.returncode == 0, result.stderr
    assert not old.exists()
    assert recent.exists() and unrelated.exists()
    assert len(list(tmp_path.glob("iothub_*.dump"))) == 2  # the recent one and the new one
    assert f"removed {old}" in result.stderr


def test_failed_backup_leaves_no_file(tmp_path: Path) -> None:
    """When pg_dump cannot connect the script fails and leaves no dump, partial or whole."""
    result = script(
        "backup_db.sh",
        env={
            "IOTHUB_DATABASE_URL": "postgresql://postgres@127.0.0.1:1/none?connect_timeout=2",
            "BACKUP_DIR": str(tmp_path),
        },
    )
    assert result.returncode != 0
    assert "FAILED" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_restore_refuses_a_file_that_is_not_a_dump(
    seeded_db: str, target_name: str, tmp_path: Path
) -> None:
    """A file that is not a custom-format dump is refused before any database is created."""
    bogus = tmp_path / "bogus.dump"
    bogus.write_text("not a dump")
    result = script(
        "restore_db.sh", str(bogus), target_name, env={"IOTHUB_DATABASE_URL": seeded_db}
    )
    assert result.returncode != 0
    assert "not a pg_dump custom-format archive" in result.stderr
    with psycopg.connect(seeded_db) as conn:
        exists = conn.execute(
            "SELECT count(*) FROM pg_database WHERE datname = %s", (target_name,)
        ).fetchone()
    assert exists == (0,)
