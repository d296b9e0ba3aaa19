"""Money out under faults: an invalid settle changes nothing, one bad settlement or outbox entry never
blocks the others, and a drain waits for the batches its own process has in flight."""

from __future__ import annotations

import asyncio
import re
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from sidecar.accounts import AccountDirectory
from sidecar.app import FLUSHER
from sidecar.balances import Balances
from sidecar.batches import is_data_error
from sidecar.flusher import GROUP
from sidecar.keys import KeySpace, as_text
from sidecar.money import MAX_CHARGE, MAX_MICRO
from sidecar.outbox import BadEntry, UsageEvent, encode_event, ledger_row
from sidecar.settlements import PendingSettlement, PendingSettlements

from .conftest import Sidecar, new_key_prefix

pytestmark = pytest.mark.topologies  # money: on one Redis and on the cluster

NOW = 1_800_000_000_000
LEASE = NOW + 60_000
LUA = Path(__file__).resolve().parent.parent / "lua"


@pytest.fixture
async def balances(redis_client: Redis) -> Balances:
    balances = Balances(redis_client, KeySpace(new_key_prefix(), 4), settled_marker_ms=60_000)
    await balances.load_scripts()
    await balances.mark_ready()
    return balances


async def held(balances: Balances, balance: int, hold: int) -> tuple[str, str]:
    account = f"acct_{uuid.uuid4().hex[:8]}"
    await AccountDirectory(balances.redis, balances.keys, cache_seconds=0).add_account(account)
    await balances.credit(account, f"fund-{account}", balance)
    request_id = f"req_{uuid.uuid4().hex[:8]}"
    await balances.reserve(account, request_id, hold, LEASE)
    return account, request_id


async def snapshot(balances: Balances, account: str, request_id: str) -> tuple[object, ...]:
    k = balances.keys.account(account)
    r = balances.redis
    return (
        await r.hgetall(k.balance),
        await r.hgetall(k.holds),
        await r.zrange(k.hold_expiry, 0, -1, withscores=True),
        await r.get(k.settled(request_id)),
        await r.xlen(k.outbox),
    )


# ---- settle.lua: every argument checked before the first write --------------------------------------


@pytest.mark.parametrize(
    ("charge", "marker_ms"),
    [
        ("1e+17", "60000"),  # what Lua formats a number above 2^53 as
        ("100000000000000000", "60000"),  # above 2^53
        ("9007199254740992", "60000"),  # 2^53
        ("-5", "60000"),
        ("1.5", "60000"),
        ("", "60000"),
        ("abc", "60000"),
        ("5", "0"),
        ("5", "-1"),
        ("5", "1e5"),
        ("5", ""),
    ],
)
async def test_settle_script_refuses_an_invalid_argument_before_any_write(
    balances: Balances, charge: str, marker_ms: str
) -> None:
    account, request_id = await held(balances, 1_000_000, 400_000)
    before = await snapshot(balances, account, request_id)
    k = balances.keys.account(account)
    with pytest.raises(ResponseError, match="settle:"):
        await balances._settle(
            keys=[k.balance, k.holds, k.hold_expiry, k.settled(request_id), k.outbox],
            args=[request_id, charge, marker_ms, k.expiry_member(request_id), "0", b"{}"],
        )
    assert await snapshot(balances, account, request_id) == before
    assert before[1] == {request_id.encode(): b"400000"}  # the hold is still there


@pytest.mark.parametrize("charge", [MAX_CHARGE + 1, MAX_MICRO + 1, 2**63, -1])
async def test_settle_refuses_a_charge_out_of_bounds_before_calling_redis(
    balances: Balances, charge: int
) -> None:
    account, request_id = await held(balances, 1_000_000, 400_000)
    before = await snapshot(balances, account, request_id)
    with pytest.raises(ValueError, match="charge"):
        await balances.settle(account, request_id, charge)
    assert await snapshot(balances, account, request_id) == before


async def test_settle_of_the_largest_charge_and_a_multiple_of_1e8_hold(balances: Balances) -> None:
    account, request_id = await held(balances, MAX_CHARGE, 100_000_000)
    settled = await balances.settle(account, request_id, MAX_CHARGE)
    assert (settled.first, settled.balance, settled.released, settled.charged) == (
        True,
        0,
        100_000_000,
        MAX_CHARGE,
    )
    assert (await balances.balance(account)).held == 0


async def test_expire_hold_of_a_multiple_of_1e8(balances: Balances) -> None:
    account, _ = await held(balances, 1_000_000_000, 300_000_000)
    assert await balances.expire_holds(LEASE + 1) == 300_000_000
    view = await balances.balance(account)
    assert (view.balance, view.held, view.holds) == (1_000_000_000, 0, [])


