-- A rejected message's payload is stored once, however many of its readings are rejected.
--
-- Until now every rejected reading was a rejected_messages row carrying the whole payload: one
-- 58 KB message with 2,000 unknown metrics wrote 2,001 copies of it (117 MB). Now the payload
-- (and the topic, up to 64 KiB of device text as well) lives in rejected_payloads, one row per
-- message, and rejected_messages keeps one short row per rejected reading, pointing at it. The
-- service records at most `max_rejections_per_message` readings of one message; what it did not
-- record is counted per reason in rejected_payloads.not_recorded.
--
-- "Rejections by reason" stays `SELECT reason, count(*) FROM rejected_messages GROUP BY 1`.

CREATE TABLE rejected_payloads (
    id            bigserial PRIMARY KEY,
    received_at   timestamptz NOT NULL DEFAULT now(),
    topic         text NOT NULL,
    payload       bytea NOT NULL,   -- as received, cut at max_payload_bytes (see payload_bytes)
    payload_bytes integer NOT NULL, -- the size the message had on the wire
    rejections    integer NOT NULL, -- readings of this message that were rejected
    not_recorded  jsonb NOT NULL DEFAULT '{}'::jsonb  -- {reason: count} beyond the cap
);
-- Retention deletes by age, oldest first.
CREATE INDEX idx_rejected_payloads_received_at ON rejected_payloads (received_at);

ALTER TABLE rejected_messages ADD COLUMN payload_id bigint;

-- Existing rows: identical copies of one message (same receipt time, topic and payload) become
-- one payload row.
INSERT INTO rejected_payloads (received_at, topic, payload, payload_bytes, rejections)
SELECT received_at, topic, payload, octet_length(payload), count(*)
FROM rejected_messages
GROUP BY received_at, topic, payload;

UPDATE rejected_messages m SET payload_id = p.id
FROM rejected_payloads p
WHERE p.received_at = m.received_at AND p.topic = m.topic AND p.payload = m.payload;

ALTER TABLE rejected_messages
    ALTER COLUMN payload_id SET NOT NULL,
    ADD CONSTRAINT rejected_messages_payload_id_fkey
        FOREIGN KEY (payload_id) REFERENCES rejected_payloads (id) ON DELETE CASCADE,
    DROP COLUMN payload,
    DROP COLUMN topic;
-- The cascade from retention's deletes, and joining a rejection to its payload.
CREATE INDEX idx_rejected_messages_payload ON rejected_messages (payload_id);

-- Retention of the outbox: finished rows by the time they finished (a failed row's last
-- attempt was due at next_attempt_at), and attempts by age.
CREATE INDEX idx_action_outbox_finished ON action_outbox (coalesce(delivered_at, next_attempt_at))
    WHERE status <> 'pending';
CREATE INDEX idx_action_attempts_attempted_at ON action_attempts (attempted_at);
