"""The SQL of the usage batches the flusher writes, shared with bench/flush_throughput.py.

An account's ledger balance is ``accounts.balance`` plus its rows in ``ledger_balance_deltas``: a usage
batch appends one delta per account instead of updating the account's row, and the deltas are folded into
``accounts.balance`` now and then (``LedgerStore.fold_balances``) and whenever a reader needs the figure
(``LedgerStore.ledger_view`` adds those not yet folded, in the same snapshot).
"""

from __future__ import annotations

# Every transaction that changes what Redis should hold relative to the ledger (a usage batch, money in
# marked applied) takes this lock shared; a reconcile or rebuild takes it exclusively while it reads
# Redis and Postgres, so that no such change lands between the two reads.
LEDGER_BARRIER = 0x6372656462


def scoped(lock: int | str) -> str:
    """An advisory lock's key in SQL, scoped to the ledger's schema: ledgers sharing one database (tenants,
    test suites) never wait on each other's locks. `lock` is an id, or a parameter such as "$1"."""
    return f"hashtextextended(current_schema(), {lock})"


LEDGER_FOLD = 0x637265666F  # one fold of the balance deltas at a time ("crefo")

# The fields of a batch row, in the order outbox.ledger_row builds them: the composite type
# ledger_usage_row (migrations 002, 005 and 019) has them in this order. A batch travels as one array of
# that type (one parameter: about a third of the client CPU of one array per column, see README "Flush
# throughput").
# The three times are epoch milliseconds and become timestamptz in SQL; created_ms (the partition key)
# comes from the outbox entry itself, so a redelivered entry is the same (account, created_at, request
# id) and inserts nothing. drawn is jsonb text: {"<grant id>": micro-credits, ...}.
BATCH_FIELDS = (
    "idempotency_id",
    "account_id",
    "kind",
    "amount",
    "route",
    "model",
    "provider",
    "key_source",
    "multiplier",
    "prompt_tokens",
    "cached_tokens",
    "completion_tokens",
    "hold",
    "overdraft",
    "saved",
    "outcome",
    "started_ms",
    "settled_ms",
    "created_ms",
    "key_id",
    "end_user",
    "tags",
    "drawn",
    "cost",
    "attempts",
    "upstream_model",
    "marked_up",
)
_STORED = tuple(f for f in BATCH_FIELDS if not f.endswith("_ms"))
_MS = "timestamptz 'epoch' + b.{} * interval '1 millisecond'"

_ROWS = f"""
    INSERT INTO ledger ({", ".join(_STORED)}, started_at, settled_at, created_at)
    SELECT {", ".join(f"b.{c}" for c in _STORED)},
        {", ".join(_MS.format(f"{c}_ms") for c in ("started", "settled", "created"))}
    FROM unnest($1::ledger_usage_row[]) AS b"""

# The batch's rows inserted and nothing else (no barrier, no dedup, no balances): the limit
# bench/flush_throughput.py measures the flusher against.
BARE_INSERT = _ROWS

# One statement, one round trip. Rows already present are skipped, and everything else follows from the
# rows actually inserted (so a replayed batch adds nothing anywhere):
# - the balances, as one delta row per account, appended (concurrent batches never wait for each other on
#   an account's row, as they did when this statement updated accounts.balance: they serialised, and
#   deadlocked), and folded into accounts.balance by FOLD_BALANCES;
# - the grants' draws, one grant_draws row per grant (folded into grants.drawn by FOLD_GRANT_DRAWS);
# - the usage roll-ups: one usage_rollup row per (account, UTC day, dimension, value) of the usage rows
#   (compacted by COMPACT_ROLLUPS). A row's repeated tag counts once.
_USAGE = f"""
WITH barrier AS (SELECT pg_advisory_xact_lock_shared({scoped(LEDGER_BARRIER)})), inserted AS ({_ROWS}, barrier
    {{}}
    RETURNING account_id, kind, amount, created_at, model, key_id, end_user, tags, drawn, saved,
        prompt_tokens, completion_tokens
), deltas AS (
    INSERT INTO ledger_balance_deltas (account_id, delta)
    SELECT account_id, sum(amount) FROM inserted GROUP BY account_id HAVING sum(amount) <> 0
), draws AS (
    INSERT INTO grant_draws (account_id, grant_id, amount)
    SELECT i.account_id, d.key, sum(d.value::bigint) FROM inserted i, jsonb_each_text(i.drawn) AS d
    GROUP BY i.account_id, d.key
)
INSERT INTO usage_rollup
    (account_id, day, dim, value, requests, charge, saved, prompt_tokens, completion_tokens)
SELECT i.account_id, (i.created_at AT TIME ZONE 'UTC')::date, v.dim, v.value, count(*), sum(-i.amount),
    sum(coalesce(i.saved, 0)), sum(coalesce(i.prompt_tokens, 0)), sum(coalesce(i.completion_tokens, 0))
FROM inserted i CROSS JOIN LATERAL (
    SELECT 'total', '' UNION ALL
    SELECT 'model', i.model WHERE i.model IS NOT NULL UNION ALL
    SELECT 'key', i.key_id WHERE i.key_id IS NOT NULL UNION ALL
    SELECT 'user', i.end_user WHERE i.end_user IS NOT NULL UNION ALL
    SELECT DISTINCT 'tag', t FROM unnest(i.tags) AS t
) AS v (dim, value)
WHERE i.kind = 'usage'
GROUP BY 1, 2, 3, 4
"""
INSERT_USAGE = _USAGE.format("ON CONFLICT (account_id, created_at, idempotency_id) DO NOTHING")
# The same without the skipping, for the common case of a batch none of whose rows is present: a
# duplicate fails the whole statement (nothing written), and the batch is then sent as INSERT_USAGE.
# ON CONFLICT costs Postgres a speculative insertion per row, 15-30% of the insert's time here.
INSERT_NEW_USAGE = _USAGE.format("")

