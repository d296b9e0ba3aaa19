-- The wallet: every credit is a grant (kind, priority, expiry, payment reference); usage rows record which
-- grants they drew from, the key, the end user and tags; spend caps; per-day roll-ups the reads use.

-- Ledger kinds: the grant kinds, and 'expiry' (an expired remainder leaving). 'grant' stays for old rows.
ALTER TABLE ledger DROP CONSTRAINT IF EXISTS ledger_kind_check;
ALTER TABLE ledger ADD CONSTRAINT ledger_kind_check CHECK (kind IN
    ('grant', 'purchase', 'starter', 'promotion', 'bonus', 'subscription', 'refund', 'adjustment',
     'usage', 'expiry'));

-- Attribution of a usage row, and the grants it drew from: {"<grant id>": micro-credits, ...}.
ALTER TABLE ledger
    ADD COLUMN key_id   text,
    ADD COLUMN end_user text,
    ADD COLUMN tags     text[],
    ADD COLUMN drawn    jsonb;

-- One row per credit that arrived (the money-in row's grant). grant_id is the money-in idempotency key
-- as the client gave it (unique per account); the ledger row's idempotency_id is 'in:<account>:<grant_id>'.
CREATE TABLE grants (
    account_id    text COLLATE "C" NOT NULL REFERENCES accounts (id),
    grant_id      text COLLATE "C" NOT NULL,
    kind          text NOT NULL CHECK (kind IN
                      ('grant', 'purchase', 'starter', 'promotion', 'bonus', 'subscription', 'refund',
                       'adjustment')),
    amount        bigint NOT NULL CHECK (amount > 0),
    priority      integer NOT NULL,
    effective_at  timestamptz NOT NULL,
    expires_at    timestamptz,                 -- a fixed date, or NULL
    idle_expiry   boolean NOT NULL DEFAULT false,  -- expires after the account is idle N days
    payment_ref   text,
    -- What usage, expiry and debt payoff took from it, folded from grant_draws now and then; the grant's
    -- remainder is amount - drawn - (its rows in grant_draws).
    drawn         bigint NOT NULL DEFAULT 0,
    created_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (account_id, grant_id)
);

-- Appended by the flusher with each batch (one row per grant per batch: usage draws, expiries, payoffs),
-- folded into grants.drawn like ledger_balance_deltas into accounts.balance: batches never queue on a
-- grant's row.
CREATE TABLE grant_draws (
    account_id  text COLLATE "C" NOT NULL,
    grant_id    text COLLATE "C" NOT NULL,
    amount      bigint NOT NULL
);
CREATE INDEX grant_draws_grant ON grant_draws (account_id, grant_id);

-- Spend caps, the truth behind Redis' caps hash. scope: 'account', 'key:<id>', 'model:<name>',
-- 'user:<end user>' or 'user:*' (every end user without a cap of their own); period: total, day, month.
CREATE TABLE spend_caps (
    account_id   text COLLATE "C" NOT NULL REFERENCES accounts (id),
    scope        text COLLATE "C" NOT NULL,
    period       text NOT NULL CHECK (period IN ('total', 'day', 'month')),
    limit_micro  bigint NOT NULL CHECK (limit_micro >= 0),
    updated_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (account_id, scope, period)
);

-- The time zone an account's day and month caps (and its statements' days) follow; NULL is UTC.
ALTER TABLE accounts ADD COLUMN time_zone text;

ALTER TABLE api_keys
    ADD COLUMN name         text,
    ADD COLUMN expires_at   timestamptz,
    ADD COLUMN last_used_at timestamptz;

-- Usage roll-ups, appended by the flusher in the transaction of the rows (one row per account, UTC day,
-- dimension and value per batch) and compacted now and then; reads always SUM ... GROUP BY, so they are
-- right whether compacted or not. dim: 'total' (value ''), 'model', 'key', 'user', 'tag' ('k=v').
CREATE TABLE usage_rollup (
    account_id         text COLLATE "C" NOT NULL,
    day                date NOT NULL,
    dim                text NOT NULL,
    value              text COLLATE "C" NOT NULL,
    requests           bigint NOT NULL,
    charge             bigint NOT NULL,
    saved              bigint NOT NULL,
    prompt_tokens      bigint NOT NULL,
    completion_tokens  bigint NOT NULL
);
CREATE INDEX usage_rollup_account ON usage_rollup (account_id, day, dim);
