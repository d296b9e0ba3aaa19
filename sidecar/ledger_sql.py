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
LEDGER_FOLD = 0x637265666F  # one fold of the balance deltas at a time ("crefo")

# The fields of a usage batch row, in the order outbox.ledger_row builds them: the composite type
# ledger_usage_row (migration 002) has them in this order. A batch travels as one array of that type (one
# parameter: about a third of the client CPU of one array per column, see README "Flush throughput").
# The three times are epoch milliseconds and become timestamptz in SQL; created_ms (the partition key)
# comes from the outbox entry itself, so a redelivered entry is the same (account, created_at, request
# id) and inserts nothing.
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
)
_STORED = BATCH_FIELDS[:-3]
_MS = "timestamptz 'epoch' + b.{} * interval '1 millisecond'"

_ROWS = f"""
    INSERT INTO ledger ({", ".join(_STORED)}, started_at, settled_at, created_at)
    SELECT {", ".join(f"b.{c}" for c in _STORED)},
        {", ".join(_MS.format(f"{c}_ms") for c in ("started", "settled", "created"))}
    FROM unnest($1::ledger_usage_row[]) AS b"""

# The batch's rows inserted and nothing else (no barrier, no dedup, no balances): the limit
# bench/flush_throughput.py measures the flusher against.
BARE_INSERT = _ROWS

# One statement, one round trip. Rows already present are skipped, and the balances move by exactly what
# was inserted: as one delta row per account, appended (concurrent batches never wait for each other on
# an account's row, as they did when this statement updated accounts.balance: they serialised, and
# deadlocked), and folded into accounts.balance by FOLD_BALANCES.
_USAGE = f"""
WITH barrier AS (SELECT pg_advisory_xact_lock_shared({LEDGER_BARRIER})), inserted AS ({_ROWS}, barrier
    {{}}
    RETURNING account_id, amount
)
INSERT INTO ledger_balance_deltas (account_id, delta)
SELECT account_id, sum(amount) FROM inserted GROUP BY account_id HAVING sum(amount) <> 0
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
WITH folding AS (SELECT pg_try_advisory_xact_lock({LEDGER_FOLD}) AS mine), moved AS (
    DELETE FROM ledger_balance_deltas WHERE (SELECT mine FROM folding) RETURNING account_id, delta
)
UPDATE accounts AS a SET balance = a.balance + m.delta
FROM (SELECT account_id, sum(delta) AS delta FROM moved GROUP BY account_id) AS m
WHERE a.id = m.account_id
"""