@pytest.mark.parametrize("script", ["settle.lua", "expire_hold.lua"])
def test_scripts_pass_no_lua_arithmetic_to_redis_call(script: str) -> None:
    text = (LUA / script).read_text()
    calls = [line for line in text.splitlines() if "redis.call" in line]
    assert calls
    assert not [c for c in calls if re.search(r"tonumber\(|\d\s*-\s*\w", c)]


# ---- pending settlements: one bad item never blocks the others ---------------------------------------


@pytest.mark.parametrize("fault", ["charge-out-of-bounds", "redis-refuses"])
async def test_one_refused_pending_settlement_does_not_stop_the_others(
    balances: Balances, fault: str
) -> None:
    pending = PendingSettlements(balances)
    bad_account, bad_request = await held(balances, 1_000_000, 400_000)
    charge = 1_000
    if fault == "charge-out-of-bounds":
        charge = MAX_CHARGE + 1
    else:  # the account's balance field is no integer: HINCRBY fails inside the script
        await balances.redis.hset(balances.keys.account(bad_account).balance, "balance", "not-a-number")
    pending.add(PendingSettlement(bad_account, bad_request, charge, UsageEvent(), balances.window_end()))
    good = [await held(balances, 1_000_000, 400_000) for _ in range(3)]
    for account, request_id in good:
        pending.add(PendingSettlement(account, request_id, 250_000, UsageEvent(), balances.window_end()))

    assert await pending.retry() == 3
    assert list(pending.pending) == [bad_request]  # the refused one still waits, the others are taken
    for account, _ in good:
        view = await balances.balance(account)
        assert (view.balance, view.held) == (750_000, 0)


async def test_a_connection_failure_still_stops_the_pass(balances: Balances) -> None:
    pending = PendingSettlements(balances)
    items = [await held(balances, 1_000_000, 400_000) for _ in range(2)]
    for account, request_id in items:
        pending.add(PendingSettlement(account, request_id, 1_000, UsageEvent(), balances.window_end()))
    tries: list[str] = []

    async def away(account: str, request_id: str, *args: object, **kwargs: object) -> None:
        tries.append(request_id)
        raise RedisConnectionError("Redis is away")

    balances.settle = away  # type: ignore[method-assign,assignment]
    assert await pending.retry() == 0
    assert tries == [items[0][1]]  # Redis is away: the rest waits for the next pass
    assert len(pending.pending) == 2


# ---- outbox validation: an entry that can never be a ledger row ---------------------------------------

GOOD = b'{"request_id":"req_1","account":"acct_1","charge":5,"hold":10}'


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({}, "no d field"),
        ({b"q": GOOD}, "no d field"),  # x and p are expiry and payoff entries
        ({b"x": GOOD}, "x undecodable"),
        ({b"d": b""}, "undecodable"),
        ({b"d": b"{not json"}, "undecodable"),
        ({b"d": b"[]"}, "undecodable"),
        ({b"d": b'{"request_id":"r","account":"a","charge":"5"}'}, "undecodable"),
        ({b"d": b'{"request_id":"r","account":"a","charge":1.5}'}, "undecodable"),
        ({b"d": b"{}"}, "no request_id"),
        ({b"d": b'{"account":"a","charge":5}'}, "no request_id"),
        ({b"d": b'{"request_id":"","account":"a","charge":5}'}, "no request_id"),
        ({b"d": b'{"request_id":"r","charge":5}'}, "no account"),
        ({b"d": b'{"request_id":"r","account":"a","charge":-1}'}, "charge -1 outside"),
        ({b"d": b'{"request_id":"r","account":"a","charge":9007199254740992}'}, "charge 9007199254740992"),
        ({b"d": b'{"request_id":"r","account":"a","charge":5,"hold":-3}'}, "hold -3 outside"),
    ],
)
def test_an_outbox_entry_that_cannot_be_a_ledger_row_is_refused(
    fields: dict[bytes, bytes], reason: str
) -> None:
    with pytest.raises(BadEntry) as caught:
        ledger_row(fields, "1700000000000-0")
    assert caught.value.reason.startswith(reason)


@pytest.mark.parametrize("fields", [{b"d": GOOD}, {"d": GOOD.decode()}])
def test_a_valid_outbox_entry_is_a_ledger_row(fields: dict[Any, Any]) -> None:
    row = ledger_row(fields, "1700000000000-0")
    assert row[:4] == ("req_1", "acct_1", "usage", -5)
    assert row[12:14] == (10, 0)  # hold, overdraft


