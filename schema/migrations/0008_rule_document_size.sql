-- Rule documents the service can read, enforced where they are written.
--
-- The service reads `rules.condition` and `rules.action` as text and refuses a document over
-- 65,536 characters (rules_engine/rule_json.py, MAX_TEXT_CHARS), but only after the text has
-- crossed the wire: a jsonb value may be up to 255 MB, and every rule reload (on any catalogue
-- change, inside a batch transaction) fetched such a rule whole. The database now refuses to
-- store one, so an oversized rule is an error for whoever writes it, not a cost for ingestion.
-- octet_length counts bytes, at least the characters the service counts, so nothing the
-- service would accept is refused here.
--
-- NOT VALID: rows written before this migration are not checked (the service still reads
-- them and reports them as json_too_large); `ALTER TABLE rules VALIDATE CONSTRAINT ...` checks
-- them once the operator has fixed or deleted them.

ALTER TABLE rules
    ADD CONSTRAINT rules_condition_size
        CHECK (octet_length(condition::text) <= 65536) NOT VALID,
    ADD CONSTRAINT rules_action_size
        CHECK (action IS NULL OR octet_length(action::text) <= 65536) NOT VALID;
