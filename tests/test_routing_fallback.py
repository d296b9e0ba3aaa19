"""Routing over three fake upstreams with scripted failures, over real HTTP, on real Redis and Postgres:
each failure kind falls back, in order, within the attempts budget; weights hold over many requests;
a failing candidate cools down and recovers on a controlled clock; streams fall back only before their
first byte; the charge is the serving candidate's price, the usage row names it with the attempts and
the provider's cost; keys go per candidate (an inline one only to the primary's provider)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from typing import Any

import aiohttp
import msgspec
import pytest

from sidecar.app import PROXY

from .conftest import Sidecar, SidecarFactory
from .support import pooled, post, scrape, value
from .support_routing import (
    CHARGE,
    CHAT,
    COST,
    MODEL_AT,
    OWN_KEY_CHARGE,
    Fakes,
    fake_upstreams,
    ledger_rows,
    routed_sidecar,
)
from .support_routing import charged as charged_since

START = 100_000_000


@pytest.fixture
async def fakes() -> AsyncIterator[Fakes]:
    async for found in fake_upstreams():
        yield found


async def charged(sc: Sidecar, account: str) -> int:
    return await charged_since(sc, account, START)


@pytest.mark.parametrize(
    ("kind", "result"),
    [("refused", "unreachable"), ("timeout", "timeout"), ("429", "rate_limited"), ("500", "server_error"),
     ("503", "server_error")],
)  # fmt: skip
async def test_each_failure_kind_falls_back_to_the_next_candidate(
    make_sidecar: SidecarFactory, fakes: Fakes, kind: str, result: str
) -> None:
    routes = None
    if kind == "refused":
        routes = [
            {"upstream": "dead"},
            {"upstream": "b", "model": "b-model", "prompt": "2", "completion": "4"},
        ]
    overrides: dict[str, Any] = {"upstream_read_timeout_seconds": 0.5} if kind == "timeout" else {}
    fakes["a"].script = ["hang" if kind == "timeout" else kind]
    sc, _ = await routed_sidecar(make_sidecar, fakes, routes=routes, **overrides)
    account, key = await sc.account(START)
    resp = await post(sc, "/v1/chat/completions", CHAT, key)
    assert resp.status == 200, await resp.text()
    assert (await resp.json())["choices"][0]["message"]["content"] == "from b"
    assert resp.headers["x-creditgate-charged"] == str(CHARGE["b"])
    assert await charged(sc, account) == CHARGE["b"]
    assert [s["model"] for s in fakes["b"].seen] == ["b-model"]  # its own name for the model
    (row,) = await ledger_rows(sc, account, 1)
    assert (row["provider"], row["attempts"], row["outcome"], row["upstream_model"]) == (
        "b",
        2,
        "ok",
        "b-model",
    )
    assert (row["cost"], row["key_source"], row["marked_up"], -row["amount"]) == (
        COST["b"], "pool", True, CHARGE["b"])  # fmt: skip
    metrics = await scrape(sc)
    failed = "dead" if kind == "refused" else "a"
    assert value(metrics, "creditgate_upstream_attempts_total", upstream=failed, result=result) == 1
    assert value(metrics, "creditgate_upstream_attempts_total", upstream="b", result="ok") == 1
    assert value(metrics, "creditgate_routing_fallbacks_total", model="routed", upstream=failed) == 1


async def test_candidates_are_tried_in_order_within_the_attempts_budget(
    make_sidecar: SidecarFactory, fakes: Fakes
) -> None:
    fakes["a"].script, fakes["b"].script = ["500"], ["503"]
    sc, _ = await routed_sidecar(make_sidecar, fakes)
    account, key = await sc.account(START)
    resp = await post(sc, "/v1/chat/completions", CHAT, key)
    assert (resp.status, (await resp.json())["choices"][0]["message"]["content"]) == (200, "from c")
    assert [f.calls for f in fakes.by_name.values()] == [1, 1, 1]
    (row,) = await ledger_rows(sc, account, 1)
    assert (row["provider"], row["attempts"], row["cost"], -row["amount"]) == ("c", 3, None, CHARGE["c"])
    # Two attempts at most: the last failure is the answer, charged nothing; c is never called.
    small, _ = await routed_sidecar(make_sidecar, fakes, routing_max_attempts=2)
    other, other_key = await small.account(START)
    fakes["a"].script, fakes["b"].script = ["500"], ["500"]
    resp = await post(small, "/v1/chat/completions", CHAT, other_key)
    assert resp.status == 500
    assert (await resp.json())["error"]["message"] == "b says 500"
    assert [f.calls for f in fakes.by_name.values()] == [2, 2, 1]
    assert await charged(small, other) == 0  # (and no usage row: nothing was charged)
    metrics = await scrape(small)
    for name in "ab":
        assert value(metrics, "creditgate_upstream_attempts_total", upstream=name, result="server_error") == 1
    assert value(metrics, "creditgate_routing_fallbacks_total", model="routed", upstream="a") == 1


async def test_a_4xx_is_the_clients_answer_and_no_fallback(
    make_sidecar: SidecarFactory, fakes: Fakes
) -> None:
    fakes["a"].script = ["400"]
    sc, _ = await routed_sidecar(make_sidecar, fakes)
    account, key = await sc.account(START)
    resp = await post(sc, "/v1/chat/completions", CHAT, key)
    assert resp.status == 400
    assert (fakes["b"].calls, fakes["c"].calls) == (0, 0)
    assert await charged(sc, account) == 0
    metrics = await scrape(sc)
    assert value(metrics, "creditgate_upstream_attempts_total", upstream="a", result="client_error") == 1
    assert value(metrics, "creditgate_routing_fallbacks_total", model="routed", upstream="a") == 0


async def test_weights_within_one_priority_hold_over_many_requests(
    make_sidecar: SidecarFactory, fakes: Fakes
) -> None:
    """a and b share priority 0 with weights 1 and 3, c comes after: over 240 requests b serves about
    three in four (uniform would be half), c none while they are healthy."""
    routes = [
        {"upstream": "a", "priority": 0, "weight": 1},
        {"upstream": "b", "model": "b-model", "priority": 0, "weight": 3},
        {"upstream": "c", "priority": 1, "weight": 100},
    ]
    sc, _ = await routed_sidecar(make_sidecar, fakes, routes=routes)
    _account, key = await sc.account(START)
    for _ in range(12):
        answers = await asyncio.gather(*(post(sc, "/v1/chat/completions", CHAT, key) for _ in range(20)))
        assert {r.status for r in answers} == {200}
    a, b, c = (fakes[n].calls for n in "abc")
    assert (a + b, c) == (240, 0)
    assert 0.65 <= b / 240 <= 0.85, (a, b)


async def test_a_failing_candidate_cools_down_and_recovers_on_the_clock(
    make_sidecar: SidecarFactory, fakes: Fakes
) -> None:
    sc, clock = await routed_sidecar(
        make_sidecar, fakes, routing_failures_to_cool=2, routing_cooldown_seconds=30
    )
    account, key = await sc.account(START)
    a = fakes["a"]
    a.always = "500"

    async def served_by() -> str:
        resp = await post(sc, "/v1/chat/completions", CHAT, key)
        assert resp.status == 200
        return str((await resp.json())["choices"][0]["message"]["content"]).removeprefix("from ")

    assert [await served_by(), await served_by()] == ["b", "b"]
    assert a.calls == 2  # two failures in a row: a cools down
    metrics = await scrape(sc)
    assert value(metrics, "creditgate_routing_cooling", upstream="a") == 1
    assert value(metrics, "creditgate_routing_cooldowns_total", upstream="a") == 1
    clock.now += 29.9
    assert await served_by() == "b"
    assert a.calls == 2  # skipped while cooling
    clock.now += 0.1  # half-open: one trial, which fails: cooling again
    assert await served_by() == "b"
    assert a.calls == 3
    assert value(await scrape(sc), "creditgate_routing_cooldowns_total", upstream="a") == 2
    assert await served_by() == "b"
    assert a.calls == 3
    clock.now += 30
    a.always = None  # recovered: the trial succeeds and closes it
    assert [await served_by(), await served_by()] == ["a", "a"]
    assert value(await scrape(sc), "creditgate_routing_cooling", upstream="a") == 0
    rows = await ledger_rows(sc, account, 7)
    assert [r["attempts"] for r in rows] == [2, 2, 1, 2, 1, 1, 1]
    assert [-r["amount"] for r in rows][-2:] == [CHARGE["a"], CHARGE["a"]]


async def test_when_every_candidate_cools_they_are_tried_all_the_same(
    make_sidecar: SidecarFactory, fakes: Fakes
) -> None:
    sc, _ = await routed_sidecar(make_sidecar, fakes, routing_failures_to_cool=1)
    account, key = await sc.account(START)
    for name in "abc":
        fakes[name].always = "503"
    assert (await post(sc, "/v1/chat/completions", CHAT, key)).status == 503
    assert value(await scrape(sc), "creditgate_routing_cooling", upstream="c") == 1
    fakes["c"].always = None
    resp = await post(sc, "/v1/chat/completions", CHAT, key)  # all cooling: in order anyway
    assert resp.status == 200
    assert [fakes[n].calls for n in "abc"] == [2, 2, 2]
    (row,) = await ledger_rows(sc, account, 1)  # the first, charged nothing, left none
    assert (row["provider"], row["attempts"], row["outcome"]) == ("c", 3, "ok")


STREAM = {**CHAT, "stream": True}


async def test_a_stream_falls_back_before_its_first_byte_never_after(
    make_sidecar: SidecarFactory, fakes: Fakes
) -> None:
    sc, _ = await routed_sidecar(make_sidecar, fakes)
    account, key = await sc.account(START)
    fakes["a"].script = ["429"]
    resp = await post(sc, "/v1/chat/completions", STREAM, key)
    assert resp.status == 200
    raw = await resp.read()
    assert b'"from "' in raw
    assert raw.rstrip().endswith(b"data: [DONE]")
    assert b'"usage"' not in raw  # asked for on the client's behalf: withheld
    assert [s["model"] for s in fakes["b"].seen] == ["b-model"]
    assert fakes["b"].seen[0]["stream_options"] == {"include_usage": True}
    # A stream that breaks off after its first events is the client's, cut: never another upstream.
    fakes["a"].script = ["cut"]
    resp = await post(sc, "/v1/chat/completions", STREAM, key)
    assert resp.status == 200
    with pytest.raises(aiohttp.ClientPayloadError):  # the client's stream is cut too
        await resp.read()
    assert fakes["b"].calls == 1
    assert await charged(sc, account) == CHARGE["b"]  # the cut one cost nothing (and left no row)
    (row,) = await ledger_rows(sc, account, 1)
    assert (row["provider"], row["attempts"], row["outcome"], row["cost"]) == ("b", 2, "ok", COST["b"])


async def test_the_cost_order_tries_the_cheapest_healthy_candidate_first(
    make_sidecar: SidecarFactory, fakes: Fakes
) -> None:
    routes = [
        {"upstream": "a"},
        {"upstream": "b", "model": "b-model", "prompt": "2", "completion": "4"},
        {"upstream": "c", "model": "c-model", "prompt": "0.5", "completion": "1"},
    ]
    sc, _ = await routed_sidecar(make_sidecar, fakes, routes=routes, model={"routing_order": "cost"})
    account, key = await sc.account(START)
    fakes["c"].script = ["500"]
    resp = await post(sc, "/v1/chat/completions", CHAT, key)
    assert (await resp.json())["choices"][0]["message"]["content"] == "from a"  # the next cheapest
    assert [fakes[n].calls for n in "abc"] == [1, 0, 1]
    resp = await post(sc, "/v1/chat/completions", CHAT, key)
    assert (await resp.json())["choices"][0]["message"]["content"] == "from c"
    assert resp.headers["x-creditgate-charged"] == str(pooled(10 * 500 + 20 * 1000))
    await ledger_rows(sc, account, 2)


class Vault:
    """The account's stored provider keys (own_keys.OwnKeys), as the BYOK vault would give them."""

    def __init__(self, keys: Mapping[str, str]) -> None:
        self.keys = dict(keys)

    async def keys_of(self, account: str) -> Mapping[str, str]:
        return self.keys


