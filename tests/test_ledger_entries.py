"""The flusher's wallet entries: usage rows with their key, end user, tags and the grants they drew from;
expiry and payoff entries; grant_draws and usage_rollup rows in the batch's transaction, exactly once;
the folds of grant draws and the roll-ups' compaction. Entries are XADDed by hand in the formats of
sidecar/outbox.py (the settle and credit scripts write the same)."""

from __future__ import annotations

import datetime as dt
import random
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import msgspec
import pytest

from sidecar.outbox import UsageEvent, encode_event, ledger_row
from sidecar.rebuild import rebuild_if_empty
from sidecar.reconcile import reconcile
from sidecar.services import Services, services
from sidecar.wallet import GrantTerms, WalletPolicy

from .conftest import make_settings

pytestmark = pytest.mark.topologies  # money: on one Redis and on the cluster

LEASE = 4_000_000_000_000
AT = 1_796_000_000_000  # 2026-11-30T01:33Z (this month's partition, or the one before)
AT_DAY = dt.date(2026, 11, 30)


@pytest.fixture
async def svc(redis_url: str, database_url: str) -> AsyncIterator[Services]:
    settings = make_settings(redis_url, database_url, partitions=4, flush_claim_idle_seconds=0)
    async with services(settings) as ready:
        yield ready


async def funded(svc: Services, credits: int = 1_000_000, grant: str = "g1") -> str:
    account: str = (await svc.admin.create_account())["id"]
    await svc.admin.grant(account, credits, grant, "purchase")
    return account


async def xadd(svc: Services, account: str, **fields: Any) -> None:
    stream = svc.keys.outbox(svc.keys.partition_of(account))
    await svc.redis.xadd(stream, {k: v if isinstance(v, bytes | str) else msgspec.json.encode(v)
                                  for k, v in fields.items()})  # fmt: skip


def usage(account: str, request_id: str, charge: int, ms: int = AT, **attrs: Any) -> bytes:
    event = UsageEvent(request_id=request_id, account=account, charge=charge, settled_ms=ms, **attrs)
    return encode_event(event)


def move(account: str, grant: str, amount: int, at: int = AT) -> dict[str, str]:
    return {"account": account, "grant": grant, "amount": str(amount), "at": str(at)}


async def rows(svc: Services, sql: str, *args: Any) -> list[dict[str, Any]]:
    return [dict(r) for r in await svc.store.pool.fetch(sql, *args)]


async def rollups(svc: Services, account: str) -> dict[tuple[Any, ...], tuple[int, ...]]:
    found = await svc.store.pool.fetch(
        "SELECT day, dim, value, sum(requests)::bigint r, sum(charge)::bigint c, sum(saved)::bigint s,"
        " sum(prompt_tokens)::bigint p, sum(completion_tokens)::bigint o FROM usage_rollup"
        " WHERE account_id = $1 GROUP BY 1, 2, 3",
        account,
    )
    return {(r["day"], r["dim"], r["value"]): (r["r"], r["c"], r["s"], r["p"], r["o"]) for r in found}


async def draws(svc: Services, account: str) -> dict[str, int]:
    """What was drawn from each grant: folded into grants.drawn, or still in grant_draws."""
    found = await svc.store.pool.fetch(
        "SELECT grant_id, sum(a) AS a FROM (SELECT grant_id, amount AS a FROM grant_draws"
        " WHERE account_id = $1 UNION ALL SELECT grant_id, drawn FROM grants WHERE account_id = $1) d"
        " GROUP BY 1 HAVING sum(a) <> 0",
        account,
    )
    return {r["grant_id"]: int(r["a"]) for r in found}


async def test_a_usage_row_carries_its_key_user_tags_and_draws(svc: Services) -> None:
    account = await funded(svc)
    event = usage(account, "req_1", 700, model="m1", key_id="key_a", user="alice", tags=["job=x", "t=y"],
                  prompt_tokens=10, completion_tokens=20, saved=5)  # fmt: skip
    await xadd(svc, account, d=event, g=[["g1", "600"]])
    assert await svc.flusher().drain() == 1
    (row,) = await rows(svc, "SELECT * FROM ledger WHERE kind = 'usage'")
    assert (row["key_id"], row["end_user"], row["tags"]) == ("key_a", "alice", ["job=x", "t=y"])
    assert msgspec.json.decode(row["drawn"]) == {"g1": 600}
    assert await draws(svc, account) == {"g1": 600}
    day = AT_DAY
    each = (1, 700, 5, 10, 20)
    assert await rollups(svc, account) == {
        (day, "total", ""): each,
        (day, "model", "m1"): each,
        (day, "key", "key_a"): each,
        (day, "user", "alice"): each,
        (day, "tag", "job=x"): each,
        (day, "tag", "t=y"): each,
    }


