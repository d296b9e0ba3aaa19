"""Settled markers with a bounded lifetime: a reserve or settle carries its window end, the marker expires
at it, and Redis refuses whatever arrives later; a settlement still waiting then goes to the ledger.

The clock is controlled at the script's boundary. The scripts compare Redis' own clock with the window
end they are given, so "a retry landing after its window" is the state {no marker, window end ≤ now}:
the marker deleted (as its expiry at the window end would) and the window end carried set in the past.
No test waits for time to pass."""

from __future__ import annotations

import logging
import time
import uuid

import pytest
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError

from sidecar.accounts import AccountDirectory
from sidecar.app import FLUSHER, PROXY
from sidecar.balances import Balances, ReserveStatus
from sidecar.config import load_settings
from sidecar.errors import ConfigError, WindowClosed
from sidecar.keys import KeySpace
from sidecar.outbox import UsageEvent
from sidecar.reconcile import reconcile
from sidecar.repair import repair
from sidecar.settlements import GIVE_UP_MARGIN_MS, PendingSettlement

from .conftest import Sidecar, SidecarFactory, Upstream, new_key_prefix
from .support import HELLO, MODELS, post, settled

pytestmark = pytest.mark.topologies  # the window is in the money scripts: on one Redis and on the cluster

WINDOW_MS = 3_600_000


def now_ms() -> int:
    return int(time.time() * 1000)


@pytest.fixture
async def balances(redis_client: Redis) -> Balances:
    balances = Balances(redis_client, KeySpace(new_key_prefix(), 4), settled_marker_ms=WINDOW_MS)
    await balances.load_scripts()
    await balances.mark_ready()
    return balances


async def held(
    balances: Balances, balance: int, hold: int, lease_end_ms: int | None = None
) -> tuple[str, str]:
    account = f"acct_{uuid.uuid4().hex[:8]}"
    await AccountDirectory(balances.redis, balances.keys, cache_seconds=0).add_account(account)
    await balances.credit(account, f"fund-{account}", balance)
    request_id = f"req_{uuid.uuid4().hex[:8]}"
    lease = lease_end_ms if lease_end_ms is not None else now_ms() + 60_000
    assert (await balances.reserve(account, request_id, hold, lease)).status is ReserveStatus.HELD
    return account, request_id


async def outbox_entries(balances: Balances, account: str) -> int:
    return int(await balances.redis.xlen(balances.keys.account(account).outbox))


async def marker_expiry(balances: Balances, account: str, request_id: str) -> int:
    return int(await balances.redis.pexpiretime(balances.keys.account(account).settled(request_id)))


async def test_the_marker_lives_until_the_settles_window_end_and_no_longer(balances: Balances) -> None:
    account, request_id = await held(balances, 1_000_000, 400_000)
    window_end = now_ms() + WINDOW_MS
    await balances.settle(account, request_id, 250_000, window_end_ms=window_end)
    assert await marker_expiry(balances, account, request_id) == window_end  # not 7 days: bounded


async def test_a_settle_within_its_window_is_still_idempotent(balances: Balances) -> None:
    account, request_id = await held(balances, 1_000_000, 400_000)
    window_end = now_ms() + WINDOW_MS
    first = await balances.settle(account, request_id, 250_000, window_end_ms=window_end)
    again = await balances.settle(account, request_id, 999_999, window_end_ms=window_end)
    assert (first.first, first.charged, first.released) == (True, 250_000, 400_000)
    assert (again.first, again.charged, again.balance) == (False, 250_000, 750_000)
    assert await outbox_entries(balances, account) == 1
    late_reserve = await balances.reserve(account, request_id, 400_000, now_ms() + 60_000)
    assert late_reserve.status is ReserveStatus.ALREADY_SETTLED  # within the window the marker answers


async def test_a_settle_retried_after_its_marker_could_have_gone_cannot_charge_twice(
    balances: Balances,
) -> None:
    account, request_id = await held(balances, 1_000_000, 400_000)
    await balances.settle(account, request_id, 250_000, window_end_ms=now_ms() + WINDOW_MS)
    k = balances.keys.account(account)
    await balances.redis.delete(k.settled(request_id))  # its window ended: the marker expired
    with pytest.raises(WindowClosed):
        await balances.settle(account, request_id, 250_000, window_end_ms=now_ms() - 1)
    view = await balances.balance(account)
    assert (view.balance, view.held) == (750_000, 0)  # charged once
    assert await outbox_entries(balances, account) == 1
    assert await balances.redis.exists(k.settled(request_id)) == 0  # the refusal wrote nothing


