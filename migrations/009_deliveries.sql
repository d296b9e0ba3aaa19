-- Signal delivery: each event (008) fanned out to its channels when it is written, in the same
-- transaction, so a restart loses no delivery. One row per event, channel and target (the webhook URL,
-- an email address); the worker claims due pending rows (FOR UPDATE SKIP LOCKED, several sidecars
-- share the table), logs every attempt, retries with backoff and gives up after the retry window.

CREATE TABLE signal_deliveries (
    delivery_id      bigserial PRIMARY KEY,
    event_id         text COLLATE "C" NOT NULL REFERENCES signal_events (event_id),
    channel          text NOT NULL CHECK (channel IN ('webhook', 'email')),
    target           text NOT NULL,                 -- the URL, or the email address
    status           text NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'delivered', 'failed')),
    attempts         integer NOT NULL DEFAULT 0,
    window_start_at  timestamptz NOT NULL,          -- the retry window's start (queued, or replayed)
    next_attempt_at  timestamptz NOT NULL,          -- due (pending), or leased until (being sent)
    last_error       text,
    delivered_at     timestamptz,
    created_at       timestamptz NOT NULL DEFAULT now(),
    UNIQUE (event_id, channel, target)
);
-- The worker's question: which pending deliveries are due.
CREATE INDEX signal_deliveries_due ON signal_deliveries (next_attempt_at) WHERE status = 'pending';

-- The delivery log: one row per attempt, kept through retries and replays.
CREATE TABLE signal_delivery_attempts (
    attempt_id    bigserial PRIMARY KEY,
    delivery_id   bigint NOT NULL REFERENCES signal_deliveries (delivery_id),
    attempted_at  timestamptz NOT NULL,
    outcome       text NOT NULL CHECK (outcome IN ('delivered', 'retry', 'failed')),
    reply         text,                             -- the HTTP status, or the SMTP reply
    error         text,                             -- truncated
    duration_ms   integer NOT NULL
);
CREATE INDEX signal_delivery_attempts_delivery ON signal_delivery_attempts (delivery_id, attempt_id);

-- Where an account's alerts are emailed (set by the client, PUT /v1/credits/contact, or the operator).
CREATE TABLE signal_contacts (
    account_id  text COLLATE "C" PRIMARY KEY REFERENCES accounts (id),
    email       text NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now()
);
