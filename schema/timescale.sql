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

-- Steps 7 .. 14: continuous aggregates under the names migration 0010 gave to plain views, with
-- the same columns, so every query against them works before and after. Each aggregate's plain
-- view is dropped first (it would hold the name; a view someone built on top of it makes the
-- drop fail, and the whole setup rolls back, rather than being dropped by CASCADE). WITH NO
-- DATA: materializing WITH DATA cannot run inside a transaction block (the refresh commits on
-- its own), and real-time aggregation (materialized_only = false) answers from `telemetries`
-- for whatever is not materialized yet, so the aggregates are correct at once and the refresh
-- policy fills them in the background. The refresh windows end before the newest bucket
-- (end_offset) so a bucket still receiving readings is not materialized over and over; the
-- retention of the aggregates (5 years) outlives the raw data's (1 year), and no refresh window
-- reaches back to where raw chunks have been dropped, so old buckets stay. The placeholders are the
-- aggregate_* settings (config/settings.py), put in as interval literals by schema/timescale.py.

-- name: step_7_drop_hourly_view
DROP VIEW IF EXISTS telemetry_hourly

-- name: done_step_7
SELECT EXISTS (
    SELECT 1 FROM timescaledb_information.continuous_aggregates
    WHERE view_schema = current_schema() AND view_name = 'telemetry_hourly'
)

-- name: step_8_hourly_aggregate
CREATE MATERIALIZED VIEW telemetry_hourly
WITH (timescaledb.continuous, timescaledb.materialized_only = false) AS
SELECT
    device_metric_id,
    time_bucket(INTERVAL '1 hour', ts) AS bucket,
    count(*) AS readings,
    min(value_numeric) AS value_min,
    max(value_numeric) AS value_max,
    avg(value_numeric) AS value_avg,
    last(value_jsonb, ts) AS value_last,
    max(ts) AS ts_last
FROM telemetries
GROUP BY device_metric_id, time_bucket(INTERVAL '1 hour', ts)
WITH NO DATA

-- name: done_step_8
SELECT EXISTS (
    SELECT 1 FROM timescaledb_information.continuous_aggregates
    WHERE view_schema = current_schema() AND view_name = 'telemetry_hourly'
)

-- name: step_9_hourly_refresh_policy
SELECT add_continuous_aggregate_policy(
    'telemetry_hourly',
    start_offset => INTERVAL {hourly_refresh_window},
    end_offset => INTERVAL '1 hour',
    schedule_interval => INTERVAL {hourly_refresh_interval},
    if_not_exists => true
)

-- name: step_10_hourly_retention_policy
SELECT add_retention_policy('telemetry_hourly', INTERVAL {aggregate_retention}, if_not_exists => true)

-- name: step_11_drop_daily_view
DROP VIEW IF EXISTS telemetry_daily

-- name: done_step_11
SELECT EXISTS (
    SELECT 1 FROM timescaledb_information.continuous_aggregates
    WHERE view_schema = current_schema() AND view_name = 'telemetry_daily'
)

-- name: step_12_daily_aggregate
CREATE MATERIALIZED VIEW telemetry_daily
WITH (timescaledb.continuous, timescaledb.materialized_only = false) AS
SELECT
    device_metric_id,
    time_bucket(INTERVAL '1 day', ts) AS bucket,
    count(*) AS readings,
    min(value_numeric) AS value_min,
    max(value_numeric) AS value_max,
    avg(value_numeric) AS value_avg,
    last(value_jsonb, ts) AS value_last,
    max(ts) AS ts_last
FROM telemetries
GROUP BY device_metric_id, time_bucket(INTERVAL '1 day', ts)
WITH NO DATA

-- name: done_step_12
SELECT EXISTS (
    SELECT 1 FROM timescaledb_information.continuous_aggregates
    WHERE view_schema = current_schema() AND view_name = 'telemetry_daily'
)

-- name: step_13_daily_refresh_policy
SELECT add_continuous_aggregate_policy(
    'telemetry_daily',
    start_offset => INTERVAL {daily_refresh_window},
    end_offset => INTERVAL '1 day',
    schedule_interval => INTERVAL {daily_refresh_interval},
    if_not_exists => true
)

-- name: step_14_daily_retention_policy
SELECT add_retention_policy('telemetry_daily', INTERVAL {aggregate_retention}, if_not_exists => true)

-- name: aggregates_exist
-- Both continuous aggregates are in place: with a hypertable, the setup is complete. A
-- hypertable set up by an earlier release lacks them, and a plain rerun adds them.
SELECT count(*) = 2 FROM timescaledb_information.continuous_aggregates
WHERE view_schema = current_schema() AND view_name IN ('telemetry_hourly', 'telemetry_daily')

-- Steps 15 and 16 run after the commit, since a refresh cannot run in a transaction block, and
-- only for an aggregate this run created (one that was in place before is left to its policy: a
-- refresh over a range whose raw chunks the retention dropped would empty its buckets). They
-- materialize the history. Without them it would disappear from the aggregate within seconds:
-- the refresh policy's first run (it is due at once) materializes its window only and moves the
-- watermark to the window's end, and real-time aggregation reads raw readings only above the
-- watermark, so every bucket older than the window would be missing until refreshed by hand.

-- name: step_15_hourly_history_after_commit
CALL refresh_continuous_aggregate('telemetry_hourly', NULL, now() - INTERVAL '1 hour')

-- name: done_step_15
SELECT EXISTS (
    SELECT 1 FROM timescaledb_information.continuous_aggregates
    WHERE view_schema = current_schema() AND view_name = 'telemetry_hourly'
)

-- name: step_16_daily_history_after_commit
CALL refresh_continuous_aggregate('telemetry_daily', NULL, now() - INTERVAL '1 day')

-- name: done_step_16
SELECT EXISTS (
    SELECT 1 FROM timescaledb_information.continuous_aggregates
    WHERE view_schema = current_schema() AND view_name = 'telemetry_daily'
)
