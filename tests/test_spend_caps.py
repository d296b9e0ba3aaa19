"""Spend caps over real HTTP: 200 concurrent requests never overshoot a cap (its live holds count), the
refusal is a 402 `spend_cap_exceeded` naming the cap, its period and when it resets, and what is not
metered stays open."""

from __future__ import annotations

import asyncio
import datetime as dt

import aiohttp
import msgspec
import pytest

from .conftest import Sidecar, SidecarFactory, Upstream
from .support import HELLO, MODELS, hold_for
from .support_gate import ArrivalGate, all_accounted, gated, send_all

__all__ = ["gated"]  # the fixture

pytestmark = pytest.mark.topologies

REQUESTS = 200
FIT = 50
MAX_TOKENS = 10


async def set_cap(sc: Sidecar, account: str, scope: str, period: str, limit: int) -> None:
    await sc.balances.redis.hset(sc.balances.keys.account(account).caps, f"{scope}|{period}", str(limit))


async def test_200_concurrent_requests_never_overshoot_a_daily_cap(
    make_sidecar: SidecarFactory, gated: tuple[Upstream, ArrivalGate]
) -> None:
    upstream, gate = gated
    sc = await make_sidecar(models=MODELS, upstream_url=upstream.url)
    body = msgspec.json.encode({"model": "test-model", "messages": HELLO, "max_tokens": MAX_TOKENS})
    hold = hold_for(body, limit=MAX_TOKENS)
    account, key = await sc.account(1000 * hold)  # the balance covers 1000: the cap is what binds
    await set_cap(sc, account, "account", "day", FIT * hold)
    url = sc.client.make_url("/v1/chat/completions")
    before = _tomorrow()
    async with aiohttp.ClientSession() as session:
        tasks, accounted = send_all(session, url, body, key, gate, REQUESTS, FIT)
        try:
            await all_accounted(accounted, gate, tasks, FIT)
            refused = [t.result() for t in tasks if t.done()]
            assert gate.arrived == FIT
            assert len(refused) == REQUESTS - FIT
            assert {o.status for o in refused} == {402}
            resets = {f"{day}T00:00:00Z" for day in (before, _tomorrow())}  # either, at midnight
            for outcome in refused:
                error = outcome.body["error"]
                assert (error["type"], error["code"]) == ("insufficient_quota", "spend_cap_exceeded")
                assert error["cap"] == {
                    "scope": "account",
                    "period": "day",
                    "limit": FIT * hold,
                    "used": FIT * hold,  # every hold taken, nothing settled yet
                    "resets_at": error["cap"]["resets_at"],
                }
                assert error["cap"]["resets_at"] in resets
                assert "daily cap" in error["message"]
                assert outcome.headers["x-should-retry"] == "false"
        finally:
            gate.set()
            async with asyncio.timeout(10):
                outcomes = await asyncio.gather(*tasks)
    assert sum(o.status == 200 for o in outcomes) == FIT
    charged = sum(int(o.headers["x-creditgate-charged"]) for o in outcomes if o.status == 200)
    k = sc.balances.keys.account(account)
    days = {(dt.datetime.now(dt.UTC) - dt.timedelta(days=d)).date() for d in (0, 1)}
    spent = [await sc.balances.redis.hget(k.spend(f"d{day}"), "account") for day in sorted(days)]
    assert sum(int(v) for v in spent if v) == charged


def _tomorrow() -> str:
    return (dt.datetime.now(dt.UTC) + dt.timedelta(days=1)).date().isoformat()


async def test_a_capped_account_still_lists_models_and_free_work_is_not_refused(
    make_sidecar: SidecarFactory, upstream: Upstream
) -> None:
    sc = await make_sidecar(models=MODELS, upstream_url=upstream.url)
    account, key = await sc.account(10**9)
    await set_cap(sc, account, "account", "total", 0)
    headers = {"Authorization": f"Bearer {key}"}
    models = await sc.client.get("/v1/models", headers=headers)
    assert models.status == 200
    chat = await sc.client.post(
        "/v1/chat/completions",
        json={"model": "test-model", "messages": HELLO, "max_tokens": 5},
        headers=headers,
    )
    body = await chat.json()
    assert chat.status == 402
    assert body["error"]["code"] == "spend_cap_exceeded"
    assert body["error"]["cap"]["resets_at"] is None
    assert "does not reset" in body["error"]["message"]
    assert upstream.calls() == 0
    assert (await sc.balance(account))["held"] == 0
