-- name: load_rules
-- Active rules with what evaluation and messages need about their binding.
SELECT r.id, r.name, r.condition, r.action, r.device_metric_id, m.data_type::text,
       d.serial_id, d.name, m.metric_type::text
FROM rules r
JOIN device_metrics dm ON dm.id = r.device_metric_id
JOIN devices d ON d.id = dm.device_id
JOIN metrics m ON m.id = dm.metric_id
WHERE r.is_active
ORDER BY r.id

-- name: lock_device_metrics
-- Serialises evaluation of a device_metric across service instances. Locks are taken in
-- ascending id order (the subquery sorts first) so two instances cannot deadlock.
SELECT count(pg_advisory_xact_lock(%(lock_class)s, s.dm))
FROM (SELECT DISTINCT dm FROM unnest(%(ids)s::int[]) AS dm ORDER BY dm) AS s

-- name: load_states
SELECT rule_id, device_metric_id, fingerprint, state
FROM rule_states
WHERE device_metric_id = ANY(%(ids)s)

-- name: insert_event
INSERT INTO events ("timestamp", rule_id, kind, device_metric_id, context)
VALUES (%(ts)s, %(rule_id)s, %(kind)s, %(device_metric_id)s, %(context)s)
RETURNING id

-- name: insert_outbox
INSERT INTO action_outbox (event_id, rule_id, kind, target)
VALUES (%(event_id)s, %(rule_id)s, %(kind)s, %(target)s)

-- name: live_rules
-- The cached rules that are still there and active, locked against deletion until commit: a
-- rule deleted after the cache was loaded must not fail the batch's inserts (foreign keys).
SELECT id FROM rules WHERE id = ANY(%(ids)s) AND is_active FOR KEY SHARE

-- name: create_states_staging
-- Per session and transaction-scoped: states of a batch go in with one COPY and one upsert.
CREATE TEMP TABLE IF NOT EXISTS iothub_rule_states_staging (
    rule_id          integer NOT NULL,
    device_metric_id integer NOT NULL,
    fingerprint      text NOT NULL,
    status           text NOT NULL,
    state            jsonb NOT NULL,
    last_ts          timestamptz
) ON COMMIT DELETE ROWS

-- name: copy_states
COPY iothub_rule_states_staging (rule_id, device_metric_id, fingerprint, status, state, last_ts)
FROM STDIN

-- name: upsert_states
INSERT INTO rule_states (rule_id, device_metric_id, fingerprint, status, state, last_ts, updated_at)
SELECT rule_id, device_metric_id, fingerprint, status, state, last_ts, now()
FROM iothub_rule_states_staging
ON CONFLICT (rule_id, device_metric_id) DO UPDATE
SET fingerprint = EXCLUDED.fingerprint, status = EXCLUDED.status, state = EXCLUDED.state,
    last_ts = EXCLUDED.last_ts, updated_at = now()

-- name: truncate_states_staging
TRUNCATE iothub_rule_states_staging
