-- Billing modes (sidecar/documents/billing_modes.py): an account on `invoice` is admitted against a credit
-- limit (NULL: unlimited) instead of its balance, its usage accrues (the balance goes below zero) and is
-- invoiced at each period end, due `terms_days` after; `blocked` (an overdue invoice past its grace, or
-- the operator) refuses new positive holds. No row: prepaid. Redis' account hash mirrors `credit` and
-- `blocked` (Postgres first, then Redis; the rebuild restores them).
CREATE TABLE account_billing (
    account_id      text COLLATE "C" PRIMARY KEY REFERENCES accounts (id),
    mode            text NOT NULL DEFAULT 'prepaid' CHECK (mode IN ('prepaid', 'invoice')),
    credit_limit    bigint CHECK (credit_limit >= 0),  -- micro-credits; NULL: unlimited (invoice mode)
    terms_days      integer NOT NULL DEFAULT 30 CHECK (terms_days BETWEEN 0 AND 365),
    blocked         boolean NOT NULL DEFAULT false,
    blocked_reason  text,
    updated_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX account_billing_invoice ON account_billing (account_id) WHERE mode = 'invoice';
