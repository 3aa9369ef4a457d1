-- Where each device_metric's rule evaluation stands, apart from the rules' own states.
--
-- Every batch moves the newest reading the rules have seen, but seldom a rule's state machine.
-- Kept in rule_states, that newest reading made every batch rewrite a row per (rule,
-- device_metric); kept here, a batch writes one row per device_metric, and a rule's row only
-- when its status, pending run, cooldown or windows change.
--
-- `version` lets a service instance keep the states in memory between batches: each write of a
-- cursor takes a new value of the sequence, and every write to rule_states bumps the versions
-- of its device_metrics (triggers below). Under the device_metric's advisory lock, a version
-- equal to the one an instance wrote itself means nobody else (another instance, the no-data
-- timer, an operator) has touched the states since; anything else makes it read them again.

CREATE SEQUENCE rule_cursor_version AS bigint;

CREATE TABLE rule_cursors (
    device_metric_id integer PRIMARY KEY REFERENCES device_metrics (id) ON DELETE CASCADE,
    last_ts          timestamptz NOT NULL,  -- device time of the newest evaluated reading
    last_value       jsonb NOT NULL,        -- its value (delta compares the next one with it)
    version          bigint NOT NULL DEFAULT nextval('rule_cursor_version'),
    updated_at       timestamptz NOT NULL DEFAULT now()
) WITH (fillfactor = 70);  -- rewritten on every batch: room for HOT updates on the same page

-- Carry the newest reading over from the states written before this migration.
INSERT INTO rule_cursors (device_metric_id, last_ts, last_value)
SELECT DISTINCT ON (device_metric_id)
       device_metric_id, last_ts, COALESCE(state -> 'last_value', 'null'::jsonb)
FROM rule_states
WHERE last_ts IS NOT NULL
  AND EXISTS (SELECT 1 FROM rules r WHERE r.device_metric_id = rule_states.device_metric_id
              AND r.is_active)
ORDER BY device_metric_id, last_ts DESC;

-- The newest reading now lives in rule_cursors only: a stale copy here would mislead.
ALTER TABLE rule_states DROP COLUMN last_ts;
UPDATE rule_states SET state = state - 'last_ts' - 'last_value';

CREATE FUNCTION iothub_rule_states_touched() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'TRUNCATE' THEN
        UPDATE rule_cursors SET version = nextval('rule_cursor_version');
    ELSIF TG_OP = 'UPDATE' THEN  -- a row moved to another device_metric touches both
        UPDATE rule_cursors SET version = nextval('rule_cursor_version')
        WHERE device_metric_id IN (SELECT device_metric_id FROM touched
                                   UNION SELECT device_metric_id FROM touched_before);
    ELSE
        UPDATE rule_cursors SET version = nextval('rule_cursor_version')
        WHERE device_metric_id IN (SELECT device_metric_id FROM touched);
    END IF;
    RETURN NULL;
END $$;

-- A trigger with a transition table takes one event, hence one trigger per kind of write.
CREATE TRIGGER rule_states_inserted AFTER INSERT ON rule_states
    REFERENCING NEW TABLE AS touched
    FOR EACH STATEMENT EXECUTE FUNCTION iothub_rule_states_touched();
CREATE TRIGGER rule_states_updated AFTER UPDATE ON rule_states
    REFERENCING OLD TABLE AS touched_before NEW TABLE AS touched
    FOR EACH STATEMENT EXECUTE FUNCTION iothub_rule_states_touched();
CREATE TRIGGER rule_states_deleted AFTER DELETE ON rule_states
    REFERENCING OLD TABLE AS touched
    FOR EACH STATEMENT EXECUTE FUNCTION iothub_rule_states_touched();
CREATE TRIGGER rule_states_truncated AFTER TRUNCATE ON rule_states
    FOR EACH STATEMENT EXECUTE FUNCTION iothub_rule_states_touched();

-- A cursor edited by hand (say, rewound) without a new version would be overwritten by a
-- service that trusts its memory: any update that keeps the version gets a new one.
CREATE FUNCTION iothub_rule_cursor_edited() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.version := nextval('rule_cursor_version');
    RETURN NEW;
END $$;

CREATE TRIGGER rule_cursors_edited BEFORE UPDATE ON rule_cursors
    FOR EACH ROW WHEN (NEW.version = OLD.version)
    EXECUTE FUNCTION iothub_rule_cursor_edited();

-- The cursor says where the rules of a device_metric stopped reading. Without an active rule
-- nothing moves it, so a rule added later would take a reading of long ago as the last one (a
-- no_data rule would see a silence that never was): the cursor goes with the last active rule.
CREATE FUNCTION iothub_rules_left() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM rule_cursors c
    WHERE c.device_metric_id IN (SELECT device_metric_id FROM gone)
      AND NOT EXISTS (
          SELECT 1 FROM rules r WHERE r.device_metric_id = c.device_metric_id AND r.is_active
      );
    RETURN NULL;
END $$;

CREATE TRIGGER rules_deactivated AFTER UPDATE ON rules
    REFERENCING OLD TABLE AS gone
    FOR EACH STATEMENT EXECUTE FUNCTION iothub_rules_left();
CREATE TRIGGER rules_deleted AFTER DELETE ON rules
    REFERENCING OLD TABLE AS gone
    FOR EACH STATEMENT EXECUTE FUNCTION iothub_rules_left();
