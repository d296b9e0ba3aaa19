"""Liveness, readiness and a Redis blip: dependency-free /healthz, a /readyz that does not flap."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis

from sidecar.app import SERVICES
from sidecar.balances import Balances
from sidecar.health import READINESS
from sidecar.keys import KeySpace

from .conftest import Sidecar, SidecarFactory
from .support import HELLO, MODELS, post, scrape, value

DEAD_REDIS = "redis://127.0.0.1:1/0"  # nothing listens on port 1


@pytest.fixture
async def dead_redis() -> AsyncIterator[Redis]:
    client = Redis.from_url(DEAD_REDIS, socket_connect_timeout=1, retry_on_error=[])
    yield client
    await client.aclose()


async def test_ready_when_redis_answers(sidecar: Sidecar) -> None:
    resp = await sidecar.client.get("/readyz")
    assert resp.status == 200
    assert await resp.json() == {"status": "ready", "reason": "ok"}
    assert await sidecar.balances.scripts_loaded()


async def test_redis_outage_fails_readiness_only_after_the_grace_window(
    make_sidecar: SidecarFactory, dead_redis: Redis
) -> None:
    sc = await make_sidecar(readiness_grace_seconds=3600)
    readiness = sc.client.app[READINESS]
    readiness.balances = Balances(dead_redis, KeySpace("x:", 16), settled_marker_ms=1000)
    resp = await sc.client.get("/readyz")
    assert resp.status == 200  # a blip: still ready, and says so
    assert "within readiness_grace_seconds" in (await resp.json())["reason"]
    assert readiness.failing_since is not None

    readiness.grace = 0  # the outage has now lasted longer than the window
    resp = await sc.client.get("/readyz")
    assert resp.status == 503
    assert (await resp.json())["status"] == "not ready"
    healthz = await sc.client.get("/healthz")  # liveness never depends on Redis
    assert (healthz.status, await healthz.json()) == (200, {"status": "ok"})

    readiness.balances = sc.balances  # Redis is back
    assert (await sc.client.get("/readyz")).status == 200
    assert readiness.failing_since is None


async def test_a_request_during_a_redis_blip_gets_503_in_the_openai_format(
    make_sidecar: SidecarFactory, dead_redis: Redis
) -> None:
    sc = await make_sidecar(models=MODELS)
    _, key = await sc.account(1_000_000)
    accounts = sc.client.app[SERVICES].accounts
    live = accounts.redis
    accounts.redis = dead_redis
    resp = await post(sc, "/v1/chat/completions", {"model": "tm", "messages": HELLO}, key)
    body = await resp.json()
    assert resp.status == 503
    assert body["error"]["code"] == "service_unavailable"
    assert set(body["error"]) == {"message", "type", "code", "param"}
    assert resp.headers["x-request-id"].startswith("req_")
    accounts.redis = live
    assert (await post(sc, "/v1/chat/completions", {"model": "tm", "messages": HELLO}, key)).status == 200
    m = await scrape(sc)
    labels = {"route": "chat", "model": "other", "cache": "off"}
    assert value(m, "creditgate_requests_total", **labels, status_class="5xx") == 1


async def test_not_ready_once_shutting_down(sidecar: Sidecar) -> None:
    sidecar.client.app[READINESS].stopping = True
    resp = await sidecar.client.get("/readyz")
    assert (resp.status, (await resp.json())["reason"]) == (503, "shutting down")
