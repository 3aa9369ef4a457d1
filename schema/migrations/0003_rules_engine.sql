-- What the rule engine adds: each (rule, device_metric) state machine, kept in the same
-- transaction as the telemetry it has seen, and an outbox of actions delivered after commit.

CREATE TABLE rule_states (
    rule_id          integer NOT NULL REFERENCES rules (id) ON DELETE CASCADE,
    device_metric_id integer NOT NULL REFERENCES device_metrics (id) ON DELETE CASCADE,
    -- A hash of the rule's condition: when the rule is edited its old state no longer applies.
    fingerprint      text NOT NULL,
    status           text NOT NULL CHECK (status IN ('ok', 'pending', 'firing')),
    state            jsonb NOT NULL,
    last_ts          timestamptz,
    updated_at       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (rule_id, device_metric_id)
);
CREATE INDEX idx_rule_states_device_metric ON rule_states (device_metric_id);

CREATE TABLE action_outbox (
    id              bigserial PRIMARY KEY,
    event_id        bigint NOT NULL REFERENCES events (id) ON DELETE CASCADE,
    rule_id         integer NOT NULL REFERENCES rules (id) ON DELETE CASCADE,
    kind            text NOT NULL CHECK (kind IN ('notify', 'webhook', 'mqtt')),
    target          jsonb NOT NULL,  -- rendered: channel/url/topic and the message or payload
    status          text NOT NULL DEFAULT 'pending'
                    CHECK (status IN ('pending', 'delivered', 'failed')),
    attempts        integer NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    last_error      text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    delivered_at    timestamptz
);
CREATE INDEX idx_action_outbox_due ON action_outbox (next_attempt_at) WHERE status = 'pending';
CREATE INDEX idx_action_outbox_event ON action_outbox (event_id);

-- Every delivery attempt with its outcome, so an operator can see why an action failed.
CREATE TABLE action_attempts (
    id           bigserial PRIMARY KEY,
    outbox_id    bigint NOT NULL REFERENCES action_outbox (id) ON DELETE CASCADE,
    attempted_at timestamptz NOT NULL DEFAULT now(),
    ok           boolean NOT NULL,
    detail       text NOT NULL
);
CREATE INDEX idx_action_attempts_outbox ON action_attempts (outbox_id);

CREATE INDEX idx_events_device_metric ON events (device_metric_id, "timestamp");
