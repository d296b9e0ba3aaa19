"""`creditgate flush` as a process of its own beside a `creditgate serve` that runs no flusher: it writes
what the serving process settled, answers /healthz, /readyz and /metrics (the flusher's series) on its ops
port, and on SIGTERM finishes the batch in hand, drains the outbox and exits 0. The serving process with
`flusher_enabled: false` exports no flusher series."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
from prometheus_client.parser import text_string_to_metric_families
from redis.asyncio import Redis

from sidecar.app import services
from sidecar.flusher import GROUP
from sidecar.health import FlushReadiness
from sidecar.keys import KeySpace
from sidecar.metrics import Metrics

from .conftest import (
    ADMIN_TOKEN,
    SidecarFactory,
    Upstream,
    creditgate_process,
    make_settings,
    new_key_prefix,
    process_env,
    serve_process,
)
from .support import HELLO, funded_key

DEADLINE = 60  # seconds: a guard that fails the test, never a timing assertion
# The series only a process running the flusher exports.
FLUSHER_SERIES = {
    "creditgate_flush_batch_rows",
    "creditgate_flush_duration_seconds",
    "creditgate_flush_failures",
    "creditgate_ledger_rows_written",
    "creditgate_outbox_dead_letters",
}
# The series only a serving process exports (a sample of them).
SERVING_SERIES = {"creditgate_requests", "creditgate_holds_active", "creditgate_ledger_drift_accounts"}
OPS = r"ops listening on http://[0-9.]+:([0-9]+)"


def families(text: str) -> dict[str, dict[str, float]]:
    """Family name -> {sample name: value} of a /metrics answer (labels left out)."""
    return {f.name: {s.name: s.value for s in f.samples} for f in text_string_to_metric_families(text)}


async def scrape(session: aiohttp.ClientSession, ops: str) -> dict[str, dict[str, float]]:
    async with session.get(f"{ops}/metrics") as resp:
        assert resp.status == 200
        return families(await resp.text())


async def until(condition: Any, what: str) -> None:
    """Poll the async `condition` until it holds (fails after DEADLINE seconds)."""
    try:
        async with asyncio.timeout(DEADLINE):
            while not await condition():  # noqa: ASYNC110 (another process changes it)
                await asyncio.sleep(0.05)
    except TimeoutError:
        pytest.fail(f"never happened: {what}")


async def usage_rows(database_url: str) -> int:
    conn = await asyncpg.connect(database_url)
    try:
        return int(await conn.fetchval("SELECT count(*) FROM ledger WHERE kind = 'usage'"))
    finally:
        await conn.close()


async def outbox(redis: Redis, prefix: str) -> tuple[int, int]:
    """(entries in the outbox streams, of them read by a flusher and not yet acknowledged)."""
    keys = KeySpace(prefix, 16)
    length = pending = 0
    for stream in (keys.outbox(p) for p in range(keys.partitions)):
        length += await redis.xlen(stream)
        if await redis.exists(stream):
            pending += (await redis.xpending(stream, GROUP))["pending"]
    return length, pending


async def test_a_flush_process_writes_and_reports_what_a_serve_process_settled(
    redis_url: str, database_url: str, upstream: Upstream, redis_client: Redis, tmp_path: Path
) -> None:
    prefix, first, then = new_key_prefix(), 4, 3
    common = {"CREDITGATE_OPS_PORT": "0", "CREDITGATE_RECONCILE_INTERVAL_SECONDS": "0"}
    serve_env = process_env(
        redis_url,
        database_url,
        prefix,
        upstream.url,
        CREDITGATE_FLUSHER_ENABLED="false",
        CREDITGATE_ADMIN_TOKEN=ADMIN_TOKEN,
        **common,
    )
    # One loop, batches of `first`, and an interval no test waits out: the first batch is written when
    # full, the next stays in hand until SIGTERM, which must write it rather than wait.
    flush_env = process_env(
        redis_url,
        database_url,
        prefix,
        upstream.url,
        CREDITGATE_FLUSH_BATCH_SIZE=str(first),
        CREDITGATE_FLUSH_CONCURRENCY="1",
        CREDITGATE_FLUSH_INTERVAL_SECONDS="3600",
        **common,
    )
    async with serve_process(serve_env, tmp_path) as (served, url), aiohttp.ClientSession() as session:
        serving_ops = f"http://127.0.0.1:{(await served.wait_for(OPS)).group(1)}"
        host, port = url.removeprefix("http://").split(":")
        _, key = await funded_key(host, int(port), 10_000_000)

        async def chat(n: int) -> None:
            for _ in range(n):
                body = {"model": "gpt-4o-mini", "messages": HELLO}
                auth = {"Authorization": f"Bearer {key}"}
                async with session.post(f"{url}/v1/chat/completions", json=body, headers=auth) as resp:
                    assert resp.status == 200, await resp.text()

        await chat(first)
        serving = await scrape(session, serving_ops)
        assert FLUSHER_SERIES & set(serving) == set()  # it runs no flusher: it says nothing about one
        assert serving["creditgate_outbox_backlog_entries"] == {"creditgate_outbox_backlog_entries": first}
        assert await usage_rows(database_url) == 0

        async with creditgate_process(flush_env, tmp_path, "flush", ready=f"creditgate flush {OPS}") as (
            flushing,
            flush_port,
        ):
            ops = f"http://127.0.0.1:{flush_port}"

            async def ready() -> bool:
                async with session.get(f"{ops}/readyz") as resp:
                    return resp.status == 200

            async def written(rows: int) -> bool:
                found = (await scrape(session, ops)).get("creditgate_ledger_rows_written", {})
                return found.get("creditgate_ledger_rows_written_total") == rows

            await until(ready, "the flush process's /readyz answers 200")
            await until(lambda: written(first), f"the flusher reports {first} rows written")
            async with session.get(f"{ops}/healthz") as resp:
                assert resp.status == 200
            metrics = await scrape(session, ops)
            assert metrics["creditgate_flush_batch_rows"]["creditgate_flush_batch_rows_count"] == 1
            assert metrics["creditgate_outbox_backlog_entries"]["creditgate_outbox_backlog_entries"] == 0
            assert metrics["creditgate_redis_up"]["creditgate_redis_up"] == 1
            assert set(metrics) >= FLUSHER_SERIES
            assert SERVING_SERIES & set(metrics) == set()  # it serves no request, runs no reconciler
            assert await usage_rows(database_url) == first

            await chat(then)

            async def in_hand() -> bool:
                return await outbox(redis_client, prefix) == (then, then)

            await until(in_hand, "the flusher has read the new entries into its batch")
            assert await usage_rows(database_url) == first  # the batch waits for its interval
            assert await flushing.stop(signal.SIGTERM) == 0, flushing.log
        assert await usage_rows(database_url) == first + then  # the batch in hand was written
        assert await outbox(redis_client, prefix) == (0, 0)
        assert "final flush wrote" in flushing.log
        assert await served.stop() == 0


async def test_a_flush_process_without_ops_port_listens_on_nothing(
    redis_url: str, database_url: str, tmp_path: Path
) -> None:
    env = process_env(redis_url, database_url, new_key_prefix(), "http://127.0.0.1:9/v1")
    ready = r"flusher running as consumer (\S+)"
    async with creditgate_process(env, tmp_path, "flush", ready=ready) as (flushing, _):
        assert await flushing.stop(signal.SIGTERM) == 0, flushing.log
    assert "listening" not in flushing.log


async def test_the_flush_readiness_needs_its_loop_redis_and_postgres(
    redis_url: str, database_url: str
) -> None:
    settings = make_settings(redis_url, database_url)
    running = True
    async with services(settings) as svc:
        readiness = FlushReadiness(svc.redis, svc.store, lambda: running)
        assert await readiness.check() == (True, "ok")
        running = False
        assert await readiness.check() == (False, "the flusher loop is not running")
        running = True
        gone = Redis.from_url("redis://127.0.0.1:9/0", socket_connect_timeout=0.5)
        try:
            ready, reason = await FlushReadiness(gone, svc.store, lambda: True).check()
        finally:
            await gone.aclose()
        assert not ready
        assert reason.startswith("Redis does not answer"), reason
        readiness.stopping = True
        assert await readiness.check() == (False, "shutting down")


@pytest.mark.parametrize("flusher_enabled", [True, False])
async def test_a_serving_process_exports_flusher_series_only_when_it_flushes(
    make_sidecar: SidecarFactory, flusher_enabled: bool
) -> None:
    sc = await make_sidecar(flusher_enabled=flusher_enabled)
    resp = await sc.health.get("/metrics")
    exposed = set(families(await resp.text()))
    assert (exposed >= FLUSHER_SERIES) is flusher_enabled
    assert (FLUSHER_SERIES & exposed == set()) is not flusher_enabled
    assert {"creditgate_outbox_backlog_entries", "creditgate_redis_up"} <= exposed  # the outbox's, always


def test_each_role_exports_its_own_series_of_the_contract() -> None:
    everything = set(families(Metrics().render().decode()))
    flusher_only = set(families(Metrics(serving=False).render().decode()))
    serving_only = set(families(Metrics(flushing=False).render().decode()))
    shared = {
        "creditgate_build_info",
        "creditgate_outbox_backlog_entries",
        "creditgate_outbox_oldest_age_seconds",
    }
    assert flusher_only == FLUSHER_SERIES | shared | {"creditgate_redis_up"}
    assert serving_only == everything - FLUSHER_SERIES
