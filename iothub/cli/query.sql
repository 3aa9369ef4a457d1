-- The seed's two example queries (database-schema.md, "Query Optimization Examples"), with
-- parameters where the seed wrote literals, plus the look-ups that find their arguments.

-- name: last_readings
-- Served by unique_telemetry_per_metric_time (device_metric_id, ts), scanned backwards: the
-- newest `limit` rows of one binding, without sorting.
SELECT
    ts,
    value_numeric,
    value_bool,
    value_str
FROM telemetries
WHERE device_metric_id = %(device_metric_id)s
ORDER BY ts DESC
LIMIT %(limit)s

-- name: recent_readings
SELECT
    d.serial_id,
    d.name AS device_name,
    m.metric_type AS metric_type,
    t.ts,
    t.value_numeric,
    t.value_bool,
    t.value_str
FROM telemetries t
JOIN device_metrics dm ON t.device_metric_id = dm.id
JOIN devices d ON dm.device_id = d.id
JOIN metrics m ON dm.metric_id = m.id
WHERE d.id = %(device_id)s
AND t.ts >= NOW() - %(hours)s::float8 * INTERVAL '1 hour'
ORDER BY t.ts DESC

-- name: binding_by_id
SELECT dm.id, d.serial_id::text, m.metric_type::text
FROM device_metrics dm
JOIN devices d ON d.id = dm.device_id
JOIN metrics m ON m.id = dm.metric_id
WHERE dm.id = %(device_metric_id)s

-- name: binding_by_names
SELECT dm.id, d.serial_id::text, m.metric_type::text
FROM device_metrics dm
JOIN devices d ON d.id = dm.device_id
JOIN metrics m ON m.id = dm.metric_id
WHERE d.serial_id = %(serial_id)s AND m.metric_type = %(metric_type)s::citext

-- name: device_by_serial
SELECT id, serial_id::text, name::text FROM devices WHERE serial_id = %(device)s

-- name: device_by_id
SELECT id, serial_id::text, name::text FROM devices WHERE id = %(device_id)s

-- name: stats_bindings
SELECT dm.id
FROM device_metrics dm
JOIN metrics m ON m.id = dm.metric_id
WHERE dm.device_id = %(device_id)s
AND (%(metric_type)s::text IS NULL OR m.metric_type = %(metric_type)s::citext)

-- name: bucket_stats
-- {aggregate} is telemetry_hourly or telemetry_daily (an identifier chosen by the command).
-- The filters are on the aggregate's own columns, so on TimescaleDB they reach the
-- materialization's index (device_metric_id, bucket) and its chunk exclusion; on plain
-- PostgreSQL they are pushed into the view's GROUP BY and reach telemetries through an index.
-- value_last is shown as the bare value; value_jsonb keeps its type tag.
SELECT
    m.metric_type::text AS metric,
    s.bucket,
    s.readings,
    s.value_min,
    s.value_max,
    trim_scale(round(s.value_avg, 6)) AS value_avg,
    s.value_last ->> 'v' AS value_last,
    s.ts_last
FROM {aggregate} s
JOIN device_metrics dm ON dm.id = s.device_metric_id
JOIN metrics m ON m.id = dm.metric_id
WHERE s.device_metric_id = ANY(%(ids)s)
AND s.bucket >= %(since)s
AND s.bucket < %(until)s
ORDER BY m.metric_type, s.bucket
