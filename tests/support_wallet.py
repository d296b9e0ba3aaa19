"""The wallet tests' shared ground: a controlled clock, the money scripts on a real Redis (one node or the
cluster) with the request path's pipeline, and readers of an account's grants and outbox entries."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from redis.asyncio import Redis

from sidecar.accounts import AccountDirectory
from sidecar.balances import Balances
from sidecar.cluster_pipeline import pipeline_for
from sidecar.keys import KeySpace, as_text
from sidecar.wallet import DAY_MS, Grant, WalletPolicy

from .conftest import new_key_prefix

T0 = 1_800_000_000_000  # 2027-01-15T08:00:00Z
IDLE_MS = 30 * DAY_MS


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> int:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def balances(redis_client: Redis, redis_url: str, clock: Clock) -> AsyncIterator[Balances]:
    """The scripts on the request path's pipeline (as many in flight as the tests send)."""
    keys = KeySpace(new_key_prefix(), 4)
    pipeline = pipeline_for(redis_url)
    policy = WalletPolicy(IDLE_MS, clock)
    b = Balances(redis_client, keys, settled_marker_ms=3_600_000, pipeline=pipeline, wallet=policy)
    await b.load_scripts()
    await b.mark_ready()
    yield b
    await pipeline.aclose()


async def new_account(b: Balances) -> str:
    account = f"acct_{uuid.uuid4().hex[:8]}"
    await AccountDirectory(b.redis, b.keys, cache_seconds=0).add_account(account)
    return account


async def grants(b: Balances, account: str) -> dict[str, Grant]:
    raw = await b.redis.hgetall(b.keys.account(account).grants)
    return {as_text(k): Grant.parse(as_text(k), as_text(v)) for k, v in raw.items()}


async def outbox(b: Balances, account: str) -> list[dict[str, Any]]:
    """The outbox entries of the account's partition (the test's own prefix: this account's), each as
    {field: decoded JSON}."""
    entries: Any = await b.redis.xrange(b.keys.account(account).outbox)
    return [{as_text(k): json.loads(v) for k, v in fields.items()} for _, fields in entries]
