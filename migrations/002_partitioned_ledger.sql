-- The ledger, range-partitioned by month on created_at (UTC months), keeping every existing row.
--
-- Every unique key leads with account_id, so the table can be distributed by account (Citus): the
-- primary key is (account_id, created_at, idempotency_id). It is also the index per-account reads use
-- (an account's rows in time order). A partitioned table's unique keys must contain the partition key,
-- so exactly-once rests on created_at being a function of the money movement itself, never of when the
-- row happens to be written:
--   * usage: the settle time carried in the outbox entry (settled_ms, else started_ms, else the stream
--     entry id's time); a redelivered entry maps to the same (account, time, id) and inserts nothing;
--   * money in: the time of the first attempt, kept in money_in_keys, whose primary key
--     (account_id, idempotency_id) is unique without a time; a retry a month later finds it there.
-- A DEFAULT partition takes a row whose month has no partition yet; ledger_add_month moves such rows
-- into the month's partition when it creates it.

ALTER TABLE ledger RENAME TO ledger_unpartitioned;
ALTER TABLE ledger_unpartitioned RENAME CONSTRAINT ledger_pkey TO ledger_unpartitioned_pkey;
DROP INDEX ledger_account;
DROP INDEX ledger_unapplied;

CREATE TABLE ledger (
    idempotency_id     text COLLATE "C" NOT NULL,  -- request id (usage) or money-in id
    account_id         text COLLATE "C" NOT NULL REFERENCES accounts (id),
    kind               text NOT NULL CHECK (kind IN
                           ('grant', 'purchase', 'usage', 'refund', 'bonus', 'adjustment', 'expiry')),
    amount             bigint NOT NULL,         -- signed: usage is negative, grants positive
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
    saved              bigint,
    outcome            text,
    note               text,
    started_at         timestamptz,
    settled_at         timestamptz,
    -- The partition key: when the money moved (usage: the settle time; money in: the first attempt).
    created_at         timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (account_id, created_at, idempotency_id)
) PARTITION BY RANGE (created_at);
CREATE INDEX ledger_unapplied ON ledger (created_at) WHERE NOT applied;
CREATE TABLE ledger_default PARTITION OF ledger DEFAULT;

-- An account's ledger balance is accounts.balance plus its rows here: a usage batch appends one delta per
-- account (batches in flight never queue on an account's row), folded into accounts.balance now and then.
CREATE TABLE ledger_balance_deltas (
    account_id  text COLLATE "C" NOT NULL,
    delta       bigint NOT NULL
);

-- One usage row as the flusher sends it (a batch is one array of these: one parameter, cheap to encode);
-- the fields of sidecar/ledger_store.py's _BATCH, in its order. Times are epoch milliseconds.
CREATE TYPE ledger_usage_row AS (
    idempotency_id text, account_id text, kind text, amount bigint, route text, model text, provider text,
    key_source text, multiplier text, prompt_tokens bigint, cached_tokens bigint, completion_tokens bigint,
    hold bigint, overdraft bigint, saved bigint, outcome text, started_ms bigint, settled_ms bigint,
    created_ms bigint
);

-- Money in: one row per (account, idempotency id), naming its ledger row's created_at.
CREATE TABLE money_in_keys (
    account_id      text COLLATE "C" NOT NULL REFERENCES accounts (id),
    idempotency_id  text COLLATE "C" NOT NULL,
    created_at      timestamptz NOT NULL,
    PRIMARY KEY (account_id, idempotency_id)
);

-- The partition of one UTC month (ledger_YYYY_MM), created when missing; rows the default partition
-- holds for that month move into it. Returns the partition's name when this call created it, else NULL.
-- Safe to call concurrently (a lock on the parent serialises creators) and repeatedly.
CREATE FUNCTION ledger_add_month(month date) RETURNS text LANGUAGE plpgsql AS $fn$
DECLARE
    first date := date_trunc('month', month)::date;
    part text := 'ledger_' || to_char(first, 'YYYY_MM');
    ns text := (SELECT relnamespace::regnamespace::text FROM pg_class WHERE oid = 'ledger'::regclass);
    lower_bound timestamptz := first::timestamp AT TIME ZONE 'UTC';
    upper_bound timestamptz := (first + interval '1 month')::timestamp AT TIME ZONE 'UTC';
BEGIN
    IF to_regclass(format('%s.%I', ns, part)) IS NOT NULL THEN
        RETURN NULL;
    END IF;
    -- Creators queue on the parent (this mode lets inserts through); taking a table lock also brings in
    -- the catalog changes of the creator before, so the check below sees its partition.
    EXECUTE format('LOCK TABLE %s.ledger IN SHARE UPDATE EXCLUSIVE MODE', ns);
    IF to_regclass(format('%s.%I', ns, part)) IS NOT NULL THEN
        RETURN NULL;  -- another session created it while this one waited
    END IF;
    EXECUTE format('CREATE TABLE %s.%I (LIKE %s.ledger INCLUDING DEFAULTS INCLUDING CONSTRAINTS)',
                   ns, part, ns);
    EXECUTE format('WITH moved AS (DELETE FROM %s.ledger_default WHERE created_at >= $1 AND created_at < $2'
                   ' RETURNING *) INSERT INTO %s.%I SELECT * FROM moved', ns, ns, part)
        USING lower_bound, upper_bound;
    EXECUTE format('ALTER TABLE %s.ledger ATTACH PARTITION %s.%I FOR VALUES FROM (%L) TO (%L)',
                   ns, ns, part, lower_bound, upper_bound);
    RETURN part;
END
$fn$;

-- The partitions of the month of `at_time` and the `ahead` months after it; returns those created.
CREATE FUNCTION ledger_add_months(at_time timestamptz, ahead integer) RETURNS SETOF text LANGUAGE sql AS $fn$
    SELECT part FROM (
        SELECT ledger_add_month((date_trunc('month', at_time AT TIME ZONE 'UTC') + n * interval '1 month')::date)
        FROM generate_series(0, ahead) AS n
    ) AS made (part)
    WHERE part IS NOT NULL
$fn$;

-- The existing rows: one partition per month that has any, then the rows, then the money-in keys.
-- Usage rows take their settle time as created_at (what a redelivered outbox entry maps to).
CREATE TEMP TABLE ledger_moving ON COMMIT DROP AS
    SELECT idempotency_id, account_id, kind, amount, applied, route, model, provider, key_source,
           multiplier, prompt_tokens, cached_tokens, completion_tokens, hold, overdraft, saved, outcome,
           note, started_at, settled_at,
           CASE WHEN kind = 'usage' THEN coalesce(settled_at, created_at) ELSE created_at END AS created_at
    FROM ledger_unpartitioned;
SELECT ledger_add_month(m)
FROM (SELECT DISTINCT date_trunc('month', created_at AT TIME ZONE 'UTC')::date AS m FROM ledger_moving) AS months;
INSERT INTO ledger SELECT * FROM ledger_moving;
INSERT INTO money_in_keys (account_id, idempotency_id, created_at)
    SELECT account_id, idempotency_id, created_at FROM ledger_moving WHERE kind <> 'usage';
DROP TABLE ledger_unpartitioned;
