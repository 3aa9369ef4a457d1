-- Retention of the side tables (docs/operations.md, "Retention"): `iothub run` deletes rows older than their
-- retention in small statements, oldest first, each in a transaction of its own, so a backlog
-- never turns into one long transaction holding locks and WAL.
--
-- SKIP LOCKED: several instances prune the same tables without waiting on each other.

-- name: prune_rejected_messages
-- The rejected readings first, by their own index; their payload rows go in the next step.
DELETE FROM rejected_messages
WHERE id IN (
    SELECT id FROM rejected_messages
    WHERE received_at < now() - make_interval(secs => %(keep)s)
    ORDER BY received_at
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
)

-- name: prune_rejected_payloads
-- A payload's rejections share its received_at, so they are already gone (any left are deleted
-- by the cascade).
DELETE FROM rejected_payloads
WHERE id IN (
    SELECT id FROM rejected_payloads
    WHERE received_at < now() - make_interval(secs => %(keep)s)
    ORDER BY received_at
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
)

-- name: prune_action_attempts
DELETE FROM action_attempts
WHERE id IN (
    SELECT id FROM action_attempts
    WHERE attempted_at < now() - make_interval(secs => %(keep)s)
    ORDER BY attempted_at
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
)

-- name: prune_action_outbox
-- Finished rows only: delivered (at delivered_at) or failed (its last attempt was due at
-- next_attempt_at). Pending rows are never deleted, however old. Their attempts go with them.
DELETE FROM action_outbox
WHERE id IN (
    SELECT id FROM action_outbox
    WHERE status <> 'pending'
      AND coalesce(delivered_at, next_attempt_at) < now() - make_interval(secs => %(keep)s)
    ORDER BY coalesce(delivered_at, next_attempt_at)
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
)

-- name: table_sizes
-- Sizes with indexes and TOAST, read from the catalogue (no scan of the tables); a table that
-- does not exist (to_regclass NULL) gives NULL and is left out.
SELECT name, pg_total_relation_size(to_regclass(name))
FROM unnest(%(tables)s::text[]) AS name