async def test_a_real_settle_records_the_grants_it_drew_from(svc: Services) -> None:
    account = await funded(svc, 1_000, "g1")
    await svc.admin.grant(account, 1_000, "g2", "bonus")  # drawn first: free credits, lower priority
    await svc.balances.reserve(account, "req_r", 2_000, LEASE)
    await svc.balances.settle(account, "req_r", 1_500, UsageEvent(model="m", key_id="k", user="u"))
    await svc.flusher().drain()
    (row,) = await rows(svc, "SELECT * FROM ledger WHERE kind = 'usage'")
    assert msgspec.json.decode(row["drawn"]) == {"g2": 1_000, "g1": 500}
    assert (row["key_id"], row["end_user"]) == ("k", "u")
    assert await draws(svc, account) == {"g1": 500, "g2": 1_000}


async def test_expiry_and_payoff_entries(svc: Services) -> None:
    account = await funded(svc)
    await xadd(svc, account, x=move(account, "g1", 250))
    await xadd(svc, account, p=move(account, "g1", 40, AT + 1))
    assert await svc.flusher().drain() == 2
    found = await rows(
        svc, "SELECT idempotency_id, kind, amount, created_at, drawn FROM ledger WHERE account_id = $1"
        " AND kind IN ('expiry', 'adjustment') ORDER BY created_at", account,
    )  # fmt: skip
    assert [(r["idempotency_id"], r["kind"], r["amount"]) for r in found] == [
        (f"expiry:{account}:g1", "expiry", -250),
        (f"payoff:{account}:g1", "adjustment", 0),
    ]
    assert found[0]["created_at"] == dt.datetime.fromtimestamp(AT / 1000, dt.UTC)
    assert await draws(svc, account) == {"g1": 290}
    assert await svc.store.ledger_sum(account) == 1_000_000 - 250
    assert await rollups(svc, account) == {}  # no usage


async def test_a_replayed_batch_writes_nothing_twice(svc: Services) -> None:
    account = await funded(svc)
    await xadd(svc, account, d=usage(account, "req_1", 100, model="m", tags=["a"]), g=[["g1", "100"]])
    await xadd(svc, account, d=usage(account, "req_2", 50, user="u"))
    await xadd(svc, account, x=move(account, "g1", 30))
    await xadd(svc, account, p=move(account, "g1", 7))
    flusher = svc.flusher()
    batch = await flusher.collect()
    assert batch.size == 4
    await svc.store.insert_usage([ledger_row(f, i) for entries in batch.entries.values() for i, f in entries])
    before = (await rollups(svc, account), await draws(svc, account), await svc.store.ledger_sum(account))
    await flusher.write(batch)  # the same rows again, as after a crash between commit and ack
    await xadd(svc, account, x=move(account, "g1", 30))  # and an expiry sent twice
    await flusher.drain()
    after = (await rollups(svc, account), await draws(svc, account), await svc.store.ledger_sum(account))
    assert after == before
    assert before[1] == {"g1": 137}
    assert before[2] == 1_000_000 - 180
    assert len(await rows(svc, "SELECT 1 FROM ledger WHERE account_id = $1", account)) == 5  # + money in


