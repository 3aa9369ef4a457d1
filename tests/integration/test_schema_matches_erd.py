"""The migrated schema against the seed's ERD (database-schema.md), column by column.

Each expectation is the ERD's; where the schema deliberately differs, the expectation says so in
a comment (docs/schema.md explains each difference). Columns the ERD does not have are allowed
only if listed in ADDITIONS.
"""

from __future__ import annotations

from typing import NamedTuple

import psycopg
import pytest
from psycopg.types.json import Jsonb


class Column(NamedTuple):
    data_type: str  # information_schema.columns.data_type
    udt_name: str
    max_length: int | None
    nullable: bool
    default: str | None
    generated: bool = False


SERIAL = "nextval('{table}_id_seq'::regclass)"
TSTZ = "timestamp with time zone"  # differs: the ERD's `timestamp` columns are all timestamptz

ERD: dict[str, dict[str, Column]] = {
    "users": {
        "id": Column("integer", "int4", None, False, SERIAL),
        "username": Column("character varying", "varchar", 150, False, None),
        "email": Column("character varying", "varchar", 255, False, None),
        "password": Column("character varying", "varchar", 255, False, None),
        # differs: NOT NULL (the ERD gives a default but no nullability)
        "role": Column("USER-DEFINED", "user_role", None, False, "'client'::user_role"),
        "created_at": Column(TSTZ, "timestamptz", None, False, "CURRENT_TIMESTAMP"),
        "updated_at": Column(TSTZ, "timestamptz", None, False, "CURRENT_TIMESTAMP"),
    },
    "devices": {
        "id": Column("integer", "int4", None, False, SERIAL),
        "serial_id": Column("character varying", "varchar", 255, False, None),
        "name": Column("character varying", "varchar", 255, False, None),
        "description": Column("text", "text", None, True, None),
        "user_id": Column("integer", "int4", None, True, None),
        "is_active": Column("boolean", "bool", None, False, "true"),  # differs: NOT NULL
        "created_at": Column(TSTZ, "timestamptz", None, False, "CURRENT_TIMESTAMP"),
    },
    "metrics": {
        "id": Column("integer", "int4", None, False, SERIAL),
        "metric_type": Column("USER-DEFINED", "citext", None, False, None),
        "data_type": Column("USER-DEFINED", "metric_data_type", None, False, None),
    },
    "device_metrics": {
        "id": Column("integer", "int4", None, False, SERIAL),
        "device_id": Column("integer", "int4", None, False, None),  # differs: NOT NULL
        "metric_id": Column("integer", "int4", None, False, None),  # differs: NOT NULL
    },
    "telemetries": {
        "id": Column("bigint", "int8", None, False, SERIAL),
        "device_metric_id": Column("integer", "int4", None, False, None),  # differs: NOT NULL
        "value_jsonb": Column("jsonb", "jsonb", None, False, None),
        "value_numeric": Column("numeric", "numeric", None, True, None, generated=True),
        "value_bool": Column("boolean", "bool", None, True, None, generated=True),
        "value_str": Column("text", "text", None, True, None, generated=True),
        "ts": Column(TSTZ, "timestamptz", None, False, "now()"),
        "created_at": Column(TSTZ, "timestamptz", None, False, "now()"),  # differs: NOT NULL
    },
    "rules": {
        "id": Column("integer", "int4", None, False, SERIAL),
        "name": Column("character varying", "varchar", 255, False, None),
        "description": Column("text", "text", None, True, None),
        "condition": Column("jsonb", "jsonb", None, False, None),
        "action": Column("jsonb", "jsonb", None, False, None),
        "is_active": Column("boolean", "bool", None, False, "true"),  # differs: NOT NULL
        "device_metric_id": Column("integer", "int4", None, False, None),
    },
    "events": {
        "id": Column("bigint", "int8", None, False, SERIAL),
        "timestamp": Column(TSTZ, "timestamptz", None, True, None),
        "rule_id": Column("integer", "int4", None, False, None),
        "created_at": Column(TSTZ, "timestamptz", None, False, "CURRENT_TIMESTAMP"),
    },
}

# Columns added to the ERD's tables (the design allows additions; docs/schema.md lists them).
ADDITIONS = {
    ("events", "kind"),
    ("events", "device_metric_id"),
    ("events", "context"),
}

