-- name: create_migrations_table
CREATE TABLE IF NOT EXISTS schema_migrations (
    version    integer PRIMARY KEY,
    name       text NOT NULL,
    checksum   text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)

-- name: applied_migrations
SELECT version, name, checksum FROM schema_migrations ORDER BY version

-- name: record_migration
INSERT INTO schema_migrations (version, name, checksum) VALUES (%(version)s, %(name)s, %(checksum)s)

-- name: lock_migrations
-- A session-level advisory lock: two `iothub migrate` at once apply each migration once.
SELECT pg_advisory_lock(%(key)s)

-- name: unlock_migrations
SELECT pg_advisory_unlock(%(key)s)