async def test_grant_draws_fold_into_grants(svc: Services) -> None:
    account = await funded(svc)
    svc.store._next_fold = float("inf")  # no fold after the batch: this test folds
    await xadd(svc, account, d=usage(account, "req_1", 100), g=[["g1", "100"]])
    await xadd(svc, account, x=move(account, "g1", 300))
    await xadd(svc, account, d=usage(account, "req_2", 5), g=[["gone", "5"]])  # a grant Postgres lacks
    await svc.flusher().drain()
    pool = svc.store.pool
    n = await pool.fetchval("SELECT count(*) FROM grant_draws WHERE account_id = $1", account)
    assert n == 2  # one row per grant per batch
    async with pool.acquire() as conn:
        before = await svc.store.grant_remainders(conn)
        await svc.store.fold_grant_draws()
        after = await svc.store.grant_remainders(conn)
    assert before == after
    assert [g.remaining for g in after[account]] == [1_000_000 - 400]
    assert await pool.fetchval("SELECT drawn FROM grants WHERE account_id = $1", account) == 400
    left = await rows(svc, "SELECT grant_id, amount FROM grant_draws WHERE account_id = $1", account)
    assert left == [{"grant_id": "gone", "amount": 5}]  # kept, not lost


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"x": {"account": "A", "grant": "g", "amount": "12.5", "at": "1"}}, "x amount"),
        ({"x": {"account": "A", "grant": "g", "amount": "1", "at": "1", "left": "-2"}}, "x left"),
        ({"p": {"account": "A", "grant": "", "amount": "1", "at": "1"}}, "without an account or grant"),
        ({"x": b"{nope"}, "x undecodable"),
        ({"d": "USAGE", "g": [["g1", "-3"]]}, "g amount"),
        ({"d": "USAGE", "g": [["g1", "600"]]}, "more than the charge"),
        ({"d": "USAGE", "g": b"[1]"}, "g undecodable"),
    ],
)
async def test_bad_wallet_entries_become_dead_letters(svc: Services, fields: Any, reason: str) -> None:
    account = await funded(svc)
    fields = {k: usage(account, "req_bad", 500) if v == "USAGE" else v for k, v in fields.items()}
    await xadd(svc, account, d=usage(account, "req_ok", 1))
    await xadd(svc, account, **fields)
    flusher = svc.flusher()
    await flusher.drain()
    total, letters = await flusher.dead_letters()
    assert total == 1
    assert reason in letters[0]["reason"]
    assert len(await rows(svc, "SELECT 1 FROM ledger WHERE kind <> 'purchase'")) == 1  # the good one
    assert await draws(svc, account) == {}


@pytest.mark.parametrize("seed", [1, 2])
async def test_rollups_equal_a_full_scan(svc: Services, seed: int) -> None:
    """A few hundred random usage rows over days, models, keys, users and tags, flushed in small batches
    (some entries twice), compacted half-way: the roll-ups' sums equal a GROUP BY over the ledger."""
    rng = random.Random(seed)
    accounts = [await funded(svc) for _ in range(2)]
    flusher = svc.flusher()
    flusher.batch_size = 17
    sent = []
    for n in range(300):
        account = rng.choice(accounts)
        attrs: dict[str, Any] = {
            "model": rng.choice(["m1", "m2", None]),
            "key_id": rng.choice(["k1", "k2", None]),
            "user": rng.choice(["u1", "u2", "u3", None]),
            "tags": rng.choice([None, [], ["a=1"], ["a=1", "b=2"], ["b=2", "b=2"]]),
            "saved": rng.choice([None, 0, 9]),
            "prompt_tokens": rng.randrange(100),
            "completion_tokens": rng.choice([None, rng.randrange(100)]),
        }
        ms = AT + rng.randrange(4) * 86_400_000 + rng.randrange(86_400_000)
        entry = usage(account, f"req_{n}", rng.randrange(1000), ms, **attrs)
        sent.append(entry)
        await xadd(svc, account, d=entry)
        if rng.random() < 0.1:
            await xadd(svc, account, d=rng.choice(sent))  # a redelivery
        if n == 150:
            await flusher.drain()
            await svc.store.compact_rollups()
    await flusher.drain()
    assert await svc.store.pool.fetchval("SELECT count(*) FROM ledger WHERE kind = 'usage'") == 300
    for account in accounts:
        assert await rollups(svc, account) == await full_scan(svc, account)
    await svc.store.compact_rollups()
    merged = await svc.store.pool.fetchval(
        "SELECT count(*) FROM usage_rollup WHERE NOT compacted OR (account_id, day, dim, value) IN"
        " (SELECT account_id, day, dim, value FROM usage_rollup GROUP BY 1, 2, 3, 4 HAVING count(*) > 1)"
    )
    assert merged == 0
    for account in accounts:
        assert await rollups(svc, account) == await full_scan(svc, account)


async def full_scan(svc: Services, account: str) -> dict[tuple[Any, ...], tuple[int, ...]]:
    found = await rows(svc, "SELECT * FROM ledger WHERE account_id = $1 AND kind = 'usage'", account)
    sums: dict[tuple[Any, ...], Counter[str]] = {}
    for r in found:
        day = r["created_at"].astimezone(dt.UTC).date()
        groups = [("total", ""), ("model", r["model"]), ("key", r["key_id"]), ("user", r["end_user"])]
        groups += [("tag", t) for t in set(r["tags"] or [])]
        for dim, val in groups:
            if val is None:
                continue
            c = sums.setdefault((day, dim, val), Counter())
            c.update(r=1, c=-r["amount"], s=r["saved"] or 0, p=r["prompt_tokens"] or 0,
                     o=r["completion_tokens"] or 0)  # fmt: skip
    return {k: (c["r"], c["c"], c["s"], c["p"], c["o"]) for k, c in sums.items()}


