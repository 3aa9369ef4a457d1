-- The seven tables of the original IoT Hub ERD, with its names, types, defaults and constraints,
-- and its recommended indexes (docs/schema.md lists every deliberate difference).

CREATE EXTENSION IF NOT EXISTS citext;

CREATE TYPE user_role AS ENUM ('admin', 'client');
CREATE TYPE metric_data_type AS ENUM ('numeric', 'str', 'boolean');

CREATE TABLE users (
    id          serial PRIMARY KEY,
    username    varchar(150) NOT NULL UNIQUE,
    email       varchar(255) NOT NULL UNIQUE,
    password    varchar(255) NOT NULL,  -- pbkdf2_sha256$<iter>$<salt>$<hash>, never plain text
    role        user_role NOT NULL DEFAULT 'client',
    created_at  timestamptz NOT NULL DEFAULT CURRENT_TIMESTAMP,
    updated_at  timestamptz NOT NULL DEFAULT CURRENT_TIMESTAMP
);

CREATE TABLE devices (
    id          serial PRIMARY KEY,
    serial_id   varchar(255) NOT NULL UNIQUE,
    name        varchar(255) NOT NULL,
    description text,
    -- A device outlives its owner's account: its history stays, unassigned.
    user_id     integer REFERENCES users (id) ON DELETE SET NULL,
    is_active   boolean NOT NULL DEFAULT true,
    created_at  timestamptz NOT NULL DEFAULT CURRENT_TIMESTAMP
);

CREATE TABLE metrics (
    id          serial PRIMARY KEY,
    metric_type citext NOT NULL UNIQUE,
    data_type   metric_data_type NOT NULL
);

CREATE TABLE device_metrics (
    id          serial PRIMARY KEY,
    device_id   integer NOT NULL REFERENCES devices (id) ON DELETE CASCADE,
    -- Removing a metric type that still has bindings would delete their history: refuse it.
    metric_id   integer NOT NULL REFERENCES metrics (id) ON DELETE RESTRICT,
    CONSTRAINT uq_device_metric UNIQUE (device_id, metric_id)
);

CREATE TABLE telemetries (
    id               bigserial PRIMARY KEY,
    device_metric_id integer NOT NULL REFERENCES device_metrics (id) ON DELETE CASCADE,
    value_jsonb      jsonb NOT NULL,
    -- Each generated column is non-null only for its own type tag, so a query on value_numeric
    -- never meets a string that happens to look like a number.
    value_numeric    numeric GENERATED ALWAYS AS (
        CASE WHEN value_jsonb ->> 't' = 'numeric' THEN (value_jsonb ->> 'v')::numeric END
    ) STORED,
    value_bool       boolean GENERATED ALWAYS AS (
        CASE WHEN value_jsonb ->> 't' = 'boolean' THEN (value_jsonb ->> 'v')::boolean END
    ) STORED,
    value_str        text GENERATED ALWAYS AS (
        CASE WHEN value_jsonb ->> 't' = 'str' THEN value_jsonb ->> 'v' END
    ) STORED,
    ts               timestamptz NOT NULL DEFAULT now(),
    created_at       timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT unique_telemetry_per_metric_time UNIQUE (device_metric_id, ts),
    CONSTRAINT telemetries_value_shape CHECK (
        CASE value_jsonb ->> 't'
            WHEN 'numeric' THEN jsonb_typeof(value_jsonb -> 'v') = 'number'
            WHEN 'boolean' THEN jsonb_typeof(value_jsonb -> 'v') = 'boolean'
            WHEN 'str' THEN jsonb_typeof(value_jsonb -> 'v') = 'string'
            ELSE false
        END
    )
);

CREATE TABLE rules (
    id               serial PRIMARY KEY,
    name             varchar(255) NOT NULL,
    description      text,
    condition        jsonb NOT NULL,
    action           jsonb NOT NULL,
    is_active        boolean NOT NULL DEFAULT true,
    device_metric_id integer NOT NULL REFERENCES device_metrics (id) ON DELETE CASCADE
);

CREATE TYPE event_kind AS ENUM ('triggered', 'resolved');

CREATE TABLE events (
    id               bigserial PRIMARY KEY,
    "timestamp"      timestamptz,
    rule_id          integer NOT NULL REFERENCES rules (id) ON DELETE CASCADE,
    created_at       timestamptz NOT NULL DEFAULT CURRENT_TIMESTAMP,
    -- Additions: which transition, on which binding, and what the rule saw.
    kind             event_kind NOT NULL DEFAULT 'triggered',
    device_metric_id integer REFERENCES device_metrics (id) ON DELETE CASCADE,
    context          jsonb NOT NULL DEFAULT '{}'::jsonb
);

-- The seed's recommended indexes. uq_device_metric and unique_telemetry_per_metric_time come
-- with their constraints. idx_telemetries_metric_time (device_metric_id, ts) is NOT created: it
-- is an exact copy of the index behind unique_telemetry_per_metric_time (docs/schema.md has the
-- measured cost of keeping both).
CREATE INDEX idx_users_role ON users (role);
CREATE INDEX idx_devices_user_id ON devices (user_id);
CREATE INDEX idx_devices_is_active ON devices (is_active);
CREATE INDEX idx_device_metrics_device ON device_metrics (device_id);
CREATE INDEX idx_device_metrics_metric ON device_metrics (metric_id);
CREATE INDEX idx_rules_device_metric ON rules (device_metric_id);
CREATE INDEX idx_rules_is_active ON rules (is_active);
CREATE INDEX idx_events_timestamp ON events ("timestamp");
CREATE INDEX idx_events_rule ON events (rule_id);
CREATE INDEX idx_telemetries_timestamp ON telemetries (ts);
