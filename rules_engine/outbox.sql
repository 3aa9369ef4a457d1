-- name: claim_due
-- Rows are locked until the transaction that records their outcome commits. SKIP LOCKED lets
-- several service instances share the outbox: each takes rows no other instance holds.
SELECT id, event_id, rule_id, kind, target, attempts
FROM action_outbox
WHERE status = 'pending' AND next_attempt_at <= now()
ORDER BY id
LIMIT %(limit)s
FOR UPDATE SKIP LOCKED

-- name: record_attempt
INSERT INTO action_attempts (outbox_id, attempted_at, ok, detail)
VALUES (%(outbox_id)s, %(attempted_at)s, %(ok)s, %(detail)s)

-- name: mark_delivered
-- The times are the attempt's own: a pass records its outcomes at its end, seconds later.
UPDATE action_outbox
SET status = 'delivered', attempts = attempts + 1, delivered_at = %(finished_at)s
WHERE id = %(outbox_id)s

-- name: schedule_retry
UPDATE action_outbox
SET attempts = attempts + 1, last_error = %(error)s,
    next_attempt_at = %(finished_at)s::timestamptz + make_interval(secs => %(delay)s)
WHERE id = %(outbox_id)s

-- name: mark_failed
UPDATE action_outbox
SET status = 'failed', attempts = attempts + 1, last_error = %(error)s
WHERE id = %(outbox_id)s

-- name: count_pending
SELECT count(*) FROM action_outbox WHERE status = 'pending'

-- name: event_document
-- What an mqtt action without a payload of its own publishes: the same facts a webhook gets.
SELECT e.id, e.kind::text, e.rule_id, r.name, d.serial_id, d.name, m.metric_type::text,
       e.context -> 'value', e."timestamp", e.context ->> 'message'
FROM events e
JOIN rules r ON r.id = e.rule_id
LEFT JOIN device_metrics dm ON dm.id = e.device_metric_id
LEFT JOIN devices d ON d.id = dm.device_id
LEFT JOIN metrics m ON m.id = dm.metric_id
WHERE e.id = %(event_id)s
