"""The durable ledger: outbox → flusher → Postgres exactly once; money in exactly once; reconcile and
rebuild. Real Redis, real Postgres, real processes for the crash tests."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from sidecar.app import FLUSHER, Services, create_app, services
from sidecar.config import Settings
from sidecar.embedded import EmbeddedPostgres
from sidecar.errors import Conflict
from sidecar.flusher import GROUP
from sidecar.ledger_schema import migration_files
from sidecar.outbox import UsageEvent, ledger_row
from sidecar.rebuild import rebuild_if_empty
from sidecar.reconcile import complete_money_in, reconcile
from sidecar.repair import repair

from .conftest import Sidecar, SidecarFactory, Upstream, clean_env, make_settings
from .support_schemas import ADVISORY_WAITS

LEASE = 4_000_000_000_000

pytestmark = pytest.mark.topologies  # money: on one Redis and on the cluster


@pytest.fixture
def settings(redis_url: str, database_url: str) -> Settings:
    return make_settings(redis_url, database_url, partitions=8, flush_claim_idle_seconds=0)


@pytest.fixture
async def svc(settings: Settings) -> AsyncIterator[Services]:
    async with services(settings) as ready:
        yield ready


async def new_account(svc: Services, credits: int) -> str:
    account: str = (await svc.admin.create_account())["id"]
    if credits:
        await svc.admin.grant(account, credits, "seed")
    return account


async def settle(svc: Services, account: str, request_id: str, charge: int, hold: int = 1000) -> None:
    await svc.balances.reserve(account, request_id, hold, LEASE)
    event = UsageEvent(route="chat", model="m", hold=hold, prompt_tokens=3, completion_tokens=4)
    await svc.balances.settle(account, request_id, charge, event)


async def usage_rows(svc: Services) -> list[asyncpg.Record]:
    return await svc.store.pool.fetch("SELECT * FROM ledger WHERE kind = 'usage' ORDER BY idempotency_id")


async def test_10000_settlements_over_100_accounts_reach_postgres_exactly_once(svc: Services) -> None:
    accounts = [await new_account(svc, 100_000_000) for _ in range(100)]
    charged: dict[str, int] = dict.fromkeys(accounts, 0)

    async def settle_range(start: int) -> None:
        for i in range(start, 10_000, 20):
            account = accounts[i % 100]
            charge = 1 + (i * 7919) % 5000
            charged[account] += charge
            await settle(svc, account, f"req_{i:05d}", charge, hold=6000)

    await asyncio.gather(*(settle_range(start) for start in range(20)))
    written = await svc.flusher().drain()
    assert written == 10_000
    assert await svc.store.pool.fetchval("SELECT count(*) FROM ledger WHERE kind = 'usage'") == 10_000
    rows = await svc.store.pool.fetch(
        "SELECT account_id, -sum(amount) AS charged FROM ledger WHERE kind = 'usage' GROUP BY account_id"
    )
    sums = {row["account_id"]: row["charged"] for row in rows}
    assert sums == charged
    for account in accounts:
        view = await svc.balances.balance(account)
        assert view.balance == 100_000_000 - charged[account]
        assert view.balance == await svc.store.ledger_sum(account)
    backlog, _ = await svc.flusher().backlog()
    assert backlog == 0
    assert await reconcile(svc.redis, svc.keys, svc.store) == []


async def test_ledger_rows_carry_the_request_metadata(svc: Services) -> None:
    account = await new_account(svc, 1_000_000)
    await svc.balances.reserve(account, "req_meta", 500, LEASE)
    event = UsageEvent(
        route="chat",
        model="gpt-4o-mini",
        provider="openai",
        key_source="pool",
        multiplier="5/4",
        prompt_tokens=10,
        cached_tokens=4,
        completion_tokens=20,
        hold=500,
        outcome="ok",
        started_ms=1_700_000_000_123,
        settled_ms=1_700_000_001_456,
    )
    await svc.balances.settle(account, "req_meta", 700, event)
    await svc.flusher().drain()
    (row,) = await usage_rows(svc)
    assert (row["account_id"], row["amount"], row["overdraft"], row["hold"]) == (account, -700, 200, 500)
    assert (row["model"], row["provider"], row["key_source"], row["multiplier"]) == (
        "gpt-4o-mini",
        "openai",
        "pool",
        "5/4",
    )
    assert (row["prompt_tokens"], row["cached_tokens"], row["completion_tokens"]) == (10, 4, 20)
    assert row["settled_at"].timestamp() * 1000 == pytest.approx(1_700_000_001_456)


async def test_zero_charges_move_nothing_and_write_nothing(svc: Services) -> None:
    account = await new_account(svc, 1_000)
    await settle(svc, account, "req_failed", 0)
    assert await svc.flusher().drain() == 0
    assert await usage_rows(svc) == []


async def test_a_replayed_batch_changes_nothing(svc: Services) -> None:
    account = await new_account(svc, 1_000_000)
    for i in range(5):
        await settle(svc, account, f"req_{i}", 100)
    flusher = svc.flusher()
    batch = await flusher.collect()
    assert batch.size == 5
    await svc.store.insert_usage([ledger_row(f, i) for entries in batch.entries.values() for i, f in entries])
    await flusher.write(batch)  # the same rows again, as after a crash between commit and ack
    assert len(await usage_rows(svc)) == 5
    assert await svc.store.ledger_sum(account) == 1_000_000 - 500


_CRASH_AFTER_COMMIT = """
import os, signal, sys
from sidecar import cli, flusher


