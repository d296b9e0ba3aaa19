-- A BRIN index on the ledger's created_at: the rebuild of a lost Redis reads the last window's debits
-- (to write their settled markers again) by time across accounts, which the primary key, led by
-- account_id, cannot serve. Rows arrive roughly in time order, so a block-range index stays a few pages
-- per partition and costs the flusher's inserts next to nothing.
CREATE INDEX ledger_created_brin ON ledger USING brin (created_at);
