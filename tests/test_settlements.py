"""Settlements Redis refused for longer than the request path's retries: kept, sent again, debited once."""

from __future__ import annotations

from typing import Any

import asyncpg
import pytest
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError

from sidecar.app import FLUSHER, PROXY
from sidecar.keys import KeySpace
from sidecar.pipeline.retry import Retry

from .conftest import Sidecar, SidecarFactory
from .support import HELLO, MODELS, pooled, post

pytestmark = pytest.mark.topologies  # money: on one Redis and on the cluster

CHARGE = pooled(5 * 1000 + 16 * 2000)  # the demo's answer to HELLO: 5 prompt, 16 completion tokens


@pytest.fixture
async def priced(make_sidecar: SidecarFactory) -> Sidecar:
    sc = await make_sidecar(models=MODELS)
    sc.client.app[PROXY].settler.retry = Retry((0.0,) * 6)  # the same 7 tries, at once
    return sc


@pytest.mark.parametrize("reply_lost", [False, True], ids=["redis-away", "reply-lost"])
async def test_a_settle_redis_refuses_is_kept_and_sent_again_until_taken(
    priced: Sidecar, monkeypatch: pytest.MonkeyPatch, reply_lost: bool
) -> None:
    account, key = await priced.account(10_000_000)
    real_settle = priced.balances.settle
    tries: list[str] = []

    async def refused(*args: Any, **kwargs: Any) -> Any:
        tries.append(args[1])
        if reply_lost:  # Redis ran it, but the answer never came back
            await real_settle(*args, **kwargs)
        raise RedisConnectionError("Redis is away")

    monkeypatch.setattr(priced.balances, "settle", refused)
    resp = await post(priced, "/v1/chat/completions", {"model": "test-model", "messages": HELLO}, key)
    assert resp.status == 200  # the answer is delivered; its charge is known, the balance after is not
    assert resp.headers["x-creditgate-charged"] == str(CHARGE)
    assert "x-creditgate-balance" not in resp.headers
    request_id = resp.headers["x-request-id"]
    assert tries == [request_id] * 7
    pending = priced.client.app[PROXY].pending
    assert list(pending.pending) == [request_id]
    assert (await priced.admin("GET", "/ledger"))["settlements_waiting_for_redis"] == 1

    monkeypatch.setattr(priced.balances, "settle", real_settle)  # Redis is back
    assert await pending.retry() == 1
    assert await pending.retry() == 0  # nothing waits any more
    state = await priced.balance(account)
    assert (state["balance"], state["held"], state["holds"]) == (10_000_000 - CHARGE, 0, [])
    await priced.client.app[FLUSHER].wait_for_rows(1)
    row = await priced.services.store.pool.fetchrow(
        "SELECT amount FROM ledger WHERE idempotency_id = $1", request_id
    )
    assert row is not None
    assert row["amount"] == -CHARGE  # one debit, whether or not the first try had reached Redis
    assert (pending.settled, pending.dropped) == (1, 0)


async def test_a_settlement_still_waiting_at_shutdown_gets_a_last_try_before_the_final_flush(
    priced: Sidecar, monkeypatch: pytest.MonkeyPatch, redis_client: Redis
) -> None:
    account, key = await priced.account(10_000_000)
    real_settle = priced.balances.settle

    async def refused(*args: Any, **kwargs: Any) -> Any:
        raise RedisConnectionError("Redis is away")

    monkeypatch.setattr(priced.balances, "settle", refused)
    resp = await post(priced, "/v1/chat/completions", {"model": "test-model", "messages": HELLO}, key)
    assert resp.status == 200
    request_id = resp.headers["x-request-id"]
    monkeypatch.setattr(priced.balances, "settle", real_settle)  # Redis returns just as the sidecar stops
    keys = KeySpace(priced.settings.key_prefix, priced.settings.partitions)
    await priced.client.close()  # the app's shutdown: last try, then the outbox's final flush
    balance = await redis_client.hget(keys.account(account).balance, "balance")
    assert balance is not None
    assert int(balance) == 10_000_000 - CHARGE
    conn = await asyncpg.connect(priced.settings.database_url)
    try:
        amount = await conn.fetchval("SELECT amount FROM ledger WHERE idempotency_id = $1", request_id)
    finally:
        await conn.close()
    assert amount == -CHARGE