UNIQUE = {
    ("users", ("username",)),
    ("users", ("email",)),
    ("devices", ("serial_id",)),
    ("metrics", ("metric_type",)),
    ("device_metrics", ("device_id", "metric_id")),
    ("telemetries", ("device_metric_id", "ts")),
}

# (table, column) -> (referenced table, referenced column, ON DELETE). The actions are ours: the
# ERD draws the relations without saying what a delete does.
FOREIGN_KEYS = {
    ("devices", "user_id"): ("users", "id", "SET NULL"),
    ("device_metrics", "device_id"): ("devices", "id", "CASCADE"),
    ("device_metrics", "metric_id"): ("metrics", "id", "RESTRICT"),
    ("telemetries", "device_metric_id"): ("device_metrics", "id", "CASCADE"),
    ("rules", "device_metric_id"): ("device_metrics", "id", "CASCADE"),
    ("events", "rule_id"): ("rules", "id", "CASCADE"),
    ("events", "device_metric_id"): ("device_metrics", "id", "CASCADE"),  # an addition
}

# The seed's "Recommended Indexes": name -> (table, columns, unique).
RECOMMENDED_INDEXES = {
    "idx_users_role": ("users", ("role",), False),
    "idx_devices_user_id": ("devices", ("user_id",), False),
    "idx_devices_is_active": ("devices", ("is_active",), False),
    "uq_device_metric": ("device_metrics", ("device_id", "metric_id"), True),
    "idx_device_metrics_device": ("device_metrics", ("device_id",), False),
    "idx_device_metrics_metric": ("device_metrics", ("metric_id",), False),
    "idx_rules_device_metric": ("rules", ("device_metric_id",), False),
    "idx_rules_is_active": ("rules", ("is_active",), False),
    "idx_events_timestamp": ("events", ("timestamp",), False),
    "idx_events_rule": ("events", ("rule_id",), False),
    "unique_telemetry_per_metric_time": ("telemetries", ("device_metric_id", "ts"), True),
    "idx_telemetries_timestamp": ("telemetries", ("ts",), False),
}
LEFT_OUT = "idx_telemetries_metric_time"  # an exact copy of unique_telemetry_per_metric_time


def _columns(conn: psycopg.Connection) -> dict[tuple[str, str], Column]:
    rows = conn.execute(
        """
        SELECT table_name::text, column_name::text, data_type::text, udt_name::text,
               character_maximum_length, is_nullable = 'YES', column_default,
               is_generated = 'ALWAYS'
        FROM information_schema.columns
        WHERE table_schema = 'public' AND table_name = ANY(%s)
        """,
        (list(ERD),),
    ).fetchall()
    return {(r[0], r[1]): Column(*r[2:]) for r in rows}


def _indexes(conn: psycopg.Connection) -> dict[str, tuple[str, tuple[str, ...], bool]]:
    rows = conn.execute(
        """
        SELECT i.relname::text, t.relname::text,
               array_agg(a.attname::text ORDER BY k.n), ix.indisunique
        FROM pg_index ix
        JOIN pg_class i ON i.oid = ix.indexrelid
        JOIN pg_class t ON t.oid = ix.indrelid
        CROSS JOIN LATERAL unnest(ix.indkey) WITH ORDINALITY AS k(attnum, n)
        JOIN pg_attribute a ON a.attrelid = t.oid AND a.attnum = k.attnum
        WHERE t.relnamespace = 'public'::regnamespace
        GROUP BY i.relname, t.relname, ix.indisunique
        """
    ).fetchall()
    return {r[0]: (r[1], tuple(r[2]), r[3]) for r in rows}


@pytest.mark.parametrize("table", list(ERD))
def test_columns_match_the_erd(conn: psycopg.Connection, table: str) -> None:
    """Every ERD column exists with its type, length, nullability, default and generation."""
    found = _columns(conn)
    for column, expected in ERD[table].items():
        want = expected._replace(
            default=expected.default.format(table=table) if expected.default else None
        )
        assert found.get((table, column)) == want, f"{table}.{column}"
    extra = {key for key in found if key[0] == table and key[1] not in ERD[table]}
    assert extra <= ADDITIONS, f"undocumented columns: {sorted(extra - ADDITIONS)}"


