-- What the ingestion service adds: a record of every rejected reading, and change
-- notifications so that the in-memory catalogue follows the database without a restart.

CREATE TABLE rejected_messages (
    id          bigserial PRIMARY KEY,
    received_at timestamptz NOT NULL DEFAULT now(),
    topic       text NOT NULL,
    payload     bytea NOT NULL,  -- as received: it may not even be UTF-8
    reason      text NOT NULL,   -- a stable code (docs/operations.md lists them)
    detail      text NOT NULL,
    serial_id   text,
    metric      text
);
CREATE INDEX idx_rejected_messages_received_at ON rejected_messages (received_at);
CREATE INDEX idx_rejected_messages_reason ON rejected_messages (reason, received_at);

CREATE FUNCTION iothub_notify_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    -- One notification per statement; listeners reload what they cache from that table.
    PERFORM pg_notify(TG_ARGV[0], TG_TABLE_NAME);
    RETURN NULL;
END;
$$;

CREATE TRIGGER devices_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON devices
    FOR EACH STATEMENT EXECUTE FUNCTION iothub_notify_change('iothub_catalog');
CREATE TRIGGER metrics_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON metrics
    FOR EACH STATEMENT EXECUTE FUNCTION iothub_notify_change('iothub_catalog');
CREATE TRIGGER device_metrics_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE
    ON device_metrics FOR EACH STATEMENT EXECUTE FUNCTION iothub_notify_change('iothub_catalog');
CREATE TRIGGER rules_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON rules
    FOR EACH STATEMENT EXECUTE FUNCTION iothub_notify_change('iothub_catalog');
