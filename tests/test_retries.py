"""Retries that money depends on, and leases: lost Redis replies (through a fault proxy) and long requests.

Every lost reply here is real: the command runs in Redis and its reply is swallowed by the proxy
(tests/support_faults.py); the client's own timeout (``redis_timeout_seconds``, set small) declares it
lost. Each case checks the operation still completes and its money moved exactly once.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import msgspec
import pytest

from sidecar.app import FLUSHER, PROXY, create_app
from sidecar.flusher import ACK_ENTRIES

from .conftest import Sidecar, SidecarFactory, Upstream, make_settings
from .support import held_upstream, usage_rows
from .support_faults import RedisFaultProxy, command, fault_proxy, script

MODELS = {"test-model": {"prompt": "1", "completion": "2", "max_output_tokens": 100}}
HELLO = [{"role": "user", "content": "hello world"}]  # the demo counts 3 + 2 = 5 prompt tokens
CHARGE = -(-(5 * 1000 + 16 * 2000) * 5 // 4)  # the demo's 16 completion tokens, pooled (x 1.25)
FAST = 0.3  # redis_timeout_seconds: how soon a lost reply is declared lost


@pytest.fixture
async def faults(redis_url: str) -> AsyncIterator[RedisFaultProxy]:
    async with fault_proxy(redis_url) as proxy:
        yield proxy


@pytest.fixture
async def through_faults(
    faults: RedisFaultProxy, database_url: str, upstream: Upstream, aiohttp_client: Any
) -> SidecarFactory:
    """A sidecar whose every Redis connection goes through the fault proxy, lost replies declared lost
    after FAST seconds."""

    async def factory(**overrides: Any) -> Sidecar:
        raw = {"upstream_url": upstream.url, "redis_timeout_seconds": FAST, "models": MODELS, **overrides}
        settings = make_settings(faults.url, database_url, **raw)
        return Sidecar(await aiohttp_client(create_app(settings)), settings)

    return factory


async def post(sc: Sidecar, body: dict[str, Any], key: str) -> aiohttp.ClientResponse:
    return await sc.client.post(
        "/v1/chat/completions", data=msgspec.json.encode(body), headers={"Authorization": f"Bearer {key}"}
    )


async def test_three_lost_reserve_replies_still_answer_and_charge_once(
    through_faults: SidecarFactory, faults: RedisFaultProxy
) -> None:
    sc = await through_faults()
    account, key = await sc.account(10_000_000)
    reserve = script(sc.balances._reserve.sha)
    faults.lose_replies(3, reserve)
    resp = await post(sc, {"model": "test-model", "messages": HELLO}, key)
    assert resp.status == 200, await resp.text()
    assert (len(faults.lost), faults.count(reserve)) == (3, 4)  # ran four times, held once
    assert resp.headers["x-creditgate-charged"] == str(CHARGE)
    state = await sc.balance(account)
    assert (state["balance"], state["held"], state["holds"]) == (10_000_000 - CHARGE, 0, [])
    rows = await usage_rows(sc, account)
    assert [(r["idempotency_id"].endswith(resp.headers["x-request-id"]), r["amount"]) for r in rows] == [
        (True, -CHARGE)
    ]


async def test_a_reserve_lost_past_its_deadline_answers_503_and_holds_nothing(
    through_faults: SidecarFactory, faults: RedisFaultProxy
) -> None:
    sc = await through_faults(reserve_retry_seconds=0.5)
    account, key = await sc.account(10_000_000)
    faults.lose_replies(1_000, script(sc.balances._reserve.sha))
    resp = await post(sc, {"model": "test-model", "messages": HELLO}, key)
    assert resp.status == 503
    state = await sc.balance(account)  # the hold the lost tries took is released at once
    assert (state["balance"], state["held"], state["holds"]) == (10_000_000, 0, [])


async def test_a_grant_whose_credit_reply_is_lost_completes_and_credits_once(
    through_faults: SidecarFactory, faults: RedisFaultProxy
) -> None:
    sc = await through_faults()
    account, _ = await sc.account(0)
    credit = script(sc.balances._credit.sha)
    faults.lose_replies(1, credit)
    await sc.admin(
        "POST", f"/accounts/{account}/grants", {"amount": 700}, **{"Idempotency-Key": uuid.uuid4().hex}
    )
    assert (len(faults.lost), faults.count(credit)) == (1, 2)
    assert (await sc.balance(account))["balance"] == 700
    applied = await sc.services.store.pool.fetch(
        "SELECT amount, applied FROM ledger WHERE account_id = $1 AND kind <> 'usage'", account
    )
    assert [(r["amount"], r["applied"]) for r in applied] == [(700, True)]


@pytest.mark.parametrize("lost", [("XREADGROUP",), ("EVAL", ACK_ENTRIES)], ids=["read", "acknowledge"])
async def test_a_flush_whose_reply_is_lost_completes_and_writes_once(
    through_faults: SidecarFactory, faults: RedisFaultProxy, lost: tuple[str, ...]
) -> None:
    # A read whose reply is lost leaves its entries pending on this consumer (XREADGROUP is not
    # idempotent: sent again, it reads the next ones): they are taken over once idle this long.
    sc = await through_faults(flush_claim_idle_seconds=1)
    account, key = await sc.account(10_000_000)
    await faults.wait_for(lambda: faults.count(command("XREADGROUP")) > 0)  # the flusher polls
    faults.lose_replies(1, command(*lost))  # the read, or the acknowledgement (ack_entries.lua)
    resp = await post(sc, {"model": "test-model", "messages": HELLO}, key)
    assert resp.status == 200
    rows = await usage_rows(sc, account)
    assert [r["amount"] for r in rows] == [-CHARGE]
    await faults.wait_for(lambda: len(faults.lost) == 1)
    flusher = sc.client.app[FLUSHER]
    assert flusher.stats.failures == 0
    assert (await flusher.backlog())[0] == 0  # acknowledged and deleted: nothing left to write again


class Counting:
    """Wraps a ledger method: counts its calls and the errors they raised, and wakes waiters."""

    def __init__(self, real: Any) -> None:
        self.real, self.calls, self.errors = real, 0, 0
        self.changed = asyncio.Condition()

    async def __call__(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return await self.real(*args, **kwargs)
        except Exception:
            self.errors += 1
            raise
        finally:
            self.calls += 1
            async with self.changed:
                self.changed.notify_all()

    async def reach(self, calls: int) -> None:
        async with asyncio.timeout(30), self.changed:
            await self.changed.wait_for(lambda: self.calls >= calls)


async def long_request_keeps_its_hold(
    sc: Sidecar, monkeypatch: pytest.MonkeyPatch, arrived: asyncio.Event, release: asyncio.Event
) -> Counting:
    """A non-streamed request outliving several leases: its hold survives the reaper, charged once."""
    account, key = await sc.account(10_000_000)
    renew, reap = Counting(sc.balances.renew), Counting(sc.balances.expire_holds)
    monkeypatch.setattr(sc.balances, "renew", renew)
    monkeypatch.setattr(sc.balances, "expire_holds", reap)
    pending = asyncio.create_task(post(sc, {"model": "test-model", "messages": HELLO}, key))
    await arrived.wait()
    # Renewed every third of the 1 s lease: 9 renewals are 3 leases; then one more reaper pass.
    await renew.reach(9)
    await reap.reach(reap.calls + 1)
    held = await sc.balance(account)
    assert (held["held"], len(held["holds"])) == (held["holds"][0]["amount"], 1)
    release.set()
    resp = await pending
    assert resp.status == 200
    state = await sc.balance(account)
    assert (state["balance"], state["held"], state["holds"]) == (10_000_000 - CHARGE, 0, [])
    assert [r["amount"] for r in await usage_rows(sc, account)] == [-CHARGE]
    return renew


@pytest.mark.topologies  # the rest of this module needs its one-node fault proxy
async def test_a_non_streamed_request_outliving_its_lease_keeps_its_hold(
    make_sidecar: SidecarFactory, aiohttp_server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    app, arrived, release = held_upstream()
    server = await aiohttp_server(app)
    sc = await make_sidecar(
        models=MODELS,
        upstream_url=str(server.make_url("/v1")),
        hold_lease_seconds=1,
        reaper_interval_seconds=0.1,
    )
    await long_request_keeps_its_hold(sc, monkeypatch, arrived, release)
    assert sc.client.app[PROXY].exchanges == {}


async def test_a_lease_renewal_whose_reply_is_lost_completes(
    through_faults: SidecarFactory,
    aiohttp_server: Any,
    monkeypatch: pytest.MonkeyPatch,
    faults: RedisFaultProxy,
) -> None:
    app, arrived, release = held_upstream()
    server = await aiohttp_server(app)
    sc = await through_faults(
        upstream_url=str(server.make_url("/v1")), hold_lease_seconds=1, reaper_interval_seconds=0.1
    )
    faults.lose_replies(1, command("ZADD"))
    renew = await long_request_keeps_its_hold(sc, monkeypatch, arrived, release)
    assert len(faults.lost) == 1
    assert renew.errors == 0  # each lost reply was retried within the same renewal
