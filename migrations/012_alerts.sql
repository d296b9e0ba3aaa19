-- Alerts and auto-reload: per-account rules (set by the client for its own account or by the operator),
-- and the reloads started when the balance crosses an account's reload threshold.

-- An account's alert rules; an account with no row in alert_settings has the default rules only
-- (settings: alert_top_up_percents).
CREATE TABLE alert_settings (
    account_id  text COLLATE "C" PRIMARY KEY REFERENCES accounts (id),
    defaults    boolean NOT NULL DEFAULT true,  -- the default top-up shares apply as well
    rules       jsonb NOT NULL DEFAULT '[]',    -- [{kind, amount | percent}] (signals/alert_rules.py)
    updated_at  timestamptz NOT NULL DEFAULT now()
);

-- Auto-reload: when a settle takes the balance below `threshold`, one reload of `credits` starts.
CREATE TABLE reload_settings (
    account_id        text COLLATE "C" PRIMARY KEY REFERENCES accounts (id),
    enabled           boolean NOT NULL DEFAULT false,
    threshold         bigint NOT NULL CHECK (threshold > 0),     -- micro-credits
    credits           bigint NOT NULL CHECK (credits > 0),       -- micro-credits a reload buys
    method            text NOT NULL CHECK (method IN ('stripe', 'webhook')),
    failures          integer NOT NULL DEFAULT 0,                -- in a row; reset by a success
    disabled_reason   text,
    updated_at        timestamptz NOT NULL DEFAULT now()
);

-- An account's saved payment method at Stripe, for off-session payments: saved by a checkout that asked
-- for it (save_payment_method), or set by the operator.
CREATE TABLE payment_methods (
    account_id      text COLLATE "C" PRIMARY KEY REFERENCES accounts (id),
    customer        text NOT NULL,                               -- 'cus_...'
    payment_method  text NOT NULL,                               -- 'pm_...'
    saved_at        timestamptz NOT NULL DEFAULT now()
);

-- One row per crossing of a reload threshold (its id names the crossing: exactly one per crossing).
CREATE TABLE reloads (
    reload_id    text COLLATE "C" PRIMARY KEY,                   -- 'rl_<account>_<outbox entry id>'
    account_id   text COLLATE "C" NOT NULL REFERENCES accounts (id),
    status       text NOT NULL CHECK (status IN ('requested', 'charging', 'succeeded', 'failed')),
    method       text NOT NULL,
    credits      bigint NOT NULL CHECK (credits > 0),
    order_id     text COLLATE "C" NOT NULL,                      -- its payment order (made when it starts)
    error        text,
    created_at   timestamptz NOT NULL DEFAULT now(),
    finished_at  timestamptz
);
CREATE INDEX reloads_open ON reloads (created_at) WHERE status IN ('requested', 'charging');
CREATE INDEX reloads_account ON reloads (account_id, created_at);
