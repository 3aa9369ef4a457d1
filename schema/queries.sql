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

-- name: standby_session
-- The election connection's own settings. The server-side keepalives end the session of an
-- active whose host vanished (and so free its lock) within idle + interval * count seconds;
-- lock_timeout bounds each wait for the lock so that the waiting loop can see a stop request.
SELECT set_config('lock_timeout', %(lock_timeout)s, false),
       set_config('statement_timeout', %(statement_timeout)s, false),
       set_config('tcp_keepalives_idle', %(keepalives_idle)s, false),
       set_config('tcp_keepalives_interval', %(keepalives_interval)s, false),
       set_config('tcp_keepalives_count', %(keepalives_count)s, false),
       set_config('tcp_user_timeout', %(user_timeout)s, false)

-- name: standby_lock
-- A session lock: it lasts until unlocked or until this connection's session ends.
SELECT pg_advisory_lock(%(lock_class)s, %(key)s)

-- name: standby_check
-- Is the lock still held by this very session? (A cheap round trip that proves the session.)
SELECT count(*) > 0 AS held
FROM pg_locks
WHERE locktype = 'advisory' AND granted AND pid = pg_backend_pid()
  AND classid = %(lock_class)s::int::oid AND objid = %(key)s::int::oid AND objsubid = 2

-- name: standby_unlock
SELECT pg_advisory_unlock(%(lock_class)s, %(key)s)

-- name: standby_try_lock
-- The active, back from a broken lock connection: the lock at once, or the word that another
-- session holds it (then that instance is the active now).
SELECT pg_try_advisory_lock(%(lock_class)s, %(key)s) AS locked
