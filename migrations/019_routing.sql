-- Routing and provider costs (README "Routing and fallback", "Provider costs and margins"): each usage
-- row records what the serving upstream's provider charges for it (micro-credits; NULL: unknown), the
-- upstream calls the request made, the model name that upstream was sent when it is not the gateway's,
-- and whether the pooled markup applied. `provider` already names the upstream that served.
--
-- Older rows keep NULL in all four, and their key_source as it was written ('pooled', 'byok'): readers
-- show those as 'pool' and 'inline' (statements.py), rather than this migration rewriting every usage
-- row of every partition in one transaction.
ALTER TABLE ledger
    ADD COLUMN cost bigint,
    ADD COLUMN attempts integer,
    ADD COLUMN upstream_model text,
    ADD COLUMN marked_up boolean;

-- Appended after drawn, in the order of ledger_sql.BATCH_FIELDS.
ALTER TYPE ledger_usage_row
    ADD ATTRIBUTE cost bigint,
    ADD ATTRIBUTE attempts integer,
    ADD ATTRIBUTE upstream_model text,
    ADD ATTRIBUTE marked_up boolean;