async def test_the_scripts_expiry_and_payoff_entries_reach_the_ledger(svc: Services) -> None:
    """The entries the credit and expiry scripts append themselves (not by hand) become the same rows."""
    now = [int(dt.datetime.now(dt.UTC).timestamp() * 1000)]
    svc.balances.wallet = WalletPolicy(svc.balances.wallet.idle_expiry_ms, lambda: now[0])
    account: str = (await svc.admin.create_account())["id"]
    ends = now[0] + 60_000
    terms = GrantTerms(kind="promotion", expires_ms=ends)
    await svc.admin.grant(account, 1_000, "promo", "promotion", terms=terms)
    await svc.balances.reserve(account, "req_1", 1_500, LEASE)
    await svc.balances.settle(account, "req_1", 1_400, UsageEvent(model="m"))  # 400 below zero
    await svc.admin.grant(account, 2_000, "buy", "purchase")  # pays the 400 back
    now[0] = ends + 1
    assert await svc.balances.expire_grants() == 0  # the promotion was used up: nothing left to expire
    await svc.admin.grant(
        account, 500, "promo2", "promotion", terms=GrantTerms(kind="promotion", expires_ms=ends + 10)
    )
    now[0] = ends + 20
    assert await svc.balances.expire_grants() == 500
    await svc.flusher().drain()
    found = await rows(svc, "SELECT idempotency_id, kind, amount FROM ledger WHERE account_id = $1"
                       " AND kind IN ('expiry', 'adjustment') ORDER BY kind", account)  # fmt: skip
    assert found == [
        {"idempotency_id": f"payoff:{account}:buy", "kind": "adjustment", "amount": 0},
        {"idempotency_id": f"expiry:{account}:promo2", "kind": "expiry", "amount": -500},
    ]
    assert await draws(svc, account) == {"promo": 1_000, "buy": 400, "promo2": 500}
    assert await svc.store.ledger_sum(account) == (await svc.balances.balance(account)).balance


async def test_an_expiry_in_parts_reaches_the_ledger_once_per_part_across_a_lost_redis(svc: Services) -> None:
    """A grant that ends under a live hold expires in parts (what the hold does not need now, the rest
    once nothing needs it): each part its own row, reconciled while in the outbox, and a Redis lost and
    rebuilt between the parts expires the rest under the final id, once."""
    now = [int(dt.datetime.now(dt.UTC).timestamp() * 1000)]
    svc.balances.wallet = WalletPolicy(svc.balances.wallet.idle_expiry_ms, lambda: now[0])
    account: str = (await svc.admin.create_account())["id"]
    ends = now[0] + 60_000
    await svc.admin.grant(account, 100, "forever", "purchase")
    terms = GrantTerms("promotion", expires_ms=ends)
    await svc.admin.grant(account, 1_000, "promo", "promotion", terms=terms)
    assert (await svc.balances.reserve(account, "req_1", 1_000, LEASE)).status.name == "HELD"
    now[0] = ends + 5
    assert await svc.balances.expire_grants() == 100  # the hold keeps the other 900
    assert await reconcile(svc.redis, svc.keys, svc.store) == []  # the part in the outbox counts
    await svc.flusher().drain()
    assert await reconcile(svc.redis, svc.keys, svc.store) == []
    names = [n async for n in svc.redis.scan_iter(match=f"{svc.keys.prefix}*")]
    await svc.redis.delete(*names)  # the hold with it
    settled_ms = svc.balances.settled_marker_ms
    assert await rebuild_if_empty(svc.redis, svc.keys, svc.store, settled_marker_ms=settled_ms, now_ms=now[0])
    assert (await svc.balances.balance(account)).balance == 1_000
    assert await svc.balances.expire_grants() == 900  # nothing holds: the rest goes
    assert await svc.balances.expire_grants() == 0
    await svc.flusher().drain()
    found = await rows(svc, "SELECT idempotency_id, amount, created_at FROM ledger WHERE account_id = $1"
                       " AND kind = 'expiry' ORDER BY created_at", account)  # fmt: skip
    assert [(r["idempotency_id"], r["amount"]) for r in found] == [
        (f"expiry-part:{account}:promo:900", -100),
        (f"expiry:{account}:promo", -900),
    ]
    assert found[0]["created_at"] == dt.datetime.fromtimestamp(ends / 1000, dt.UTC)  # the grant's end
    assert await draws(svc, account) == {"promo": 1_000}
    assert await svc.store.ledger_sum(account) == (await svc.balances.balance(account)).balance == 100
    assert await reconcile(svc.redis, svc.keys, svc.store) == []
