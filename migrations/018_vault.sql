-- The BYOK vault (sidecar/vault): customers' own provider keys, at most one per (account, provider),
-- sealed with AES-256-GCM under a master key. Only the sealed key is stored: `nonce` (96 bits, fresh for
-- every write) and `sealed` (the ciphertext and its 16-byte tag); the associated data binds account,
-- provider and id, so a row copied to another account, provider or id does not open. `master_key_id`
-- names the key that sealed it (`creditgate vault rotate` moves rows to the current one); `last4` is what
-- listings show. Redis mirrors each account's rows, still sealed, in its slot (Postgres first, then Redis,
-- under the account's advisory lock; the rebuild restores them).
CREATE TABLE llm_keys (
    id             text COLLATE "C" PRIMARY KEY,
    account_id     text COLLATE "C" NOT NULL REFERENCES accounts (id),
    provider       text COLLATE "C" NOT NULL,
    label          text,
    last4          text NOT NULL,
    master_key_id  text COLLATE "C" NOT NULL,
    nonce          bytea NOT NULL CHECK (length(nonce) = 12),
    sealed         bytea NOT NULL CHECK (length(sealed) > 16),
    created_at     timestamptz NOT NULL DEFAULT now(),
    updated_at     timestamptz NOT NULL DEFAULT now(),
    UNIQUE (account_id, provider)
);
-- The rotation's (and the startup check's) walk by master key id.
CREATE INDEX llm_keys_master_key ON llm_keys (master_key_id, id);