async def test_a_reserve_retried_after_its_window_cannot_hold_again(balances: Balances) -> None:
    account, request_id = await held(balances, 1_000_000, 400_000)
    await balances.settle(account, request_id, 0, window_end_ms=now_ms() + WINDOW_MS)  # a released try
    k = balances.keys.account(account)
    await balances.redis.delete(k.settled(request_id))  # its window ended
    late = await balances.reserve(account, request_id, 400_000, now_ms() + 60_000, window_end_ms=now_ms() - 1)
    assert late.status is ReserveStatus.WINDOW_CLOSED
    view = await balances.balance(account)
    assert (view.balance, view.held, view.holds) == (1_000_000, 0, [])
    assert await balances.redis.zcard(k.hold_expiry) == 0


async def test_a_late_settle_leaves_a_reaped_hold_to_the_reaper_and_charges_nothing(
    balances: Balances,
) -> None:
    """The sidecar died after the reserve; its settle arrives after the window. Redis refuses it (the
    ledger gets the charge from the settlement queue's give-up), the reaper still releases the hold."""
    lease_end = now_ms() + 60_000
    account, request_id = await held(balances, 1_000_000, 400_000, lease_end)
    with pytest.raises(WindowClosed):
        await balances.settle(account, request_id, 250_000, window_end_ms=now_ms() - 1)
    assert (await balances.balance(account)).held == 400_000  # untouched by the refused settle
    assert await balances.expire_holds(lease_end + 1) == 400_000
    view = await balances.balance(account)
    assert (view.balance, view.held, view.holds) == (1_000_000, 0, [])
    assert await outbox_entries(balances, account) == 0


async def test_a_settle_within_its_window_after_the_reaper_debits_once(balances: Balances) -> None:
    lease_end = now_ms() + 60_000
    account, request_id = await held(balances, 1_000_000, 400_000, lease_end)
    assert await balances.expire_holds(lease_end + 1) == 400_000
    window_end = now_ms() + WINDOW_MS
    settled = await balances.settle(account, request_id, 250_000, window_end_ms=window_end)
    again = await balances.settle(account, request_id, 250_000, window_end_ms=window_end)
    assert (settled.first, settled.released, again.first) == (True, 0, False)
    view = await balances.balance(account)
    assert (view.balance, view.held) == (750_000, 0)


# ---- the settlement queue gives up at the window's end -----------------------------------------------


@pytest.fixture
async def priced(make_sidecar: SidecarFactory) -> Sidecar:
    return await make_sidecar(models=MODELS)


