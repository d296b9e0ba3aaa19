-- Signals: the events the sidecar tells the operator about (alerts, reloads, recurring charges), written
-- once each by an id derived from its cause, and the crossing state that makes an alert fire once per
-- crossing. Deliveries of the events (webhooks, email) have their own tables (009).

CREATE TABLE signal_events (
    event_id    text COLLATE "C" PRIMARY KEY,  -- from its cause ('balance.low:<acct>:<rule>:<n>'): once
    type        text NOT NULL,                 -- 'balance.low', 'spend.high', 'reload.requested', ...
    account_id  text COLLATE "C" NOT NULL REFERENCES accounts (id),
    data        jsonb NOT NULL,                -- the event's body: amounts as integer micro-credits
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX signal_events_account ON signal_events (account_id, created_at);

-- One row per (account, signal): armed until the observed value crosses below its threshold, which
-- fires the signal once and disarms it; re-armed when an observation is back above (after a top-up).
-- Observations carry a position (the outbox entry's stream id, a period's index): an older one than the
-- last seen is ignored, so batches written out of order or twice never re-arm or fire again.
CREATE TABLE signal_crossings (
    account_id  text COLLATE "C" NOT NULL REFERENCES accounts (id),
    signal      text COLLATE "C" NOT NULL,     -- 'low:<rule id>', 'reload', 'runway', ...
    armed       boolean NOT NULL DEFAULT true,
    crossings   bigint NOT NULL DEFAULT 0,     -- how many times it fired (numbers the event ids)
    seen_major  bigint NOT NULL DEFAULT -1,    -- the last observation's position
    seen_minor  bigint NOT NULL DEFAULT -1,
    changed_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (account_id, signal)
);
