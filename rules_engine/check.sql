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
