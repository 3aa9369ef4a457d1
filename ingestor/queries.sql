-- name: load_catalog
-- Everything needed to turn (serial_id, metric_type) into a device_metric, in one round trip.
SELECT d.serial_id, d.id, d.name, d.is_active, m.metric_type::text, m.data_type::text, dm.id
FROM devices d
LEFT JOIN device_metrics dm ON dm.device_id = d.id
LEFT JOIN metrics m ON m.id = dm.metric_id

-- name: load_metric_types
SELECT metric_type::text FROM metrics

-- name: listen_catalog
LISTEN iothub_catalog

-- name: create_staging
-- Per connection, once (the pool's configure hook). ON COMMIT DELETE ROWS empties it for free.
-- Named anew when its columns change: behind a session pooler a server session (and its TEMP
-- table of an older release) can outlive an upgrade, and IF NOT EXISTS would keep that one.
CREATE TEMP TABLE IF NOT EXISTS iothub_staging_rows (
    n                integer NOT NULL,  -- the row's place in the batch: what comes back
    device_metric_id integer NOT NULL,
    ts               timestamptz NOT NULL,
    value_jsonb      jsonb NOT NULL
) ON COMMIT DELETE ROWS

-- name: set_timeouts
-- Per connection (the pool's configure hook): a batch blocked by a lock (a LOCK TABLE, a long
-- migration) or a runaway statement fails, is rolled back and retried, instead of hanging the
-- writer with every message unacknowledged. Values in milliseconds; 0 means no limit.
SELECT set_config('lock_timeout', %(lock_ms)s, false),
       set_config('statement_timeout', %(statement_ms)s, false)

-- name: copy_staging
-- Binary (ingestor.writer.STAGING_TYPES): packing is cheaper than formatting text.
COPY iothub_staging_rows (n, device_metric_id, ts, value_jsonb) FROM STDIN (FORMAT BINARY)

-- name: copy_telemetries
-- Straight into the table, when no row of the batch is expected to be stored already
-- (ingestor.writer.BatchWriter._insert); binary as the staging COPY (TELEMETRY_TYPES).
COPY telemetries (device_metric_id, ts, value_jsonb) FROM STDIN (FORMAT BINARY)

-- name: truncate_staging
TRUNCATE iothub_staging_rows

-- name: insert_from_staging
-- Redelivered readings meet the unique key and are dropped here, so what RETURNING gives is
-- exactly what is new: only that reaches the rule engine. It comes back as the rows' places in
-- the batch (ingestor.batch.prepare keeps a key once per batch, so none comes back twice):
-- integers are cheap to read, where (id, timestamptz) pairs cost the writer a timestamp to
-- parse and a keyed lookup per row (measured: a fifth of a worker's writer thread with ten
-- readings per message).
WITH inserted AS (
    INSERT INTO telemetries (device_metric_id, ts, value_jsonb)
    SELECT device_metric_id, ts, value_jsonb FROM iothub_staging_rows
    ON CONFLICT (device_metric_id, ts) DO NOTHING
    RETURNING device_metric_id, ts
)
SELECT s.n FROM iothub_staging_rows s JOIN inserted USING (device_metric_id, ts)

-- name: next_rejected_payload_ids
-- Ids for a batch's rejected payloads, drawn before the COPY so the rejections can name them.
SELECT nextval('rejected_payloads_id_seq') FROM generate_series(1, %(count)s)

-- name: copy_rejected_payloads
-- One row per rejected message (migration 0005): the payload is stored once, however many of
-- its readings were rejected.
COPY rejected_payloads (id, received_at, topic, payload, payload_bytes, rejections, not_recorded)
FROM STDIN

-- name: copy_rejections
-- One row per recorded rejected reading, at most max_rejections_per_message per message.
COPY rejected_messages (payload_id, received_at, reason, detail, serial_id, metric) FROM STDIN
