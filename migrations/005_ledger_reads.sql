-- The flusher's batch rows carry the wallet's attribution and the grants each row drew from; roll-ups are
-- compacted; the reads of a customer's spend get their indexes.

-- Appended after created_ms, in the order of ledger_sql.BATCH_FIELDS.
ALTER TYPE ledger_usage_row
    ADD ATTRIBUTE key_id text,
    ADD ATTRIBUTE end_user text,
    ADD ATTRIBUTE tags text[],
    ADD ATTRIBUTE drawn jsonb;

-- Batches append roll-up rows (compacted = false); the compaction merges them into one compacted row per
-- (account, day, dimension, value).
ALTER TABLE usage_rollup ADD COLUMN compacted boolean NOT NULL DEFAULT false;
CREATE UNIQUE INDEX usage_rollup_merged ON usage_rollup (account_id, day, dim, value) WHERE compacted;
CREATE INDEX usage_rollup_fresh ON usage_rollup (account_id) WHERE NOT compacted;

-- GET /v1/credits/requests/{id}: one request's row without knowing its time (led by the id, so that an
-- account's reads keep to the primary key).
CREATE INDEX ledger_request ON ledger (idempotency_id);

-- 002 created the partitioned ledger's kind check while 001's renamed table still held the name
-- ledger_kind_check, so 002's is ledger_kind_check1 and 004's DROP CONSTRAINT IF EXISTS ledger_kind_check
-- dropped nothing: the old list (no 'starter', 'promotion', 'subscription') still refused those grants.
-- 004's check, with every kind, stays.
ALTER TABLE ledger DROP CONSTRAINT IF EXISTS ledger_kind_check1;