insert = flusher.Flusher._insert

async def insert_then_die(self, items):
    dead = await insert(self, items)
    os.kill(os.getpid(), signal.SIGKILL)
    return dead

flusher.Flusher._insert = insert_then_die
sys.exit(cli.main(sys.argv[1:]))
"""


def _cli(settings: Settings, *args: str, fault: str = "") -> subprocess.CompletedProcess[str]:
    env = clean_env(
        CREDITGATE_REDIS_URL=settings.redis_url or "",
        CREDITGATE_DATABASE_URL=settings.database_url or "",
        CREDITGATE_KEY_PREFIX=settings.key_prefix,
        CREDITGATE_PARTITIONS=str(settings.partitions),
        CREDITGATE_FLUSH_BATCH_SIZE="40",
        CREDITGATE_FLUSH_CONCURRENCY="1",
        CREDITGATE_FLUSH_CLAIM_IDLE_SECONDS="0",
    )
    command = [sys.executable, "-m", "sidecar", *args]
    if fault == "crash-after-commit":  # the real CLI, with the flusher killed right after its commit
        command = [sys.executable, "-c", _CRASH_AFTER_COMMIT, *args]
    return subprocess.run(
        command,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


async def test_flusher_killed_after_commit_before_ack_loses_and_doubles_nothing(
    svc: Services, settings: Settings
) -> None:
    account = await new_account(svc, 10_000_000)
    for i in range(100):
        await settle(svc, account, f"req_{i:03d}", 1000 + i)
    crashed = _cli(settings, "flush", "--drain", fault="crash-after-commit")
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr
    committed = len(await usage_rows(svc))
    assert committed == 40  # the first batch is in Postgres ...
    backlog, _ = await svc.flusher().backlog()
    assert backlog == 100  # ... and nothing was acknowledged or deleted
    pending = sum([(await svc.redis.xpending(s, GROUP))["pending"] for s in svc.flusher().streams])
    assert pending >= committed
    recovered = _cli(settings, "flush", "--drain")
    assert recovered.returncode == 0, recovered.stderr
    rows = await usage_rows(svc)
    assert [r["idempotency_id"] for r in rows] == [f"req_{i:03d}" for i in range(100)]
    assert -sum(r["amount"] for r in rows) == sum(1000 + i for i in range(100))
    assert await svc.store.ledger_sum(account) == (await svc.balances.balance(account)).balance
    assert (await svc.flusher().backlog())[0] == 0


async def test_migrate_twice_applies_once(settings: Settings) -> None:
    first = _cli(settings, "migrate")
    assert first.returncode == 0, first.stderr
    second = _cli(settings, "migrate")
    assert second.returncode == 0, second.stderr
    assert '"applied": []' in second.stdout
    assert migration_files()[0][0] == "001_ledger"


async def test_one_grant_sent_100_times_credits_once(sidecar: Sidecar) -> None:
    account = (await sidecar.admin("POST", "/accounts", {}))["id"]

    async def send() -> dict[str, Any]:
        resp = await sidecar.client.post(
            f"/admin/accounts/{account}/grants",
            json={"credits": "7.5"},
            headers=sidecar.admin_headers(**{"Idempotency-Key": "order-1234"}),
        )
        assert resp.status == 200
        body: dict[str, Any] = await resp.json()
        return body

    results = await asyncio.gather(*(send() for _ in range(100)))
    assert sum(r["credited"] for r in results) == 1
    assert {r["balance"] for r in results} == {7_500_000}
    rows = await sidecar.services.store.pool.fetch("SELECT * FROM ledger WHERE account_id = $1", account)
    assert [(r["kind"], r["amount"], r["applied"]) for r in rows] == [("grant", 7_500_000, True)]
    assert (await sidecar.balance(account))["balance"] == 7_500_000


async def test_a_grant_that_died_before_its_redis_credit_is_completed_once(svc: Services) -> None:
    account = await new_account(svc, 0)
    # The process wrote the ledger row and died before crediting Redis.
    await svc.store.record_money_in(f"in:{account}:k1", account, "grant", 3_000_000, None)
    assert (await svc.balances.balance(account)).balance == 0
    assert [d.account for d in await reconcile(svc.redis, svc.keys, svc.store)] == []  # pending, not drift
    assert await complete_money_in(svc.store, svc.balances) == 1
    assert await complete_money_in(svc.store, svc.balances) == 0
    assert (await svc.balances.balance(account)).balance == 3_000_000
    # The client's retry of the same grant credits nothing more.
    again = await svc.admin.grant(account, 3_000_000, "k1")
    assert (again["credited"], again["balance"]) == (False, 3_000_000)
    # Nor does a retry that arrives before the reconciler: it completes the grant itself, once.
    await svc.store.record_money_in(f"in:{account}:k2", account, "grant", 1_000_000, None)
    retried = await svc.admin.grant(account, 1_000_000, "k2")
    assert (retried["credited"], retried["balance"]) == (False, 4_000_000)
    assert await svc.store.ledger_sum(account) == 4_000_000


async def test_reconcile_reports_and_repairs_drift(svc: Services) -> None:
    steady = await new_account(svc, 5_000_000)
    drifting = await new_account(svc, 5_000_000)
    await settle(svc, steady, "req_a", 1234)  # unflushed: still in the outbox
    await settle(svc, drifting, "req_b", 4321)
    await svc.flusher().drain()
    await settle(svc, drifting, "req_c", 10)  # unflushed
    assert await reconcile(svc.redis, svc.keys, svc.store) == []
    await svc.redis.hincrby(svc.keys.account(drifting).balance, "balance", 777)
    (drift,) = await reconcile(svc.redis, svc.keys, svc.store)
    assert (drift.account, drift.amount, drift.expected) == (drifting, 777, 5_000_000 - 4321 - 10)
    cli = await repair(svc.redis, svc.keys, svc.store, svc.balances)
    assert [d.account for d in cli] == [drifting]
    assert await reconcile(svc.redis, svc.keys, svc.store) == []
    assert (await svc.balances.balance(drifting)).balance == 5_000_000 - 4321 - 10


async def test_reconcile_cli(svc: Services, settings: Settings) -> None:
    account = await new_account(svc, 1_000)
    await svc.redis.hincrby(svc.keys.account(account).balance, "balance", -5)
    report = _cli(settings, "reconcile")
    assert report.returncode == 0, report.stderr
    assert f'"account": "{account}"' in report.stdout
    assert '"drift": -5' in report.stdout
    fixed = _cli(settings, "reconcile", "--repair")
    assert fixed.returncode == 0, fixed.stderr
    assert (await svc.balances.balance(account)).balance == 1_000


async def test_redis_lost_is_rebuilt_from_the_ledger(make_sidecar: SidecarFactory) -> None:
    sc = await make_sidecar()
    account, key = await sc.account(2_000_000)
    other, _ = await sc.account(500_000)
    resp = await sc.client.post(
        "/v1/chat/completions",
        json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]},
        headers={"Authorization": f"Bearer {key}"},
    )
    assert resp.status == 200
    charge = int(resp.headers["x-creditgate-charged"])
    svc = sc.services
    await svc.flusher().drain()
    # Redis is lost: every key of this deployment disappears.
    names = [n async for n in svc.redis.scan_iter(match=f"{svc.keys.prefix}*")]
    await svc.redis.delete(*names)
    assert await rebuild_if_empty(
        svc.redis, svc.keys, svc.store, settled_marker_ms=svc.balances.settled_marker_ms
    )
    assert not await rebuild_if_empty(
        svc.redis, svc.keys, svc.store, settled_marker_ms=svc.balances.settled_marker_ms
    )
    assert (await sc.balance(account))["balance"] == 2_000_000 - charge
    assert (await sc.balance(other))["balance"] == 500_000
    status = await sc.admin("GET", "/ledger")
    assert (status["outbox_backlog"], status["drifting_accounts"]) == (0, 0)
    # Keys come back too: the same client key still works.
    resp = await sc.client.post(
        "/v1/chat/completions",
        json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]},
        headers={"Authorization": f"Bearer {key}"},
    )
    assert resp.status == 200
    assert await reconcile(svc.redis, svc.keys, svc.store) == []


async def test_postgres_stopped_while_requests_flow(
    tmp_path: Path, redis_url: str, upstream: Upstream, aiohttp_client: Any
) -> None:
    """A Postgres of this test's own is stopped mid-traffic: no request fails, the backlog waits in
    Redis, and the sidecar's own flusher drains it once Postgres is back."""
    postgres = EmbeddedPostgres(tmp_path)
    dsn = postgres.start()
    settings = make_settings(redis_url, dsn, upstream_url=upstream.url, flush_interval_seconds=0.05)
    sc = Sidecar(await aiohttp_client(create_app(settings)), settings)
    try:
        account, key = await sc.account(100_000_000)

        async def call() -> int:
            resp = await sc.client.post(
                "/v1/chat/completions",
                json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi there"}]},
                headers={"Authorization": f"Bearer {key}"},
            )
            assert resp.status == 200, await resp.text()
            return int(resp.headers["x-creditgate-charged"])

        charges = [await call() for _ in range(10)]
        postgres.stop()
        charges += [await call() for _ in range(30)]
        resp = await sc.client.post(
            f"/admin/accounts/{account}/grants",
            json={"amount": 1},
            headers=sc.admin_headers(**{"Idempotency-Key": "during-outage"}),
        )
        assert resp.status == 503
        assert (await resp.json())["error"]["code"] == "service_unavailable"
        assert (await sc.balance(account))["balance"] == 100_000_000 - sum(charges)
        postgres.start()
        store = sc.services.store
        async with asyncio.timeout(60):  # the flusher retries with backoff (at most 10 s apart)
            await sc.client.app[FLUSHER].wait_for_rows(40)
        assert await store.pool.fetchval("SELECT count(*) FROM ledger WHERE kind = 'usage'") == 40
        assert await store.ledger_sum(account) == 100_000_000 - sum(charges)
        assert (await sc.services.flusher().backlog())[0] == 0
    finally:
        await sc.client.close()  # the sidecar stops (and flushes) before its Postgres does
        postgres.stop()


