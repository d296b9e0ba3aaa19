-- Subscription plans (sidecar/documents/plans*.py): an account's subscription to a configured plan
-- (settings: plans), and the record of each period whose grant was made.

-- At most one active subscription per account; `period_index` is the period granted last, whose end
-- (`period_end`) is when the next one comes due. `next_plan` takes effect at that next period.
CREATE TABLE subscriptions (
    id            text COLLATE "C" PRIMARY KEY,
    account_id    text COLLATE "C" NOT NULL REFERENCES accounts (id),
    plan          text NOT NULL,
    status        text NOT NULL CHECK (status IN ('active', 'canceled')),
    anchor        timestamptz NOT NULL,        -- period 0's start; period k: k months (years) on
    time_zone     text NOT NULL DEFAULT 'UTC', -- the account's when it started: the periods' wall clock
    period_index  integer NOT NULL DEFAULT 0,
    period_end    timestamptz NOT NULL,
    next_plan     text,
    created_at    timestamptz NOT NULL DEFAULT now(),
    canceled_at   timestamptz
);
CREATE UNIQUE INDEX subscriptions_active ON subscriptions (account_id) WHERE status = 'active';
CREATE INDEX subscriptions_due ON subscriptions (period_end) WHERE status = 'active';

-- A period granted: once per (subscription, period); its grant's idempotency key is
-- 'sub:<subscription>:<period>' (and 'sub:<subscription>:<period>:carry' for a rollover).
CREATE TABLE subscription_periods (
    subscription_id  text COLLATE "C" NOT NULL REFERENCES subscriptions (id),
    period_index     integer NOT NULL,
    plan             text NOT NULL,
    amount           bigint NOT NULL CHECK (amount > 0),  -- micro-credits of the period's grant
    starts_at        timestamptz NOT NULL,
    ends_at          timestamptz NOT NULL,
    carried          bigint,                              -- the rollover granted (NULL: none yet)
    granted_at       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (subscription_id, period_index)
);
