-- Recurring charges: a meter is a running resource billed per period in advance (a container per day,
-- storage per GB-day) or once (a deployment fee). Each period's charge is one meter_charges row, once
-- per (meter, period): the record that the period was charged (its money moved in Redis with the
-- request id 'meter:<meter id>:<period>', its ledger row written by the flusher from the outbox).

CREATE TABLE meters (
    meter_id      text COLLATE "C" PRIMARY KEY,                 -- ours: 'mtr_<hex>'
    account_id    text COLLATE "C" NOT NULL REFERENCES accounts (id),
    resource_id   text COLLATE "C" NOT NULL,                    -- the client's id (its idempotency)
    kind          text NOT NULL CHECK (kind IN ('period', 'one_time')),
    price         bigint NOT NULL CHECK (price > 0),            -- micro-credits per unit per period
    price_name    text,                                         -- the recurring_prices entry, if named
    quantity      bigint NOT NULL CHECK (quantity > 0),         -- units (GB, containers)
    period        text NOT NULL,                                -- 'hour', 'day', 'month' or '<seconds>s'
    status        text NOT NULL CHECK (status IN ('running', 'unpaid', 'stopped')),
    started_ms    bigint NOT NULL,                              -- period 0 starts here (ms since epoch)
    stopped_ms    bigint,                                       -- no period starting at or after it
    next_period   bigint NOT NULL DEFAULT 0,                    -- the first period not charged yet
    next_due_ms   bigint,                                       -- when it starts; NULL: nothing more to charge
    body          jsonb NOT NULL,                               -- the creating request, as normalised
    created_at    timestamptz NOT NULL DEFAULT now(),
    UNIQUE (account_id, resource_id)
);
CREATE INDEX meters_due ON meters (next_due_ms) WHERE next_due_ms IS NOT NULL;

-- One row per charged (or being charged) period. 'pending': written before Redis is called, with the
-- window end (real ms) every try of this charge passes the reserve and settle scripts, so a retry
-- within it finds the settled marker and moves nothing twice; 'charged': Redis took it.
CREATE TABLE meter_charges (
    meter_id       text COLLATE "C" NOT NULL REFERENCES meters (meter_id),
    period         bigint NOT NULL CHECK (period >= 0),
    amount         bigint NOT NULL CHECK (amount > 0),
    state          text NOT NULL CHECK (state IN ('pending', 'charged')),
    window_end_ms  bigint NOT NULL,
    starts_ms      bigint NOT NULL,                             -- the period's start
    charged_at     timestamptz,
    PRIMARY KEY (meter_id, period)
);
