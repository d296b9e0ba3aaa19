"""Keying a big cacheable body: off the event loop, and only for an account with credits available.

Real sidecar, Redis and Postgres, the demo upstream over real HTTP. The key function itself is wrapped
to observe (and in one test to hold) the keying as it happens.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any

import pytest

from sidecar import cache as cache_module
from sidecar.cache import KEY_INLINE_BYTES
from sidecar.cachekey import cache_key

from .conftest import SidecarFactory, Upstream
from .support import MODELS, post

EMBED = "/v1/embeddings"
BIG = {"model": "test-embed", "input": "word " * (2 * KEY_INLINE_BYTES // 5)}  # keyed in the worker
SMALL = {"model": "test-embed", "input": "word " * 10}  # keyed on the loop
FUNDED = 100_000_000  # covers BIG's hold (~13 credits)


class Keying:
    """Wraps cache_key: counts the calls and the threads they ran on; `hold` makes each call wait for
    `release` (bounded, so a keying that blocks the loop fails the test instead of hanging it)."""

    def __init__(self, real: Callable[..., str], *, hold: bool = False) -> None:
        self.real = real
        self.hold = hold
        self.calls = 0
        self.threads: list[str] = []
        self.entered = threading.Event()
        self.release = threading.Event()
        self.released_in_time: bool | None = None

    def __call__(self, *args: Any) -> str:
        self.calls += 1
        self.threads.append(threading.current_thread().name)
        self.entered.set()
        if self.hold:
            self.released_in_time = self.release.wait(timeout=15)
        return self.real(*args)


@pytest.fixture
def keying(monkeypatch: pytest.MonkeyPatch) -> Keying:
    spy = Keying(cache_key)
    monkeypatch.setattr(cache_module, "cache_key", spy)
    return spy


async def test_healthz_answers_while_a_big_body_is_keyed(
    make_sidecar: SidecarFactory, keying: Keying, upstream: Upstream
) -> None:
    sc = await make_sidecar(models=MODELS)
    _, key = await sc.account(FUNDED)
    keying.hold = True
    big = asyncio.create_task(post(sc, EMBED, BIG, key))
    await asyncio.to_thread(keying.entered.wait, 15)  # the keying has started, and now waits
    assert keying.entered.is_set()
    health = await sc.client.get("/healthz")  # answered by the loop while the key is being computed
    assert health.status == 200
    assert not big.done()
    keying.release.set()
    answer = await big
    assert answer.status == 200, await answer.text()
    assert keying.released_in_time is True  # the keying was let go by the test, after /healthz answered
    assert keying.threads[0].startswith("creditgate-cache-key")
    assert upstream.calls("embeddings") == 1


async def test_a_big_body_is_keyed_off_the_loop_and_hits_as_before(
    make_sidecar: SidecarFactory, keying: Keying, upstream: Upstream
) -> None:
    sc = await make_sidecar(models=MODELS)
    _, key = await sc.account(FUNDED)
    first = await post(sc, EMBED, BIG, key)
    assert (first.status, first.headers["X-Cache"]) == (200, "MISS")
    second = await post(sc, EMBED, BIG, key)
    assert (second.status, second.headers["X-Cache"]) == (200, "HIT")
    assert second.headers["x-creditgate-charged"] == "0"
    small = await post(sc, EMBED, SMALL, key)
    assert small.status == 200
    assert upstream.calls("embeddings") == 2
    main = threading.main_thread().name
    assert [name.startswith("creditgate-cache-key") for name in keying.threads] == [True, True, False]
    assert keying.threads[2] == main  # a small body is keyed at once, on the loop


async def test_an_account_with_nothing_available_gets_its_402_before_a_big_body_is_keyed(
    make_sidecar: SidecarFactory, keying: Keying, upstream: Upstream
) -> None:
    sc = await make_sidecar(models=MODELS)
    account, key = await sc.account(0)
    refused = await post(sc, EMBED, BIG, key)
    assert refused.status == 402
    error = (await refused.json())["error"]
    assert (error["code"], error["available"]) == ("insufficient_credits", 0)
    assert keying.calls == 0  # refused on a single read of the balance, the body never keyed
    # A small body is still keyed (it costs next to nothing) and would be served a hit for free.
    small = await post(sc, EMBED, SMALL, key)
    assert small.status == 402
    assert keying.calls == 1
    assert upstream.calls() == 0
    assert (await sc.balance(account))["held"] == 0
