-- The durable ledger: accounts, hashed client keys, and one row per money movement.
-- Money is signed integer micro-credits (1 credit = 1,000,000).

-- Identifiers compare bytewise (COLLATE "C"): they are ids, not prose, and this keeps the hot unique
-- indexes cheap.
CREATE TABLE accounts (
    id          text COLLATE "C" PRIMARY KEY,
    created_at  timestamptz NOT NULL DEFAULT now(),
    -- Maintained sum of this account's ledger rows, updated in the transaction that inserts them.
    balance     bigint NOT NULL DEFAULT 0
);

CREATE TABLE api_keys (
    id          text COLLATE "C" PRIMARY KEY,
    account_id  text COLLATE "C" NOT NULL REFERENCES accounts (id),
    key_hash    text NOT NULL UNIQUE,           -- SHA-256 of the key; the key itself is never stored
    created_at  timestamptz NOT NULL DEFAULT now(),
    revoked_at  timestamptz
);
CREATE INDEX api_keys_account ON api_keys (account_id);

CREATE TABLE ledger (
    idempotency_id     text COLLATE "C" PRIMARY KEY,  -- request id (usage) or idempotency key (money in)
    account_id         text COLLATE "C" NOT NULL REFERENCES accounts (id),
    kind               text NOT NULL CHECK (kind IN
                           ('grant', 'purchase', 'usage', 'refund', 'bonus', 'adjustment', 'expiry')),
    amount             bigint NOT NULL,         -- signed: usage is negative, grants positive
    -- Money in is written here first, then credited to Redis; applied records that second step.
    applied            boolean NOT NULL DEFAULT true,
    route              text,
    model              text,
    provider           text,
    key_source         text,
    multiplier         text,
    prompt_tokens      bigint,
    cached_tokens      bigint,
    completion_tokens  bigint,
    hold               bigint,
    overdraft          bigint,
    saved              bigint,                  -- credits a cache hit saved (zero-charge usage rows)
    outcome            text,
    note               text,
    started_at         timestamptz,
    settled_at         timestamptz,
    created_at         timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX ledger_account ON ledger (account_id, created_at);
CREATE INDEX ledger_unapplied ON ledger (created_at) WHERE NOT applied;