async def test_keys_go_per_candidate_an_inline_one_only_to_the_primarys_provider(
    make_sidecar: SidecarFactory, fakes: Fakes
) -> None:
    sc, _ = await routed_sidecar(make_sidecar, fakes)
    sc.client.app[PROXY].own_keys = Vault({"pc": "sk-vault-c"})
    account, key = await sc.account(START)
    fakes["a"].script, fakes["b"].script = ["500"], ["500"]
    resp = await post(sc, "/v1/chat/completions", CHAT, key)
    assert resp.status == 200
    assert [fakes[n].keys() for n in "abc"] == [["Bearer sk-a"], ["Bearer sk-b"], ["Bearer sk-vault-c"]]
    assert resp.headers["x-creditgate-charged"] == str(OWN_KEY_CHARGE["c"])  # at byok_multiplier
    # The caller's own key, inline: sent only to the primary's provider (pa: a alone), never to c.
    fakes["a"].script = ["500"]
    resp = await post(sc, "/v1/chat/completions", CHAT, key, **{"x-creditgate-provider-key": "sk-caller"})
    assert resp.status == 500
    assert (await resp.json())["error"]["message"] == "a says 500"  # a caller's key: the answer unscrubbed
    assert [fakes[n].calls for n in "abc"] == [2, 1, 1]
    assert fakes["a"].keys()[-1] == "Bearer sk-caller"
    (row,) = await ledger_rows(sc, account, 1)  # the inline one cost nothing: no row
    assert (row["provider"], row["key_source"], row["marked_up"], row["attempts"], row["cost"]) == (
        "c",
        "vault",
        False,
        3,
        0,
    )  # fmt: skip  (the caller's key: the operator pays the provider nothing)
    listed = await sc.client.get(
        f"/v1/credits/requests/{row['idempotency_id']}", headers={"Authorization": f"Bearer {key}"}
    )
    shown = await listed.json()
    assert (shown["key_source"], shown["attempts"], shown["marked_up"], shown["provider"]) == (
        "vault", 3, False, "c")  # fmt: skip
    assert "cost" not in shown  # the provider's cost is the operator's, never a client's


