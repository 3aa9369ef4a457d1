-- Deliveries leave the claim's transaction: a worker claims due rows with a lease in a short
-- transaction, delivers with no transaction open, and records the outcome in another short one.
--
-- `lease_until`: while in the future, the row is being delivered and no other worker takes it;
-- once past (the worker crashed, hung or lost its database), the row is due again.
-- `claimed_by`: the token of the claim that holds the lease (worker name and a random part, new
-- for every claim). An outcome is recorded only while the token is still the row's, so a worker
-- whose lease expired and was taken over cannot overwrite the newer claim's outcome.
ALTER TABLE action_outbox
    ADD COLUMN lease_until timestamptz,
    ADD COLUMN claimed_by  text;
