-- name: load_rules
-- Active rules with what evaluation and messages need about their binding. The documents come
-- as text: decoding them is rule_json's job, within bounds (a jsonb nested thousands deep would
-- make any recursive decoder raise while the rows are fetched, outside any one rule).
SELECT r.id, r.name, r.condition::text, r.action::text, r.device_metric_id, m.data_type::text,
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

-- name: cursor_versions
-- Run under the advisory locks, in a statement of its own (READ COMMITTED takes a snapshot per
-- statement): a version written after the lock was granted is seen. The row locks make a
-- write to rule_states that does not take the advisory lock (an operator's DELETE or TRUNCATE)
-- bump the version after this batch commits instead of under it, where the batch's own
-- cursor write would overwrite the bump. Sorted, so that two batches lock in the same order.
SELECT device_metric_id, version
FROM rule_cursors
WHERE device_metric_id = ANY(%(ids)s)
ORDER BY device_metric_id
FOR NO KEY UPDATE

-- name: load_cursors
-- The value as text, decoded within bounds (rule_json): a hand-edited row costs its rules only.
SELECT device_metric_id, version, last_ts, last_value::text, last_received
FROM rule_cursors
WHERE device_metric_id = ANY(%(ids)s)

-- name: load_states
-- The state as text, decoded within bounds (rule_json): a hand-edited row costs its rule only.
SELECT rule_id, device_metric_id, fingerprint, state::text
FROM rule_states
WHERE device_metric_id = ANY(%(ids)s)

-- name: next_cursor_version
SELECT nextval('rule_cursor_version')

-- name: save_cursors
-- One statement for all device_metrics of a batch, all with the same new version.
-- `received`: the service's clock at the batch (what the no-data timer judges silence on).
INSERT INTO rule_cursors (device_metric_id, last_ts, last_value, version, updated_at,
                          last_received)
SELECT c.dm, c.ts, c.value::jsonb, %(version)s, now(), coalesce(c.received, now())
FROM unnest(%(ids)s::int[], %(ts)s::timestamptz[], %(values)s::text[],
            %(received)s::timestamptz[]) AS c (dm, ts, value, received)
ON CONFLICT (device_metric_id) DO UPDATE
SET last_ts = EXCLUDED.last_ts, last_value = EXCLUDED.last_value, version = EXCLUDED.version,
    updated_at = EXCLUDED.updated_at, last_received = EXCLUDED.last_received

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
    state            jsonb NOT NULL
) ON COMMIT DELETE ROWS

-- name: copy_states
COPY iothub_rule_states_staging (rule_id, device_metric_id, fingerprint, status, state)
FROM STDIN

-- name: upsert_states
INSERT INTO rule_states (rule_id, device_metric_id, fingerprint, status, state, updated_at)
SELECT rule_id, device_metric_id, fingerprint, status, state, now()
FROM iothub_rule_states_staging
ON CONFLICT (rule_id, device_metric_id) DO UPDATE
SET fingerprint = EXCLUDED.fingerprint, status = EXCLUDED.status, state = EXCLUDED.state,
    updated_at = now()

-- name: truncate_states_staging
TRUNCATE iothub_rule_states_staging