async def test_the_hold_covers_the_most_expensive_candidate(
    make_sidecar: SidecarFactory, fakes: Fakes
) -> None:
    """a is the primary and the cheapest, c the dearest: the hold is c's worst case, and an output
    limit lowered to fit a balance is the one every candidate affords (c's)."""
    sc, _ = await routed_sidecar(make_sidecar, fakes)
    body = {k: v for k, v in CHAT.items() if k != "max_tokens"}  # the model's maximum, 100
    size = len(msgspec.json.encode(body))
    hold = pooled(size * 3000 + 100 * 6000)
    poor, poor_key = await sc.account(hold - 1)
    resp = await post(sc, "/v1/chat/completions", body, poor_key)
    assert resp.status == 402
    error = (await resp.json())["error"]
    assert error["required"] == hold
    fits = ((hold - 1) * 4 - size * 3000 * 5) // (6000 * 5)  # what c affords: the least of the three
    assert error["affordable_output_tokens"] == fits
    resp = await post(sc, "/v1/chat/completions", body, poor_key, **{"x-creditgate-fit-output": "1"})
    assert resp.status == 200
    assert fakes["a"].seen[-1]["max_tokens"] == fits
    assert resp.headers["x-creditgate-charged"] == str(CHARGE["a"])  # charged at a's price
    (row,) = await ledger_rows(sc, poor, 1)
    assert row["hold"] == pooled(size * 3000 + fits * 6000)  # c's worst case at the lowered limit


