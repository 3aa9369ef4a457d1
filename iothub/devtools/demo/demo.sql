-- Queries of `iothub demo` (names are filled in with psycopg.sql.Identifier).
-- name: create_database
CREATE DATABASE {name}

-- name: drop_database
DROP DATABASE IF EXISTS {name} WITH (FORCE)

-- name: drop_database_before_pg13
DROP DATABASE IF EXISTS {name}

-- name: high_water_marks
SELECT (SELECT coalesce(max(id), 0) FROM events),
       (SELECT coalesce(max(id), 0) FROM rejected_messages),
       (SELECT coalesce(max(id), 0) FROM telemetries)

-- name: rows_by_device
SELECT d.serial_id::text, count(*)
FROM telemetries t
JOIN device_metrics dm ON dm.id = t.device_metric_id
JOIN devices d ON d.id = dm.device_id
WHERE t.id > %(after)s
GROUP BY d.serial_id

-- name: rejections_by_reason
SELECT reason, count(*) FROM rejected_messages WHERE id > %(after)s
GROUP BY reason ORDER BY count(*) DESC, reason

-- name: events_by_rule
SELECT r.name::text, d.serial_id::text,
       count(*) FILTER (WHERE e.kind = 'triggered'),
       count(*) FILTER (WHERE e.kind = 'resolved'),
       min(e."timestamp"), max(e."timestamp")
FROM events e
JOIN rules r ON r.id = e.rule_id
LEFT JOIN device_metrics dm ON dm.id = e.device_metric_id
LEFT JOIN devices d ON d.id = dm.device_id
WHERE e.id > %(after)s
GROUP BY r.name, d.serial_id
ORDER BY min(e."timestamp"), r.name
