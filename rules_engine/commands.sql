-- name: rules_to_check
-- Every rule, active or not, with the data type its condition must fit. Condition and action
-- come as text, decoded within bounds by rule_json (never by the driver's recursive decoder).
SELECT r.id, r.name, r.is_active, r.condition::text, r.action::text, r.device_metric_id,
       m.data_type::text, d.serial_id, m.metric_type::text
FROM rules r
JOIN device_metrics dm ON dm.id = r.device_metric_id
JOIN devices d ON d.id = dm.device_id
JOIN metrics m ON m.id = dm.metric_id
ORDER BY r.id

-- name: rule_by_id
SELECT r.id, r.name, r.is_active, r.condition::text, r.action::text, r.device_metric_id,
       m.data_type::text, d.serial_id, m.metric_type::text
FROM rules r
JOIN device_metrics dm ON dm.id = r.device_metric_id
JOIN devices d ON d.id = dm.device_id
JOIN metrics m ON m.id = dm.metric_id
WHERE r.id = %(rule_id)s

-- name: binding_by_id
SELECT dm.id, d.serial_id, m.metric_type::text, m.data_type::text
FROM device_metrics dm
JOIN devices d ON d.id = dm.device_id
JOIN metrics m ON m.id = dm.metric_id
WHERE dm.id = %(device_metric_id)s

-- name: binding_by_names
-- metric_type is citext: `--metric Temperature` finds `temperature`, as the ingestor does.
SELECT dm.id, d.serial_id, m.metric_type::text, m.data_type::text
FROM device_metrics dm
JOIN devices d ON d.id = dm.device_id
JOIN metrics m ON m.id = dm.metric_id
WHERE d.serial_id = %(serial_id)s AND m.metric_type = %(metric)s

-- name: telemetry
-- Device-time order, read through a server-side cursor: history can be far larger than memory.
-- The bounds are coalesced rather than optional so that the (device_metric_id, ts) index
-- serves every form of the query. A reading whose type tag is not the metric's data_type (the
-- metric was retyped after it was stored) cannot be evaluated, so it is not read.
SELECT ts, value_jsonb -> 'v'
FROM telemetries
WHERE device_metric_id = %(device_metric_id)s
  AND ts >= coalesce(%(since)s::timestamptz, '-infinity')
  AND ts < coalesce(%(until)s::timestamptz, 'infinity')
  AND value_jsonb ->> 't' = %(data_type)s
ORDER BY ts