async def test_a_half_created_account_is_finished_by_a_retry_and_blocks_nothing(svc: Services) -> None:
    # A create that died between Postgres and Redis, and a grant written to the ledger for it.
    assert await svc.store.create_account("half-made")
    await svc.store.record_money_in("in:half-made:g1", "half-made", "grant", 5_000, None)
    healthy = await new_account(svc, 0)
    await svc.store.record_money_in(f"in:{healthy}:g2", healthy, "grant", 7_000, None)
    # The reconciler completes what it can and leaves the rest pending, instead of stopping.
    assert await complete_money_in(svc.store, svc.balances) == 1
    assert (await svc.balances.balance(healthy)).balance == 7_000
    assert [row[0] for row in await svc.store.unapplied()] == ["in:half-made:g1"]
    # The operator's retry of the create finishes it (409: it exists), and the grant's retry credits once.
    with pytest.raises(Conflict):
        await svc.admin.create_account("half-made")
    retried = await svc.admin.grant("half-made", 5_000, "g1")
    assert (retried["credited"], retried["balance"]) == (False, 5_000)
    assert await reconcile(svc.redis, svc.keys, svc.store) == []


async def test_reconcile_holds_flushes_back_while_it_compares(svc: Services) -> None:
    account = await new_account(svc, 1_000_000)
    for i in range(10):
        await settle(svc, account, f"req_{i}", 10)
    async with svc.store.barrier():
        flushing = asyncio.create_task(svc.flusher().drain())
        # Postgres offers no event for "a session now waits on this lock": poll its lock table, bounded.
        async with asyncio.timeout(10):
            while not await svc.store.pool.fetchval(ADVISORY_WAITS):  # noqa: ASYNC110
                await asyncio.sleep(0.01)
        assert await svc.store.pool.fetchval("SELECT count(*) FROM ledger WHERE kind = 'usage'") == 0
        assert not flushing.done()
    assert await flushing == 10
    assert await svc.store.ledger_sum(account) == 1_000_000 - 100
