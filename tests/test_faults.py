"""Faults between creditgate and its two servers, injected by TCP proxies the tests drive: with retries
on, no money moves twice, nothing settled is lost beyond what the persistence mode allows, and reconcile
reports what was lost.

Redis (tests/support_faults.py): a reply arriving after ``redis_timeout_seconds``, a reply cut in the
middle, connects refused (the proxy stops listening) and then accepted again, and NOSCRIPT after
``SCRIPT FLUSH`` and after a restart; then a private redis-server killed and restarted from an older RDB
snapshot (the writes after it lost). The proxy sits in front of one Redis node: on a Redis Cluster the
client follows the slot map to the nodes' own addresses, so these run on one Redis only, except the
``SCRIPT FLUSH`` case, which needs no proxy and runs on the cluster too.

Postgres (tests/support_pg_faults.py): the reply to the flusher's batch commit lost (the batch committed),
every reply held back (asyncpg has no timeout of its own on the ledger pool: the flusher just waits),
connects refused, and a connection cut in the middle of a grant. Postgres faults do not depend on the
Redis topology: one Redis only.

Every fault is armed by the test on a predicate over the commands or statements; the tests wait for
conditions, never for time.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from sidecar.app import FLUSHER, PROXY, create_app
from sidecar.outbox import UsageEvent
from sidecar.pipeline.retry import Retry
from sidecar.reconcile import complete_money_in, reconcile
from sidecar.repair import repair

from .conftest import Sidecar, Upstream, make_settings
from .support import HELLO, MODELS, held_upstream, pooled, post, usage_rows
from .support_cluster import LocalCluster
from .support_faults import Command, RedisFaultProxy, fault_proxy, script
from .support_pg_faults import PgFaultProxy, commit_of, pg_fault_proxy, statement
from .support_redis import OwnRedis, own_redis

CHARGE = pooled(5 * 1000 + 16 * 2000)  # the demo's 5 prompt and 16 completion tokens
CHAT = "/v1/chat/completions"
FAST = 0.3  # redis_timeout_seconds: how soon a late or lost reply is given up on
BATCH = statement("INSERT INTO ledger_balance_deltas")  # a usage batch (both forms of the statement)
Factory = Callable[..., Awaitable[Sidecar]]


@pytest.fixture
def sidecar_on(database_url: str, upstream: Upstream, aiohttp_client: Any) -> Factory:
    """A sidecar on the given Redis URL (and Postgres DSN, default the test's schema); no response cache
    (every request reserves and settles), no periodic reconcile (the tests run it)."""

    async def factory(redis_url: str, dsn: str = database_url, **overrides: Any) -> Sidecar:
        raw = {
            "upstream_url": upstream.url,
            "redis_timeout_seconds": FAST,
            "models": MODELS,
            "cache_enabled": False,
            "reconcile_interval_seconds": 0,
            **overrides,
        }
        settings = make_settings(redis_url, dsn, **raw)
        return Sidecar(await aiohttp_client(create_app(settings)), settings)

    return factory


@pytest.fixture
async def faults(redis_url: str) -> AsyncIterator[RedisFaultProxy]:
    async with fault_proxy(redis_url) as proxy:
        yield proxy


@pytest.fixture
def own(tmp_path: Path) -> Iterator[OwnRedis]:
    """A redis-server of this test's own (RDB only, written by an explicit SAVE), to flush and kill."""
    with own_redis(tmp_path) as server:
        yield server


@pytest.fixture
async def pg(database_url: str) -> AsyncIterator[PgFaultProxy]:
    async with pg_fault_proxy(database_url) as proxy:
        yield proxy


async def until(condition: Callable[[], bool], what: str) -> None:
    """Poll `condition` (state of this process, with no event to wait on) with a 30 s deadline."""
    deadline = time.monotonic() + 30
    while not condition():
        assert time.monotonic() < deadline, f"never happened: {what}"
        await asyncio.sleep(0.02)


async def chat(sc: Sidecar, key: str) -> str:
    """One request, answered and charged CHARGE; returns its request id."""
    resp = await post(sc, CHAT, {"model": "test-model", "messages": HELLO}, key)
    assert resp.status == 200, await resp.text()
    assert resp.headers["x-creditgate-charged"] == str(CHARGE)
    return resp.headers["x-request-id"]


async def settled_once(sc: Sidecar, account: str, granted: int, requests: int = 1) -> None:
    """Redis debited each request once and holds nothing; the ledger has one usage row per request."""
    state = await sc.balance(account)
    assert (state["balance"], state["held"], state["holds"]) == (granted - requests * CHARGE, 0, [])
    async with asyncio.timeout(30):
        await sc.client.app[FLUSHER].wait_for_rows(requests)
    rows = await usage_rows(sc, account)
    assert sorted(r["amount"] for r in rows) == [-CHARGE] * requests
    assert len({r["idempotency_id"] for r in rows}) == requests


# ---- Redis: late replies, cut replies, refused connects ----------------------------------------------


@pytest.mark.parametrize("step", ["reserve", "settle"])
async def test_a_money_reply_arriving_after_the_timeout_is_retried_and_charged_once(
    faults: RedisFaultProxy, sidecar_on: Factory, step: str
) -> None:
    sc = await sidecar_on(faults.url)
    account, key = await sc.account(10_000_000)
    sent = script(getattr(sc.balances, f"_{step}").sha)
    faults.delay_replies(1, sent)
    await chat(sc, key)
    await faults.wait_for(lambda: len(faults.late) == 1)  # the reply came, after the client had left
    assert faults.count(sent) == 2  # ran twice in Redis, moved money once
    await settled_once(sc, account, 10_000_000)


async def test_a_credit_reply_arriving_after_the_timeout_credits_once(
    faults: RedisFaultProxy, sidecar_on: Factory
) -> None:
    sc = await sidecar_on(faults.url)
    account, _ = await sc.account(0)
    credit = script(sc.balances._credit.sha)
    faults.delay_replies(1, credit)
    await sc.admin(
        "POST", f"/accounts/{account}/grants", {"amount": 700}, **{"Idempotency-Key": uuid.uuid4().hex}
    )
    await faults.wait_for(lambda: len(faults.late) == 1)
    assert faults.count(credit) == 2
    assert (await sc.balance(account))["balance"] == 700
    rows = await sc.services.store.pool.fetch(
        "SELECT amount, applied FROM ledger WHERE account_id = $1", account
    )
    assert [(r["amount"], r["applied"]) for r in rows] == [(700, True)]


async def test_replies_cut_in_the_middle_are_retried_and_charged_once(
    faults: RedisFaultProxy, sidecar_on: Factory
) -> None:
    sc = await sidecar_on(faults.url)
    account, key = await sc.account(10_000_000)
    reserve, settle = script(sc.balances._reserve.sha), script(sc.balances._settle.sha)
    faults.cut_mid_reply(1, reserve)
    faults.cut_mid_reply(1, settle)
    await chat(sc, key)
    assert [cmd[1].decode() for cmd in faults.halved] == [sc.balances._reserve.sha, sc.balances._settle.sha]
    assert (faults.count(reserve), faults.count(settle)) == (2, 2)
    await settled_once(sc, account, 10_000_000)


async def test_while_redis_refuses_connects_a_request_gets_503_and_holds_nothing_then_recovers(
    faults: RedisFaultProxy, sidecar_on: Factory
) -> None:
    sc = await sidecar_on(faults.url, reserve_retry_seconds=0.5)
    account, key = await sc.account(10_000_000)
    await faults.refuse()
    resp = await post(sc, CHAT, {"model": "test-model", "messages": HELLO}, key)
    assert resp.status == 503
    await faults.accept()
    state = await sc.balance(account)
    assert (state["balance"], state["held"], state["holds"]) == (10_000_000, 0, [])
    await chat(sc, key)
    await settled_once(sc, account, 10_000_000)


async def test_a_settle_while_redis_refuses_connects_waits_and_is_settled_once_when_it_returns(
    faults: RedisFaultProxy, sidecar_on: Factory, aiohttp_server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    app, arrived, release = held_upstream()
    server = await aiohttp_server(app)
    sc = await sidecar_on(faults.url, upstream_url=str(server.make_url("/v1")))
    gateway = sc.client.app[PROXY]
    monkeypatch.setattr(gateway.settler, "retry", Retry((0.01, 0.01)))  # ride out less than ~6 s
    account, key = await sc.account(10_000_000)
    answer = asyncio.create_task(post(sc, CHAT, {"model": "test-model", "messages": HELLO}, key))
    await arrived.wait()  # held: its hold is taken
    await faults.refuse()
    release.set()
    resp = await answer
    assert resp.status == 200  # the answer is served; its settlement waits
    assert list(gateway.pending.pending) == [resp.headers["x-request-id"]]
    await faults.accept()
    await gateway.pending.retry()  # what the settlement-retry task does every 5 s
    assert not gateway.pending.pending
    await settled_once(sc, account, 10_000_000)


# ---- Redis: NOSCRIPT, on the request path ------------------------------------------------------------


def runs(sent: list[Command], name: str, first: str | bytes) -> int:
    return sum(1 for cmd in sent if cmd[0].upper() == name.encode() and cmd[1] == _bytes(first))


def _bytes(value: str | bytes) -> bytes:
    return value if isinstance(value, bytes) else value.encode()


@pytest.mark.parametrize("lost", ["script-flush", "restart"])
async def test_a_lost_script_cache_is_reloaded_once_by_reserve_and_settle(
    own: OwnRedis, sidecar_on: Factory, lost: str
) -> None:
    async with fault_proxy(own.url) as proxy:  # only to count what is sent
        sc = await sidecar_on(proxy.url)
        account, key = await sc.account(10_000_000)
        direct = redis.Redis.from_url(own.url)
        if lost == "script-flush":
            direct.script_flush()
        else:  # restarted with its data (an RDB snapshot) but, as always, no scripts
            direct.save()
            before = set(proxy.links)
            own.kill()
            own.start()
            await proxy.wait_for(lambda: not before & proxy.links)
        direct.close()
        first = len(proxy.seen)
        await chat(sc, key)
        await chat(sc, key)
        sent = proxy.seen[first:]
        for name in ("_reserve", "_settle"):
            s = getattr(sc.balances, name)
            # NOSCRIPT once: then EVAL (which caches it again), and EVALSHA finds it from then on
            assert (runs(sent, "EVALSHA", s.sha), runs(sent, "EVAL", s.script)) == (2, 1), name
        await settled_once(sc, account, 10_000_000, requests=2)


async def test_script_flush_on_the_cluster_reserve_and_settle_reload_and_charge_once(
    redis_cluster: LocalCluster, sidecar_on: Factory
) -> None:
    """The cluster's pipeline per node falls back to EVAL on NOSCRIPT as the one-node one does (no proxy
    here: the client talks to each node's own address)."""
    sc = await sidecar_on(redis_cluster.url)
    account, key = await sc.account(10_000_000)
    for url in redis_cluster.node_urls:
        node = redis.Redis.from_url(url)
        node.script_flush()
        node.close()
    assert not await sc.balances.scripts_loaded()
    await chat(sc, key)
    await chat(sc, key)
    await settled_once(sc, account, 10_000_000, requests=2)


# ---- Redis: a restart that loses the writes since its last snapshot ----------------------------------


async def test_a_redis_restart_from_an_older_snapshot_loses_what_the_readme_says_and_no_more(
    own: OwnRedis, sidecar_on: Factory
) -> None:
    """README, "Eviction, persistence": RDB only (or AOF with ``appendfsync no``, whose loss needs the
    OS to crash, not just Redis: an RDB snapshot stands in for it here). After the restart: a debit
    already flushed is in the ledger and no longer in Redis (reconcile reports it), and its settle retried
    charges Redis once again and the ledger not at all; an outbox entry flushed after the snapshot comes
    back (the ledger has it: no drift, and written again it is skipped); a debit not flushed is lost from
    both (reconcile cannot see it) and its hold is back until the reaper releases it; a hold taken after
    the snapshot is gone; a grant's Redis step lost before its ledger row was marked applied is completed
    by complete_money_in, once; one lost after: complete_money_in and a retried grant leave it,
    reconcile reports it and repair credits it, once."""
    sc = await sidecar_on(own.url, flusher_enabled=False)
    svc, b = sc.services, sc.balances
    flushed, unflushed, granted, half = [(await sc.account(1_000_000))[0] for _ in range(4)]
    lease = int(time.time() * 1000) + 3_600_000
    await b.reserve(unflushed, "req_back", 300_000, lease)
    before = UsageEvent(started_ms=lease - 3_600_000, settled_ms=lease - 3_600_000)
    await b.reserve(flushed, "req_before", 150_000, lease)
    await b.settle(flushed, "req_before", 100_000, before)  # in the snapshot's outbox, flushed after it
    sync = redis.Redis.from_url(own.url)
    sync.save()  # ---- the snapshot; everything below is lost with the restart ----
    now = int(time.time() * 1000)
    event, window = UsageEvent(started_ms=now, settled_ms=now), b.window_end(now)
    await b.reserve(flushed, "req_flushed", 300_000, lease)
    assert (await b.settle(flushed, "req_flushed", 200_000, event, window_end_ms=window)).first
    assert await svc.flusher().drain() == 2  # both in the ledger (and deleted from Redis) before the crash
    await b.settle(unflushed, "req_back", 250_000, event, window_end_ms=window)  # still in the outbox
    grant_key = uuid.uuid4().hex
    await sc.admin("POST", f"/accounts/{granted}/grants", {"amount": 700}, **{"Idempotency-Key": grant_key})
    await b.reserve(flushed, "req_gone", 100_000, lease)
    # a grant stopped between its two steps: ledger row written, Redis credited, not yet marked applied
    await svc.store.record_money_in("in:half", half, "grant", 500, None)
    assert await b.credit(half, "in:half", 500) == (True, 1_000_500)
    sync.close()
    own.kill()
    own.start()

    async def redis_view(account: str) -> tuple[int, int, list[str]]:
        state = await sc.balance(account)
        return state["balance"], state["held"], [h["request_id"] for h in state["holds"]]

    assert await redis_view(flushed) == (900_000, 0, [])  # the later debit and both later holds: gone
    assert await redis_view(unflushed) == (1_000_000, 300_000, ["req_back"])  # the hold is back
    assert await redis_view(granted) == (1_000_000, 0, [])
    assert await redis_view(half) == (1_000_000, 0, [])
    assert [await svc.store.ledger_sum(a) for a in (flushed, unflushed, granted, half)] == [
        700_000,
        1_000_000,
        1_000_700,
        1_000_500,
    ]
    drifts = {d.account: d.amount for d in await reconcile(svc.redis, svc.keys, svc.store)}
    # req_before's entry is back in the outbox, but the ledger has it: not counted as waiting. The
    # unflushed debit is invisible: in neither.
    assert drifts == {flushed: 200_000, granted: -700}

    # No double effect on retry: the settle sent again (its marker was lost) debits this Redis once, and
    # its entry, the same event, is the same ledger row: skipped.
    again = await b.settle(flushed, "req_flushed", 200_000, event, window_end_ms=window)
    assert (again.first, again.balance) == (True, 700_000)
    assert not (await b.settle(flushed, "req_flushed", 200_000, event, window_end_ms=window)).first
    await svc.flusher().drain()
    ids = await svc.store.pool.fetch("SELECT idempotency_id FROM ledger WHERE kind = 'usage'")
    assert sorted(r["idempotency_id"] for r in ids) == ["req_before", "req_flushed"]  # each once
    assert await svc.store.ledger_sum(flushed) == 700_000

    # The hold that came back is released by the reaper once its lease ends; its charge is lost.
    assert await b.expire_holds(lease + 1) == 300_000
    assert await redis_view(unflushed) == (1_000_000, 0, [])

    # The half-done grant: completed by the reconciler, once. The whole one: its row is applied, so
    # neither the reconciler's completion nor a retry credits it.
    assert await complete_money_in(svc.store, b) == 1
    assert await complete_money_in(svc.store, b) == 0
    assert await redis_view(half) == (1_000_500, 0, [])
    retried = await sc.admin(
        "POST", f"/accounts/{granted}/grants", {"amount": 700}, **{"Idempotency-Key": grant_key}
    )
    assert (retried["credited"], retried["balance"]) == (False, 1_000_000)
    repaired = await repair(svc.redis, svc.keys, svc.store, b)
    assert {d.account: d.amount for d in repaired} == {granted: -700}
    assert await reconcile(svc.redis, svc.keys, svc.store) == []
    for account in (flushed, unflushed, granted, half):
        assert (await sc.balance(account))["balance"] == await svc.store.ledger_sum(account)


# ---- Postgres ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("lost", ["the batch", "the fold after it"])
async def test_a_batch_whose_commit_reply_is_lost_is_retried_and_written_once(
    redis_url: str, pg: PgFaultProxy, sidecar_on: Factory, lost: str
) -> None:
    """The batch's statement commits and its answer is lost; or the batch's answer arrives and the fold
    of the balance deltas that follows it (in the same write) commits and loses its answer. Either way
    the write fails after the batch committed, and the batch is sent again."""
    sc = await sidecar_on(redis_url, pg.dsn)
    account, key = await sc.account(10_000_000)
    pg.lose_replies(1, BATCH if lost == "the batch" else statement("DELETE FROM ledger_balance_deltas"))
    await chat(sc, key)
    await settled_once(sc, account, 10_000_000)
    flusher = sc.client.app[FLUSHER]
    assert (len(pg.lost), flusher.stats.failures) == (1, 1)
    batches = [st.sql for st in pg.seen if BATCH(st)]
    # lost (committed); sent again: the duplicate fails it whole; then the form that skips duplicates
    assert ["ON CONFLICT" in sql for sql in batches] == [False, False, True]
    svc = sc.services
    assert await svc.store.ledger_sum(account) == 10_000_000 - CHARGE
    assert await reconcile(svc.redis, svc.keys, svc.store) == []  # the balance delta counted once


async def test_postgres_answering_late_holds_back_no_request_and_the_batches_are_written_once(
    redis_url: str, pg: PgFaultProxy, sidecar_on: Factory
) -> None:
    sc = await sidecar_on(redis_url, pg.dsn)
    account, key = await sc.account(10_000_000)
    flusher = sc.client.app[FLUSHER]
    pg.hold_replies()
    for _ in range(3):  # the request path never waits for Postgres
        await chat(sc, key)
    state = await sc.balance(account)
    assert (state["balance"], state["held"]) == (10_000_000 - 3 * CHARGE, 0)
    # a batch statement reached Postgres (prepared, or run), its answer held
    await pg.wait_for(lambda: any("INSERT INTO ledger_balance_deltas" in sql for sql in pg.sent))
    assert (flusher.stats.rows, (await flusher.backlog())[0]) == (0, 3)
    pg.release_replies()
    await settled_once(sc, account, 10_000_000, requests=3)
    assert flusher.stats.failures == 0


async def test_postgres_down_requests_are_served_the_backlog_waits_and_drains_when_it_returns(
    redis_url: str, pg: PgFaultProxy, sidecar_on: Factory
) -> None:
    sc = await sidecar_on(redis_url, pg.dsn)
    account, key = await sc.account(10_000_000)
    flusher = sc.client.app[FLUSHER]
    await pg.refuse()
    for _ in range(3):
        await chat(sc, key)
    state = await sc.balance(account)
    assert (state["balance"], state["held"]) == (10_000_000 - 3 * CHARGE, 0)
    await until(lambda: flusher.stats.failures >= 1, "the flusher tried and failed")
    assert (flusher.stats.rows, (await flusher.backlog())[0]) == (0, 3)
    await pg.accept()
    await settled_once(sc, account, 10_000_000, requests=3)
    assert (await flusher.backlog())[0] == 0
    svc = sc.services
    assert await reconcile(svc.redis, svc.keys, svc.store) == []


MONEY_IN_ROW = "INSERT INTO ledger (idempotency_id, account_id, kind, amount, applied"


@pytest.mark.parametrize(
    ("fault", "redis_after_first", "created_by_retry"),
    [
        ("cut before its ledger row", 0, True),  # rolled back: the retry writes the row
        ("ledger row committed, reply lost", 0, False),  # the retry finds the row, credits Redis
        ("applied mark committed, reply lost", 700, False),  # Redis credited: the retry does nothing
    ],
)
async def test_a_grant_cut_off_from_postgres_and_retried_with_its_key_credits_once(
    redis_url: str,
    pg: PgFaultProxy,
    sidecar_on: Factory,
    fault: str,
    redis_after_first: int,
    created_by_retry: bool,
) -> None:
    sc = await sidecar_on(redis_url, pg.dsn, flusher_enabled=False)
    account, _ = await sc.account(0)
    if fault.startswith("cut"):
        pg.cut_before_statement(1, statement(MONEY_IN_ROW))
    elif fault.startswith("ledger"):
        pg.lose_replies(1, commit_of("INSERT INTO money_in_keys"))
    else:
        pg.lose_replies(1, commit_of("SET applied = true"))
    headers = sc.admin_headers(**{"Idempotency-Key": uuid.uuid4().hex})
    path = f"/admin/accounts/{account}/grants"
    first = await sc.client.post(path, json={"amount": 700}, headers=headers)
    assert first.status >= 500, await first.text()
    assert len(pg.cut_before) + len(pg.lost) == 1
    assert (await sc.balance(account))["balance"] == redis_after_first
    again = await sc.client.post(path, json={"amount": 700}, headers=headers)
    body = await again.json()
    assert again.status == 200, body
    assert (body["credited"], body["balance"]) == (created_by_retry, 700)
    svc = sc.services
    rows = await svc.store.pool.fetch("SELECT amount, applied FROM ledger WHERE account_id = $1", account)
    assert [(r["amount"], r["applied"]) for r in rows] == [(700, True)]
    assert await svc.store.pool.fetchval("SELECT count(*) FROM money_in_keys WHERE account_id = $1", account)
    assert await reconcile(svc.redis, svc.keys, svc.store) == []
