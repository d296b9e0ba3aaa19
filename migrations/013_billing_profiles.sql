-- Billing profiles: who an account's documents are addressed to (set by the client for its own account or
-- by the operator). `version` counts the changes (1 for the first); a document stores the profile as it
-- was (documents/profiles.py profile_snapshot), so later edits never change an issued one.
CREATE TABLE billing_profiles (
    account_id     text COLLATE "C" PRIMARY KEY REFERENCES accounts (id),
    legal_name     text NOT NULL,
    address_lines  jsonb NOT NULL,                    -- ["line 1", ...] (1 to 4)
    city           text NOT NULL,
    postal_code    text NOT NULL,
    region         text,
    country        text NOT NULL CHECK (country ~ '^[A-Z]{2}$'),  -- ISO 3166-1 alpha-2
    tax_id         text,
    billing_email  text NOT NULL,
    version        integer NOT NULL DEFAULT 1 CHECK (version >= 1),
    updated_at     timestamptz NOT NULL DEFAULT now()
);
