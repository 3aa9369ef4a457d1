-- The statements of `iothub seed`. Seeded rows are found by their natural keys only (usernames,
-- serials, metric types, (serial, metric) pairs, rule names on a seeded binding), never by id, so
-- that rows created by anyone else are never read as seeded, let alone changed.

-- name: lock_seed
-- Two seeds at once would both see "nothing seeded" and then collide on the unique keys.
SELECT pg_advisory_xact_lock(%(key)s)

-- name: server_now
SELECT date_trunc('minute', now())

-- name: seeded_users
SELECT id, username::text, email::text, role::text, password::text
FROM users
WHERE username = ANY(%(usernames)s::text[])

-- name: email_conflicts
-- A seeded email held by a user that is not the one the seed gives it to.
SELECT u.username::text, u.email::text
FROM users AS u
JOIN unnest(%(usernames)s::text[], %(emails)s::text[]) AS s(username, email)
    ON u.email = s.email
WHERE u.username <> s.username

-- name: seeded_metrics
SELECT id, metric_type::text, data_type::text
FROM metrics
WHERE metric_type = ANY(%(metric_types)s::citext[])

-- name: seeded_devices
SELECT d.id, d.serial_id::text, d.name::text, d.description, u.username::text, d.is_active
FROM devices AS d
LEFT JOIN users AS u ON u.id = d.user_id
WHERE d.serial_id = ANY(%(serials)s::text[])

-- name: seeded_bindings
SELECT dm.id, d.serial_id::text, s.metric_type
FROM device_metrics AS dm
JOIN devices AS d ON d.id = dm.device_id
JOIN metrics AS m ON m.id = dm.metric_id
JOIN unnest(%(serials)s::text[], %(metric_types)s::text[]) AS s(serial_id, metric_type)
    ON d.serial_id = s.serial_id AND m.metric_type = s.metric_type::citext

-- name: seeded_rules
-- Rules on the seeded bindings whose name is a seeded rule name of that binding. Condition and
-- action as text, decoded within bounds (rules_engine/rule_json.py), never by the driver.
SELECT r.id, r.device_metric_id, r.name::text, r.description, r.condition::text,
       r.action::text, r.is_active
FROM rules AS r
JOIN unnest(%(binding_ids)s::int[], %(names)s::text[]) AS s(device_metric_id, name)
    ON r.device_metric_id = s.device_metric_id AND r.name = s.name
ORDER BY r.id

-- name: seeded_telemetry
SELECT device_metric_id, ts, value_jsonb
FROM telemetries
WHERE device_metric_id = ANY(%(binding_ids)s::int[])
ORDER BY device_metric_id, ts

-- name: seeded_events
SELECT rule_id, kind::text, "timestamp", device_metric_id, context
FROM events
WHERE rule_id = ANY(%(rule_ids)s::int[])
ORDER BY rule_id, "timestamp", id

-- name: upsert_user
INSERT INTO users (username, email, password, role)
VALUES (%(username)s, %(email)s, %(password)s, %(role)s::user_role)
ON CONFLICT (username) DO UPDATE
    SET email = EXCLUDED.email,
        password = EXCLUDED.password,
        role = EXCLUDED.role,
        updated_at = CURRENT_TIMESTAMP
RETURNING id

-- name: upsert_metric
-- metric_type is citext: the seed's spelling replaces a differently-cased one.
INSERT INTO metrics (metric_type, data_type)
VALUES (%(metric_type)s, %(data_type)s::metric_data_type)
ON CONFLICT (metric_type) DO UPDATE
    SET metric_type = EXCLUDED.metric_type,
        data_type = EXCLUDED.data_type
RETURNING id

-- name: upsert_device
INSERT INTO devices (serial_id, name, description, user_id, is_active)
VALUES (%(serial_id)s, %(name)s, %(description)s, %(user_id)s, %(is_active)s)
ON CONFLICT (serial_id) DO UPDATE
    SET name = EXCLUDED.name,
        description = EXCLUDED.description,
        user_id = EXCLUDED.user_id,
        is_active = EXCLUDED.is_active
RETURNING id

-- name: ensure_binding
-- A binding has nothing to update: insert it when missing, otherwise return the existing one.
WITH inserted AS (
    INSERT INTO device_metrics (device_id, metric_id)
    VALUES (%(device_id)s, %(metric_id)s)
    ON CONFLICT ON CONSTRAINT uq_device_metric DO NOTHING
    RETURNING id
)
SELECT id FROM inserted
UNION ALL
SELECT id FROM device_metrics WHERE device_id = %(device_id)s AND metric_id = %(metric_id)s
LIMIT 1

-- name: delete_rules
-- Their events, rule states and pending actions go with them (ON DELETE CASCADE).
DELETE FROM rules WHERE id = ANY(%(rule_ids)s::int[])

-- name: delete_telemetry
DELETE FROM telemetries WHERE device_metric_id = ANY(%(binding_ids)s::int[])

-- name: insert_rule
INSERT INTO rules (name, description, condition, action, is_active, device_metric_id)
VALUES (%(name)s, %(description)s, %(condition)s, %(action)s, %(is_active)s, %(device_metric_id)s)
RETURNING id

-- name: copy_telemetry
COPY telemetries (device_metric_id, ts, value_jsonb) FROM STDIN

-- name: insert_event
INSERT INTO events ("timestamp", rule_id, kind, device_metric_id, context)
VALUES (%(ts)s, %(rule_id)s, 'triggered', %(device_metric_id)s, %(context)s)