@pytest.mark.parametrize(
    ("exc", "data"),
    [
        (asyncpg.exceptions.NumericValueOutOfRangeError("out of range"), True),
        (asyncpg.exceptions.NotNullViolationError("null"), True),
        (asyncpg.exceptions._base.DataError("invalid input for query argument"), True),
        (OverflowError("int too big"), True),
        (asyncpg.exceptions.CannotConnectNowError("starting up"), False),
        (asyncpg.exceptions.ConnectionDoesNotExistError("closed"), False),
        (ConnectionRefusedError("refused"), False),
        (TimeoutError(), False),
        (asyncpg.exceptions.InterfaceError("pool is closing"), False),
    ],
)
def test_which_failures_split_a_batch(exc: BaseException, data: bool) -> None:
    assert is_data_error(exc) is data


# ---- the flusher parks dead letters and writes the rest -----------------------------------------------


async def test_bad_outbox_entries_are_dead_lettered_and_the_good_ones_written(sidecar: Sidecar) -> None:
    account, _ = await sidecar.account(10_000_000)
    svc = sidecar.services
    stream = svc.keys.account(account).outbox
    good: list[str] = []
    bad = {
        b'{"request_id":"req_huge","account":"%s","charge":7,"prompt_tokens":9223372036854775808}'
        % account.encode(): "refused by Postgres",
        b"{not json": "undecodable",
        b'{"account":"%s","charge":3}' % account.encode(): "no request_id",
        b'{"request_id":"req_noacct","charge":3}': "no account",
        b'{"request_id":"req_neg","account":"%s","charge":-4}' % account.encode(): "charge -4",
    }
    parked: dict[str, str] = {}
    for i in range(12):
        request_id = f"req_good_{i:02d}"
        good.append(request_id)
        event = UsageEvent(request_id=request_id, account=account, charge=100 + i, prompt_tokens=i)
        await svc.redis.xadd(stream, {"d": encode_event(event)})
        if i % 2 == 0 and bad:  # the bad ones among the good ones
            data, reason = bad.popitem()
            parked[as_text(await svc.redis.xadd(stream, {"d": data}))] = reason
    assert not bad

    await svc.flusher().drain()  # waits for the app's own loops too

    rows = await svc.store.pool.fetch(
        "SELECT idempotency_id, account_id, amount FROM ledger WHERE kind = 'usage' ORDER BY idempotency_id"
    )
    assert [(r["idempotency_id"], r["account_id"], r["amount"]) for r in rows] == [
        (request_id, account, -(100 + i)) for i, request_id in enumerate(good)
    ]
    view = await sidecar.admin("GET", "/ledger/dead-letters")
    assert view["total"] == len(parked)
    letters = {letter["entry"]: letter for letter in view["dead_letters"]}
    assert sorted(letters) == sorted(parked)
    for entry, reason in parked.items():
        assert letters[entry]["reason"].startswith(reason)
        assert letters[entry]["id"]
    assert letters[next(iter(parked))]["d"]
    status = await sidecar.admin("GET", "/ledger")
    assert status["outbox_backlog"] == 0
    assert status["outbox_dead_letters"] == len(parked)
    assert await svc.redis.xpending(stream, GROUP) == {
        "pending": 0,
        "min": None,
        "max": None,
        "consumers": [],
    }
    metrics = await (await sidecar.client.get("/metrics")).text()
    assert f"creditgate_outbox_dead_letters_total {float(len(parked))}" in metrics


# ---- drain waits for the batches its process has in flight --------------------------------------------


async def test_drain_waits_for_the_batch_the_background_loop_is_writing(
    sidecar: Sidecar, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The interleaving that made a drain return early: the app's own loop has read an entry (so no read
    of the drain sees it, and it is not idle long enough to be claimed) and is still writing it."""
    account, _ = await sidecar.account(1_000_000)
    svc = sidecar.services
    store = sidecar.client.app[FLUSHER].store
    real_insert = store.insert_usage
    entered, gate = asyncio.Event(), asyncio.Event()

    async def gated(rows: Iterable[tuple[Any, ...]]) -> None:
        rows = list(rows)
        if not entered.is_set():  # the background loop's batch: held until the drain waits for it
            entered.set()
            await gate.wait()
        await real_insert(rows)

    monkeypatch.setattr(store, "insert_usage", gated)
    await svc.balances.reserve(account, "req_in_flight", 1_000, LEASE)
    await svc.balances.settle(account, "req_in_flight", 600, UsageEvent())
    await entered.wait()  # the loop holds the entry: read, not acknowledged

    drainer = svc.flusher()
    real_wait = getattr(drainer, "wait_in_flight", None)

    async def waiting() -> None:
        gate.set()  # the loop may finish now; the drain must wait for it
        assert real_wait is not None
        await real_wait()

    monkeypatch.setattr(drainer, "wait_in_flight", waiting, raising=False)
    try:
        await drainer.drain()
        amount = await svc.store.pool.fetchval(
            "SELECT amount FROM ledger WHERE idempotency_id = 'req_in_flight'"
        )
    finally:
        gate.set()
    assert amount == -600
    assert (await drainer.backlog())[0] == 0