def test_primary_and_unique_keys_match_the_erd(conn: psycopg.Connection) -> None:
    """Each table's primary key is id; the unique constraints are exactly the ERD's."""
    rows = conn.execute(
        """
        SELECT c.contype::text, c.conrelid::regclass::text,
               array_agg(a.attname::text ORDER BY k.n)
        FROM pg_constraint c
        CROSS JOIN LATERAL unnest(c.conkey) WITH ORDINALITY AS k(attnum, n)
        JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = k.attnum
        WHERE c.contype IN ('p', 'u') AND c.conrelid::regclass::text = ANY(%s)
        GROUP BY c.oid, c.contype, c.conrelid
        """,
        (list(ERD),),
    ).fetchall()
    primary = {(table, tuple(cols)) for kind, table, cols in rows if kind == "p"}
    unique = {(table, tuple(cols)) for kind, table, cols in rows if kind == "u"}
    assert primary == {(table, ("id",)) for table in ERD}
    assert unique == UNIQUE


def test_foreign_keys_match_the_erd(conn: psycopg.Connection) -> None:
    """Every relation of the ERD is a foreign key, with the delete action docs/schema.md gives."""
    rows = conn.execute(
        """
        SELECT c.conrelid::regclass::text, a.attname::text, c.confrelid::regclass::text,
               fa.attname::text,
               CASE c.confdeltype WHEN 'c' THEN 'CASCADE' WHEN 'n' THEN 'SET NULL'
                    WHEN 'r' THEN 'RESTRICT' WHEN 'a' THEN 'NO ACTION' ELSE 'SET DEFAULT' END
        FROM pg_constraint c
        JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = c.conkey[1]
        JOIN pg_attribute fa ON fa.attrelid = c.confrelid AND fa.attnum = c.confkey[1]
        WHERE c.contype = 'f' AND cardinality(c.conkey) = 1
          AND c.conrelid::regclass::text = ANY(%s)
        """,
        (list(ERD),),
    ).fetchall()
    assert {(r[0], r[1]): (r[2], r[3], r[4]) for r in rows} == FOREIGN_KEYS


def test_recommended_indexes_exist_except_the_duplicate(conn: psycopg.Connection) -> None:
    """Every recommended index exists by name on its columns; the duplicate one is left out."""
    indexes = _indexes(conn)
    for name, expected in RECOMMENDED_INDEXES.items():
        assert indexes.get(name) == expected, name
    assert LEFT_OUT not in indexes
    # The unique constraint's index serves (device_metric_id, ts) alone: nothing duplicates it.
    pair = ("telemetries", ("device_metric_id", "ts"))
    on_pair = [name for name, (table, cols, _) in indexes.items() if (table, cols) == pair]
    assert on_pair == ["unique_telemetry_per_metric_time"]


def test_generated_value_columns_follow_the_type_tag(conn: psycopg.Connection) -> None:
    """value_numeric/value_bool/value_str are filled from value_jsonb, each only for its tag."""
    conn.execute("INSERT INTO metrics (metric_type, data_type) VALUES ('m', 'numeric')")
    conn.execute("INSERT INTO devices (serial_id, name) VALUES ('SN-ERD-1', 'erd')")
    conn.execute(
        "INSERT INTO device_metrics (device_id, metric_id) "
        "SELECT d.id, m.id FROM devices d, metrics m"
    )
    values = [
        {"t": "numeric", "v": 21.5},
        {"t": "boolean", "v": True},
        {"t": "str", "v": "42"},  # looks like a number, is a string
    ]
    for i, value in enumerate(values):
        conn.execute(
            "INSERT INTO telemetries (device_metric_id, ts, value_jsonb) "
            "SELECT id, now() - %s * interval '1 minute', %s FROM device_metrics",
            (i, Jsonb(value)),
        )
    rows = conn.execute(
        "SELECT value_numeric, value_bool, value_str FROM telemetries ORDER BY ts DESC"
    ).fetchall()
    assert [tuple(map(str, r)) for r in rows] == [
        ("21.5", "None", "None"),
        ("None", "True", "None"),
        ("None", "None", "42"),
    ]
    with pytest.raises(psycopg.errors.CheckViolation):
        conn.execute(
            "INSERT INTO telemetries (device_metric_id, value_jsonb) "
            "SELECT id, %s FROM device_metrics",
            (Jsonb({"t": "numeric", "v": "21.5"}),),
        )