@pytest.mark.parametrize("reached", [False, True], ids=["never-reached-redis", "reply-lost"])
async def test_a_settlement_past_its_window_goes_to_the_ledger_and_is_charged_once(
    priced: Sidecar, caplog: pytest.LogCaptureFixture, reached: bool
) -> None:
    account, _ = await priced.account(1_000_000)
    svc = priced.services
    request_id = f"req_{uuid.uuid4().hex[:8]}"
    await svc.balances.reserve(account, request_id, 400_000, now_ms() + 60_000)
    window_end = now_ms() + WINDOW_MS
    # As the request path makes it (settle.ledger_entry): its times fix the ledger row's created_at, so
    # the row written here and the outbox entry flushed later are one row.
    event = UsageEvent(
        route="chat", model="test-model", hold=400_000, outcome="ok", started_ms=now_ms(), settled_ms=now_ms()
    )
    if reached:  # Redis ran the settle, but its reply was lost: the debit and the outbox entry exist
        await svc.balances.settle(account, request_id, 250_000, event, window_end_ms=window_end)
    pending = priced.client.app[PROXY].pending
    pending.add(PendingSettlement(account, request_id, 250_000, event, window_end))
    real_settle = svc.balances.settle
    tries: list[str] = []

    async def away(*args: object, **kwargs: object) -> None:
        tries.append(str(args[1]))
        raise RedisConnectionError("Redis is away")

    svc.balances.settle = away  # type: ignore[method-assign,assignment]
    await pending.retry()  # within the window: tried, still waiting
    assert (tries, list(pending.pending)) == ([request_id], [request_id])
    pending.now_ms = lambda: window_end + GIVE_UP_MARGIN_MS  # the controlled clock: past the window
    with caplog.at_level(logging.ERROR, "creditgate.settlements"):
        assert await pending.retry() == 0
    assert tries == [request_id]  # not sent to Redis again: its marker may be gone
    assert (pending.pending, pending.expired) == ({}, 1)
    assert any(request_id in r.getMessage() and "window" in r.getMessage() for r in caplog.records)
    assert (await priced.admin("GET", "/ledger"))["settlements_expired"] == 1
    metrics = await (await priced.health.get("/metrics")).text()
    assert "creditgate_settlements_expired_total 1.0" in metrics
    row = await svc.store.pool.fetchrow("SELECT amount FROM ledger WHERE idempotency_id = $1", request_id)
    assert row is not None
    assert row["amount"] == -250_000

    svc.balances.settle = real_settle  # type: ignore[method-assign]
    if reached:  # the outbox entry is flushed later: skipped, the ledger holds one row
        await priced.client.app[FLUSHER].drain()
    drifts = await reconcile(svc.redis, svc.keys, svc.store)
    assert [(d.account, d.amount) for d in drifts] == ([] if reached else [(account, 250_000)])
    await repair(svc.redis, svc.keys, svc.store, svc.balances)
    assert await reconcile(svc.redis, svc.keys, svc.store) == []
    assert (await priced.balance(account))["balance"] == 1_000_000 - 250_000  # charged once
    count = await svc.store.pool.fetchval("SELECT count(*) FROM ledger WHERE idempotency_id = $1", request_id)
    assert count == 1


async def test_a_request_whose_reserve_lands_after_its_window_gets_a_503_and_holds_nothing(
    priced: Sidecar, monkeypatch: pytest.MonkeyPatch, upstream: Upstream
) -> None:
    """Only clocks far apart get here (this host's behind Redis' by more than the window): the request
    is refused as Redis refused the reserve, and nothing is held or sent upstream."""
    account, key = await priced.account(1_000_000)
    monkeypatch.setattr(priced.balances, "window_end", lambda since_ms=None: now_ms() - 1)
    resp = await post(priced, "/v1/chat/completions", {"model": "test-model", "messages": HELLO}, key)
    assert resp.status == 503
    assert (await resp.json())["error"]["code"] == "window_closed"
    state = await priced.balance(account)
    assert (state["balance"], state["held"], state["holds"]) == (1_000_000, 0, [])
    assert upstream.calls() == 0


# ---- cache hits, and the setting ---------------------------------------------------------------------


async def test_a_cache_hit_leaves_no_settled_marker(priced: Sidecar, redis_client: Redis) -> None:
    _, key = await priced.account(10_000_000)
    body = {"model": "test-model", "messages": HELLO, "temperature": 0, "max_tokens": 8}
    first = await post(priced, "/v1/chat/completions", body, key)
    await settled(priced)  # the answer is stored by its settle
    hit = await post(priced, "/v1/chat/completions", body, key)
    assert (first.headers["X-Cache"], hit.headers["X-Cache"]) == ("MISS", "HIT")
    prefix = priced.settings.key_prefix
    markers = {k.decode().rsplit(":", 1)[1] async for k in redis_client.scan_iter(f"{prefix}*:settled:*")}
    assert first.headers["x-request-id"] in markers  # the paid request keeps its marker
    assert hit.headers["x-request-id"] not in markers
    await priced.client.app[FLUSHER].drain()
    row = await priced.services.store.pool.fetchrow(
        "SELECT amount, outcome FROM ledger WHERE idempotency_id = $1", hit.headers["x-request-id"]
    )
    assert row is not None
    assert (row["amount"], row["outcome"]) == (0, "cache_hit")  # still recorded


def test_a_window_shorter_than_a_minute_is_refused() -> None:
    with pytest.raises(ConfigError) as refused:
        load_settings(environ={"CREDITGATE_SETTLED_MARKER_SECONDS": "59"})
    assert "settled_marker_seconds" in refused.value.message