async def test_the_cache_key_does_not_depend_on_the_upstream_that_served(
    make_sidecar: SidecarFactory, fakes: Fakes
) -> None:
    sc, _ = await routed_sidecar(make_sidecar, fakes, cache_enabled=True)
    account, key = await sc.account(START)
    body = {**CHAT, "temperature": 0}
    fakes["a"].script = ["500"]
    first = await post(sc, "/v1/chat/completions", body, key)
    assert (first.status, first.headers["X-Cache"]) == (200, "MISS")
    again = await post(sc, "/v1/chat/completions", body, key)
    assert (again.status, again.headers["X-Cache"]) == (200, "HIT")
    assert (await again.json())["choices"][0]["message"]["content"] == "from b"
    assert [fakes[n].calls for n in "abc"] == [1, 1, 0]
    rows = await ledger_rows(sc, account, 2)
    assert [(r["attempts"], r["cost"]) for r in rows] == [(2, COST["b"]), (0, 0)]


async def test_a_shutdown_cut_stops_fallback(make_sidecar: SidecarFactory, fakes: Fakes) -> None:
    sc, _ = await routed_sidecar(make_sidecar, fakes)
    account, key = await sc.account(START)
    fakes["a"].script = ["hang"]
    pending = asyncio.create_task(post(sc, "/v1/chat/completions", CHAT, key))
    async with asyncio.timeout(30):
        await fakes["a"].arrived.wait()
    sc.client.app[PROXY].cut_all()
    resp = await pending
    assert (resp.status, (await resp.json())["error"]["code"]) == (503, "shutting_down")
    assert (fakes["b"].calls, fakes["c"].calls) == (0, 0)
    assert await charged(sc, account) == 0
    assert value(await scrape(sc), "creditgate_upstream_attempts_total", upstream="a", result="cut") == 1


@pytest.mark.parametrize("name", ["a", "b", "c"])
async def test_the_charge_is_the_serving_candidates_price(
    make_sidecar: SidecarFactory, fakes: Fakes, name: str
) -> None:
    before = "abc".index(name)
    for failing in "abc"[:before]:
        fakes[failing].script = ["502"]
    sc, _ = await routed_sidecar(make_sidecar, fakes)
    account, key = await sc.account(START)
    resp = await post(sc, "/v1/chat/completions", CHAT, key)
    assert resp.headers["x-creditgate-charged"] == str(CHARGE[name])
    assert fakes[name].seen[0]["model"] == MODEL_AT[name]
    (row,) = await ledger_rows(sc, account, 1)
    assert (row["provider"], row["attempts"], row["cost"], -row["amount"]) == (
        name, before + 1, COST[name], CHARGE[name])  # fmt: skip
    assert row["upstream_model"] == (None if name == "a" else MODEL_AT[name])
