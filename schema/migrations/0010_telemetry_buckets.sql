-- Hourly and daily buckets of every device metric, under the names dashboards read.
--
-- On plain PostgreSQL these are ordinary views over `telemetries`: every query against them
-- works, but each one aggregates the raw rows again (the (device_metric_id, ts) index narrows it
-- to one binding; the grouping is paid on every read). `iothub setup-timescaledb` replaces both
-- with continuous aggregates of the same names and the same columns (schema/timescale.sql,
-- steps 7 and after), so no query changes when the extension arrives.
--
-- Buckets are cut in UTC, as time_bucket() cuts them by default, so a bucket's start is the same
-- instant on both servers whatever the session's TimeZone. min/max/avg read value_numeric, which
-- is NULL for boolean and string readings: those metrics get only readings, value_last, ts_last.
-- value_last is the whole value_jsonb ({"t": ..., "v": ...}) of the bucket's newest reading.
--
-- CREATE OR REPLACE: a rerun is harmless, and a later migration can change the body while the
-- columns stay. Once setup-timescaledb has replaced them, the names are continuous aggregates
-- and this file is not run again (schema_migrations remembers it).

CREATE OR REPLACE VIEW telemetry_hourly AS
SELECT
    device_metric_id,
    date_trunc('hour', ts, 'UTC') AS bucket,
    count(*) AS readings,
    min(value_numeric) AS value_min,
    max(value_numeric) AS value_max,
    avg(value_numeric) AS value_avg,
    (array_agg(value_jsonb ORDER BY ts DESC))[1] AS value_last,
    max(ts) AS ts_last
FROM telemetries
GROUP BY device_metric_id, date_trunc('hour', ts, 'UTC');

CREATE OR REPLACE VIEW telemetry_daily AS
SELECT
    device_metric_id,
    date_trunc('day', ts, 'UTC') AS bucket,
    count(*) AS readings,
    min(value_numeric) AS value_min,
    max(value_numeric) AS value_max,
    avg(value_numeric) AS value_avg,
    (array_agg(value_jsonb ORDER BY ts DESC))[1] AS value_last,
    max(ts) AS ts_last
FROM telemetries
GROUP BY device_metric_id, date_trunc('day', ts, 'UTC');
