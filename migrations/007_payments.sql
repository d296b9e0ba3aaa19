-- Money in: payment orders (checkout, manual settlement, x402), the payment events received (each applied
-- once), reversals (refunds and disputes: credits taken back, once per id), referral codes and referrals.

-- 'reversal': credits taken back because the money went back (a provider refund, a dispute, an operator's
-- refund of unused purchased credits); written by the flusher from the debit script's outbox entry.
ALTER TABLE ledger DROP CONSTRAINT IF EXISTS ledger_kind_check;
ALTER TABLE ledger ADD CONSTRAINT ledger_kind_check CHECK (kind IN
    ('grant', 'purchase', 'starter', 'promotion', 'bonus', 'subscription', 'refund', 'adjustment',
     'usage', 'expiry', 'reversal'));

-- One row per attempt to buy credits. It becomes a grant once, when the provider says the money arrived
-- (a verified webhook, an x402 settle, or an operator's manual settlement); its grant id is the order id.
CREATE TABLE payment_orders (
    order_id          text COLLATE "C" PRIMARY KEY,            -- ours: 'ord_<hex>'
    account_id        text COLLATE "C" NOT NULL REFERENCES accounts (id),
    provider          text COLLATE "C" NOT NULL,                -- 'stripe', 'manual', 'x402', a generic name
    status            text NOT NULL CHECK (status IN ('pending', 'paid', 'failed', 'expired', 'canceled')),
    package           text,                                      -- the package's id; NULL: an amount
    credits           bigint NOT NULL CHECK (credits > 0),       -- micro-credits it grants when paid
    amount_minor      bigint NOT NULL CHECK (amount_minor >= 0), -- the price, in the currency's minor unit
    currency          text NOT NULL,                             -- ISO 4217, lower case ('usd'), or 'usdc'
    provider_ref      text COLLATE "C",                          -- checkout session id, payment nonce, ...
    payment_ref       text,                                      -- what the grant names (payment intent, tx)
    refunded_credits  bigint NOT NULL DEFAULT 0 CHECK (refunded_credits >= 0),
    refunded_minor    bigint NOT NULL DEFAULT 0 CHECK (refunded_minor >= 0),
    note              text,
    created_at        timestamptz NOT NULL DEFAULT now(),
    paid_at           timestamptz,
    UNIQUE (provider, provider_ref)
);
CREATE INDEX payment_orders_account ON payment_orders (account_id, created_at);

-- Every webhook event that passed its signature check, once per (provider, event id): the same event sent
-- again finds its row and changes nothing. Events for unknown orders are kept too (outcome 'unknown_order').
CREATE TABLE payment_events (
    provider     text COLLATE "C" NOT NULL,
    event_id     text COLLATE "C" NOT NULL,
    type         text NOT NULL,
    order_id     text COLLATE "C",
    outcome      text NOT NULL,
    received_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (provider, event_id)
);

-- Credits taken back from an order's account, once per reversal id ('stripe:<refund or dispute id>',
-- 'operator:<order>:<key>'). Written 'pending' before the debit script runs; `taken` is what the script
-- took (never below a zero balance; an operator's refund only from the order's own grant).
CREATE TABLE payment_reversals (
    reversal_id   text COLLATE "C" PRIMARY KEY,
    order_id      text COLLATE "C" NOT NULL REFERENCES payment_orders (order_id),
    account_id    text COLLATE "C" NOT NULL REFERENCES accounts (id),
    reason        text NOT NULL CHECK (reason IN ('refund', 'dispute', 'operator_refund')),
    asked         bigint NOT NULL CHECK (asked > 0),             -- micro-credits asked back
    taken         bigint,                                         -- micro-credits the debit took
    amount_minor  bigint NOT NULL DEFAULT 0,                      -- money returned (operator refunds)
    status        text NOT NULL CHECK (status IN ('pending', 'debited', 'refunded', 'failed')),
    provider_ref  text,                                           -- the provider's refund id
    created_at    timestamptz NOT NULL DEFAULT now(),
    applied_at    timestamptz
);
CREATE INDEX payment_reversals_order ON payment_reversals (order_id);

-- Referral codes: each account has a few; an account created with one links to its referrer.
CREATE TABLE referral_codes (
    code        text COLLATE "C" PRIMARY KEY,
    account_id  text COLLATE "C" NOT NULL REFERENCES accounts (id),
    max_uses    integer NOT NULL CHECK (max_uses > 0),
    uses        integer NOT NULL DEFAULT 0,
    created_at  timestamptz NOT NULL DEFAULT now(),
    CHECK (uses <= max_uses)
);
CREATE INDEX referral_codes_account ON referral_codes (account_id);

CREATE TABLE referrals (
    account_id   text COLLATE "C" PRIMARY KEY REFERENCES accounts (id),  -- the referred account
    referrer_id  text COLLATE "C" NOT NULL REFERENCES accounts (id),
    code         text COLLATE "C" NOT NULL REFERENCES referral_codes (code),
    created_at   timestamptz NOT NULL DEFAULT now(),
    rewarded_at  timestamptz,                 -- the referrer's bonus was granted (first purchase landed)
    CHECK (account_id <> referrer_id)
);
