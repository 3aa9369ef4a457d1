-- When the service last received a reading of each device_metric, on its own clock.
--
-- The no-data timer judged silence on device time (`last_ts`): a device whose clock runs three
-- minutes behind looked silent three minutes early and produced a triggered/resolved pair on
-- every check, and after a restart the readings still queued at the broker looked like a
-- silence. Silence is now judged on receipt time, kept here with the cursor in the same write.
-- Every batch that stores a reading of the device_metric sets it, late readings included (they
-- are not evaluated, but they show the device is talking).

ALTER TABLE rule_cursors ADD COLUMN last_received timestamptz;

-- A cursor was last written when a reading was last evaluated: the best receipt time known.
UPDATE rule_cursors SET last_received = updated_at;

ALTER TABLE rule_cursors
    ALTER COLUMN last_received SET NOT NULL,
    ALTER COLUMN last_received SET DEFAULT now();
