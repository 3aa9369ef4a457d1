-- name: claim_due
-- A short transaction of its own: the rows get a lease and a claim token, and the transaction
-- commits before any delivery starts, so a slow receiver holds no lock and no transaction.
-- SKIP LOCKED lets several service instances claim at once, each taking rows no other is
-- claiming; the lease keeps the rows theirs after the commit. An expired lease (a worker that
-- crashed, was killed or hung) makes the row due again.
-- A row that still carries a claim token was claimed and never recorded nor released: that
-- delivery may well have happened, so it counts as a failed attempt (with its row in
-- action_attempts). Otherwise a row that brings its worker down would be delivered for ever.
WITH due AS (
    SELECT id, claimed_by AS lost_claim
    FROM action_outbox
    WHERE status = 'pending' AND next_attempt_at <= now()
      AND (lease_until IS NULL OR lease_until <= now())
    ORDER BY id
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
),
claimed AS (
    UPDATE action_outbox o
    SET lease_until = now() + make_interval(secs => %(lease)s), claimed_by = %(token)s,
        attempts = o.attempts + (due.lost_claim IS NOT NULL)::int,
        last_error = CASE WHEN due.lost_claim IS NULL THEN o.last_error
                          ELSE 'no outcome recorded by ' || due.lost_claim || ' before its lease ran out'
                     END
    FROM due
    WHERE o.id = due.id
    RETURNING o.id, o.event_id, o.rule_id, o.kind, o.target, o.attempts, o.last_error,
              due.lost_claim
),
lost AS (
    INSERT INTO action_attempts (outbox_id, attempted_at, ok, detail)
    SELECT id, now(), false, last_error FROM claimed WHERE lost_claim IS NOT NULL
)
SELECT id, event_id, rule_id, kind, target, attempts, lost_claim IS NOT NULL AS lost
FROM claimed

-- name: give_up
-- A row whose lost claims used up its attempts: failed without another delivery (the attempt
-- was counted and recorded by the claim).
UPDATE action_outbox
SET status = 'failed', lease_until = NULL, claimed_by = NULL
WHERE id = %(outbox_id)s AND claimed_by = %(token)s AND status = 'pending'
RETURNING last_error

-- name: record_delivered
-- Each outcome is recorded only while the claim is still the row's (same token, still pending):
-- a worker whose lease ran out and was taken over by another changes nothing, and recording the
-- same outcome twice (a commit whose acknowledgement was lost, then retried) is a no-op.
-- The attempt row is written only with the outcome, so action_attempts never shows an attempt
-- whose outcome was dropped. The times are the attempt's own.
WITH recorded AS (
    UPDATE action_outbox
    SET status = 'delivered', attempts = attempts + 1, delivered_at = %(finished_at)s,
        lease_until = NULL, claimed_by = NULL
    WHERE id = %(outbox_id)s AND claimed_by = %(token)s AND status = 'pending'
    RETURNING id
)
INSERT INTO action_attempts (outbox_id, attempted_at, ok, detail)
SELECT id, %(attempted_at)s, true, %(detail)s FROM recorded
RETURNING outbox_id

-- name: record_retry
WITH recorded AS (
    UPDATE action_outbox
    SET attempts = attempts + 1, last_error = %(detail)s,
        next_attempt_at = %(finished_at)s::timestamptz + make_interval(secs => %(delay)s),
        lease_until = NULL, claimed_by = NULL
    WHERE id = %(outbox_id)s AND claimed_by = %(token)s AND status = 'pending'
    RETURNING id
)
INSERT INTO action_attempts (outbox_id, attempted_at, ok, detail)
SELECT id, %(attempted_at)s, false, %(detail)s FROM recorded
RETURNING outbox_id

-- name: record_failed
WITH recorded AS (
    UPDATE action_outbox
    SET status = 'failed', attempts = attempts + 1, last_error = %(detail)s,
        lease_until = NULL, claimed_by = NULL
    WHERE id = %(outbox_id)s AND claimed_by = %(token)s AND status = 'pending'
    RETURNING id
)
INSERT INTO action_attempts (outbox_id, attempted_at, ok, detail)
SELECT id, %(attempted_at)s, false, %(detail)s FROM recorded
RETURNING outbox_id

-- name: release_claim
-- The rows of a claim that were not attempted (a stop, or the pass ran out of time) are due
-- again at once, not only when their lease runs out.
UPDATE action_outbox
SET lease_until = NULL, claimed_by = NULL
WHERE claimed_by = %(token)s AND status = 'pending'

-- name: count_pending
SELECT count(*) FROM action_outbox WHERE status = 'pending'

-- name: event_documents
-- What an mqtt action without a payload of its own publishes: the same facts a webhook gets.
-- Read in the claim's transaction, so that the delivery itself needs no database.
SELECT e.id, e.kind::text, e.rule_id, r.name, d.serial_id, d.name, m.metric_type::text,
       e.context -> 'value', e."timestamp", e.context ->> 'message'
FROM events e
JOIN rules r ON r.id = e.rule_id
LEFT JOIN device_metrics dm ON dm.id = e.device_metric_id
LEFT JOIN devices d ON d.id = dm.device_id
LEFT JOIN metrics m ON m.id = dm.metric_id
WHERE e.id = ANY(%(event_ids)s)
