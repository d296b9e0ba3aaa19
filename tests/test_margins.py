"""Provider costs and margins over real HTTP, Redis and Postgres: GET /admin/margins sums the usage rows'
charges and provider costs by model, upstream and account, counting the rows of unknown cost apart;
its parameters are checked; a price below a candidate's cost is a WARNING at startup; rows from before
migration 019 read as the key sources they were."""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import AsyncIterator
from typing import Any

import pytest

from .conftest import ADMIN_TOKEN, Sidecar, SidecarFactory
from .support import post
from .support_routing import CHARGE, CHAT, COST, Fakes, fake_upstreams, ledger_rows, routed_sidecar

START = 100_000_000
COST_A, COST_B = int(COST["a"] or 0), int(COST["b"] or 0)


@pytest.fixture
async def fakes() -> AsyncIterator[Fakes]:
    async for found in fake_upstreams():
        yield found


async def margins(sc: Sidecar, **params: str) -> tuple[int, Any]:
    resp = await sc.client.get(
        "/admin/margins", params=params, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}
    )
    return resp.status, await resp.json()


async def test_margins_by_upstream_model_and_account(make_sidecar: SidecarFactory, fakes: Fakes) -> None:
    """Requests served by a (cost known), by b after a failed (known) and by c (no cost profile: unknown),
    over two accounts: revenue is every charge, margin only over the rows whose cost is known."""
    sc, _ = await routed_sidecar(make_sidecar, fakes)
    first, first_key = await sc.account(START)
    second, second_key = await sc.account(START)
    for key, failing in ((first_key, ""), (first_key, "a"), (second_key, "ab"), (second_key, "")):
        for name in failing:
            fakes[name].script = ["500"]
        assert (await post(sc, "/v1/chat/completions", CHAT, key)).status == 200
    await ledger_rows(sc, second, 4)
    status, by_upstream = await margins(sc, group_by="upstream")
    assert status == 200, by_upstream
    rows = {r["upstream"]: r for r in by_upstream["data"]}
    assert [r["upstream"] for r in by_upstream["data"]] == ["c", "a", "b"]  # by revenue
    a, b, c = rows["a"], rows["b"], rows["c"]
    assert (a["requests"], a["revenue"], a["cost"], a["margin"]) == (
        2, 2 * CHARGE["a"], 2 * COST_A, 2 * (CHARGE["a"] - COST_A))  # fmt: skip
    assert (b["requests"], b["revenue"], b["cost"], b["margin"]) == (
        1, CHARGE["b"], COST_B, CHARGE["b"] - COST_B)  # fmt: skip
    assert (c["requests"], c["revenue"], c["cost"], c["margin"]) == (1, CHARGE["c"], 0, 0)
    assert c["cost_unknown"] == {"requests": 1, "revenue": CHARGE["c"], "revenue_credits": "0.1875"}
    assert a["cost_known"]["requests"] == 2
    assert a["cost_unknown"]["requests"] == 0
    assert a["margin_credits"] == "0.075"
    totals = by_upstream["totals"]
    known = 2 * CHARGE["a"] + CHARGE["b"]
    assert (totals["requests"], totals["revenue"], totals["cost"]) == (
        4, known + CHARGE["c"], 2 * COST_A + COST_B)  # fmt: skip
    assert totals["margin"] == known - 2 * COST_A - COST_B
    assert totals["cost_unknown"]["requests"] == 1
    status, by_model = await margins(sc, group_by="model")
    assert [(r["model"], r["requests"], r["revenue"]) for r in by_model["data"]] == [
        ("routed", 4, totals["revenue"])]  # fmt: skip
    assert by_model["totals"] == totals
    status, by_account = await margins(sc, group_by="account", limit="1")
    assert [r["account"] for r in by_account["data"]] == [second]  # the larger revenue; one asked for
    assert by_account["data"][0]["revenue"] == CHARGE["c"] + CHARGE["a"]
    assert by_account["totals"] == totals  # over every group, not the page
    assert first != second
    earlier = (dt.datetime.now(dt.UTC) - dt.timedelta(days=3)).date().isoformat()
    status, none = await margins(sc, to=earlier)
    assert (status, none["data"], none["totals"]["requests"], none["totals"]["margin"]) == (200, [], 0, 0)


@pytest.mark.parametrize(
    ("params", "param"),
    [
        ({"group_by": "day"}, "group_by"),
        ({"from": "yesterday"}, "from"),
        ({"from": "2026-12-02", "to": "2026-12-01"}, "from"),
        ({"from": "2020-01-01", "to": "2026-01-01"}, "from"),
        ({"limit": "0"}, "limit"),
        ({"limit": "1001"}, "limit"),
    ],
)
async def test_bad_margin_parameters_are_named(sidecar: Sidecar, params: dict[str, str], param: str) -> None:
    status, body = await margins(sidecar, **params)
    assert (status, body["error"]["param"]) == (400, param)


async def test_margins_take_the_admin_token(sidecar: Sidecar) -> None:
    resp = await sidecar.client.get("/admin/margins")
    assert resp.status == 401
    resp = await sidecar.client.get("/admin/margins", headers={"Authorization": "Bearer not-the-token"})
    assert resp.status == 401


async def test_a_price_below_a_candidates_cost_is_a_startup_warning(
    make_sidecar: SidecarFactory, fakes: Fakes, caplog: pytest.LogCaptureFixture
) -> None:
    routes = [
        {"upstream": "a"},  # cost 0.5 / 1: above it
        {"upstream": "b", "model": "b-model", "prompt": "0.9", "completion": "4"},  # cost 1 / 1
    ]
    with caplog.at_level(logging.WARNING, logger="creditgate.proxy"):
        await routed_sidecar(make_sidecar, fakes, routes=routes)
    found = [r.getMessage() for r in caplog.records if "below its provider cost" in r.getMessage()]
    assert found == [
        "model 'routed' is priced below its provider cost on upstream 'b' (model 'b-model' there): "
        "prompt 0.9 < 1 (credits per 1K tokens, the fee per request, at multiplier 1)"
    ]


async def test_rows_from_before_019_read_as_the_key_sources_they_were(sidecar: Sidecar) -> None:
    account, key = await sidecar.account(START)
    pool = sidecar.services.store.pool
    await pool.execute(
        "INSERT INTO ledger (idempotency_id, account_id, kind, amount, route, model, provider, key_source,"
        " created_at) VALUES ('req_old1', $1, 'usage', -5, 'chat', 'm', 'openai', 'pooled', now()),"
        " ('req_old2', $1, 'usage', -5, 'chat', 'm', 'openai', 'byok', now())",
        account,
    )
    shown = []
    for request_id in ("req_old1", "req_old2"):
        resp = await sidecar.client.get(
            f"/v1/credits/requests/{request_id}", headers={"Authorization": f"Bearer {key}"}
        )
        r = await resp.json()
        shown.append((r["key_source"], r["marked_up"], r["attempts"], r["upstream_model"]))
    assert shown == [("pool", True, None, None), ("inline", False, None, None)]