# The deltas folded into accounts.balance, in a transaction of their own. Rows a batch adds meanwhile are
# not in this one's snapshot and wait for the next fold; a fold running elsewhere makes this one a no-op
# (the advisory lock is tried, never waited for).
FOLD_BALANCES = f"""
WITH folding AS (SELECT pg_try_advisory_xact_lock({scoped(LEDGER_FOLD)}) AS mine), moved AS (
    DELETE FROM ledger_balance_deltas WHERE (SELECT mine FROM folding) RETURNING account_id, delta
)
UPDATE accounts AS a SET balance = a.balance + m.delta
FROM (SELECT account_id, sum(delta) AS delta FROM moved GROUP BY account_id) AS m
WHERE a.id = m.account_id
"""

LEDGER_GRANT_FOLD = 0x6372656772  # one fold of the grant draws at a time ("cregr")
LEDGER_COMPACT = 0x637265636F  # one compaction of the roll-ups at a time ("creco")

# The grant draws folded into grants.drawn, like FOLD_BALANCES. A draw on a grant the grants table does not
# hold (one from before grants, say) stays where it is.
FOLD_GRANT_DRAWS = f"""
WITH folding AS (SELECT pg_try_advisory_xact_lock({scoped(LEDGER_GRANT_FOLD)}) AS mine), moved AS (
    DELETE FROM grant_draws AS d WHERE (SELECT mine FROM folding)
        AND EXISTS (SELECT 1 FROM grants g WHERE g.account_id = d.account_id AND g.grant_id = d.grant_id)
    RETURNING account_id, grant_id, amount
)
UPDATE grants AS g SET drawn = g.drawn + m.amount
FROM (SELECT account_id, grant_id, sum(amount) AS amount FROM moved GROUP BY account_id, grant_id) AS m
WHERE g.account_id = m.account_id AND g.grant_id = m.grant_id
"""

# The roll-up rows batches appended (not compacted) merged into one compacted row per (account, day,
# dimension, value), in one statement: a reader's SUM sees either the old rows or the merged one. Rows
# a batch adds meanwhile are not in this statement's snapshot and wait for the next compaction.
COMPACT_ROLLUPS = f"""
WITH compacting AS (SELECT pg_try_advisory_xact_lock({scoped(LEDGER_COMPACT)}) AS mine), moved AS (
    DELETE FROM usage_rollup WHERE NOT compacted AND (SELECT mine FROM compacting)
    RETURNING account_id, day, dim, value, requests, charge, saved, prompt_tokens, completion_tokens
)
INSERT INTO usage_rollup AS u
    (account_id, day, dim, value, requests, charge, saved, prompt_tokens, completion_tokens, compacted)
SELECT account_id, day, dim, value, sum(requests), sum(charge), sum(saved), sum(prompt_tokens),
    sum(completion_tokens), true
FROM moved GROUP BY account_id, day, dim, value
ON CONFLICT (account_id, day, dim, value) WHERE compacted DO UPDATE SET
    requests = u.requests + excluded.requests, charge = u.charge + excluded.charge,
    saved = u.saved + excluded.saved, prompt_tokens = u.prompt_tokens + excluded.prompt_tokens,
    completion_tokens = u.completion_tokens + excluded.completion_tokens
"""
