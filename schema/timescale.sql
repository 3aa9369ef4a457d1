-- `iothub setup-timescaledb`: the seed's six steps (blocks step_1 .. step_6, run in this order in
-- one transaction) and the checks made before them. Running the steps again (`--force`) must be
-- harmless: steps 1, 3, 5 and 6 say IF NOT EXISTS themselves; steps 2 and 4 have a `done_step_N`
-- block, and are skipped when it returns true, because TimescaleDB refuses any DROP CONSTRAINT
-- (even IF EXISTS of nothing) on a hypertable with compression enabled, and refuses to set the
-- compression options again once chunks are compressed.

-- name: lock_setup
-- Two setups at once would both find "not a hypertable yet"; the second waits, then re-checks.
SELECT pg_advisory_xact_lock(%(key)s)

-- name: extension_available
SELECT default_version FROM pg_available_extensions WHERE name = 'timescaledb'

-- name: extension_installed
SELECT extversion FROM pg_extension WHERE extname = 'timescaledb'

-- name: telemetries_exists
SELECT to_regclass('telemetries') IS NOT NULL

-- name: is_hypertable
-- Only valid once the extension is installed: the view belongs to it.
SELECT EXISTS (
    SELECT 1
    FROM timescaledb_information.hypertables
    WHERE hypertable_schema = current_schema() AND hypertable_name = 'telemetries'
)

-- name: step_1_extension
CREATE EXTENSION IF NOT EXISTS timescaledb

-- name: step_2_drop_primary_key
-- TimescaleDB refuses a unique index that does not contain the time column, and the primary key
-- is on id alone. unique_telemetry_per_metric_time (device_metric_id, ts) stays: it contains ts.
ALTER TABLE telemetries DROP CONSTRAINT IF EXISTS telemetries_pkey

-- name: done_step_2
SELECT NOT EXISTS (
    SELECT 1 FROM pg_constraint
    WHERE conrelid = 'telemetries'::regclass AND conname = 'telemetries_pkey'
)

-- name: step_3_hypertable
SELECT create_hypertable(
    'telemetries',
    'ts',
    chunk_time_interval => INTERVAL '7 days',
    migrate_data => true,
    if_not_exists => true
)

-- name: step_4_compression
ALTER TABLE telemetries SET (
    timescaledb.compress,
    timescaledb.compress_segmentby = 'device_metric_id',
    timescaledb.compress_orderby = 'ts DESC'
)

-- name: done_step_4
-- Compression already enabled with exactly the seed's options.
SELECT coalesce((
    SELECT compression_enabled
    FROM timescaledb_information.hypertables
    WHERE hypertable_schema = current_schema() AND hypertable_name = 'telemetries'
), false)
AND coalesce((
    SELECT array_agg(attname::text ORDER BY segmentby_column_index)
    FROM timescaledb_information.compression_settings
    WHERE hypertable_schema = current_schema() AND hypertable_name = 'telemetries'
      AND segmentby_column_index IS NOT NULL
) = ARRAY['device_metric_id'], false)
AND coalesce((
    SELECT array_agg(attname::text || CASE WHEN orderby_asc THEN ' ASC' ELSE ' DESC' END
                     ORDER BY orderby_column_index)
    FROM timescaledb_information.compression_settings
    WHERE hypertable_schema = current_schema() AND hypertable_name = 'telemetries'
      AND orderby_column_index IS NOT NULL
) = ARRAY['ts DESC'], false)

-- name: step_5_compression_policy
SELECT add_compression_policy('telemetries', INTERVAL '30 days', if_not_exists => true)

-- name: step_6_retention_policy
SELECT add_retention_policy('telemetries', INTERVAL '1 year', if_not_exists => true)
