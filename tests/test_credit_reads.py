"""GET /v1/credits/{summary,history,usage,requests/{id}} and their admin equivalents, over real HTTP, on
Redis and Postgres: the figures, the pagination, the CSV statement's sums, a client seeing only its own
account, and every malformed query a 400 naming its parameter that changes nothing."""

from __future__ import annotations

import csv
import datetime as dt
import io
import time
import uuid
from typing import Any

import pytest

from sidecar.app import SERVICES
from sidecar.outbox import UsageEvent, encode_event, ledger_row

from .conftest import Sidecar

DAY = 86_400_000


def now_ms() -> int:
    return time.time_ns() // 1_000_000


async def get(sc: Sidecar, path: str, key: str | None = None, **params: str) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {key}"} if key else sc.admin_headers()
    resp = await sc.client.get(path, params=params, headers=headers)
    body = await resp.json() if resp.content_type == "application/json" else await resp.text()
    return resp.status, body


async def usage_rows(sc: Sidecar, account: str, *events: UsageEvent, drawn: str | None = None) -> None:
    """Usage rows written as the flusher writes them (the same statement: roll-ups included)."""
    rows = []
    for e in events:
        e.account = account
        fields: dict[str, Any] = {"d": encode_event(e)}
        if drawn:
            fields["g"] = drawn
        rows.append(ledger_row(fields, f"{e.settled_ms}-0"))
    await sc.client.app[SERVICES].store.insert_usage(rows)


def ev(request_id: str, charge: int, ms: int, **attrs: Any) -> UsageEvent:
    return UsageEvent(request_id=request_id, charge=charge, settled_ms=ms, **attrs)


async def test_summary(sidecar: Sidecar) -> None:
    account, key = await sidecar.account(10_000_000)
    expires = (dt.datetime.now(dt.UTC) + dt.timedelta(days=10)).replace(microsecond=0)
    await sidecar.admin("POST", f"/accounts/{account}/grants",
                        {"amount": 5_000, "kind": "bonus", "expires_at": expires.isoformat()},
                        **{"Idempotency-Key": "bonus-1"})  # fmt: skip
    now = now_ms()
    await usage_rows(
        sidecar, account,
        ev("r1", 700, now, model="m1", key_id="k1", user="u1", tags=["job=a"], saved=10, prompt_tokens=5),
        ev("r2", 300, now, model="m2", key_id="k1", user="u2", completion_tokens=7),
        ev("r3", 400, now - 3 * DAY, model="m2"),
        ev("r4", 9_000, now - 8 * DAY, model="m3"),  # outside the 7 days' burn
    )  # fmt: skip
    status, s = await get(sidecar, "/v1/credits/summary", key)
    assert status == 200, s
    view = await sidecar.balance(account)
    assert (s["balance"], s["held"], s["available"]) == (view["balance"], 0, view["available"])
    assert s["balance_credits"] == "10.005"
    assert s["credits_by_kind"] == {
        "grant": {"amount": 10_000_000, "amount_credits": "10"},
        "bonus": {"amount": 5_000, "amount_credits": "0.005"},
    }
    assert [(e["grant_id"], e["amount"], e["kind"]) for e in s["expiring"]] == [("bonus-1", 5_000, "bonus")]
    assert dt.datetime.fromisoformat(s["expiring"][0]["expires_at"]) == expires
    today = s["usage_today"]
    assert (today["requests"], today["charge"], today["saved"], today["charge_credits"]) == (
        2,
        1_000,
        10,
        "0.001",
    )
    assert (today["prompt_tokens"], today["completion_tokens"]) == (5, 7)
    assert [(m["value"], m["charge"]) for m in today["by_model"]] == [("m1", 700), ("m2", 300)]
    assert [(k["value"], k["requests"]) for k in today["by_key"]] == [("k1", 2)]
    assert [u["value"] for u in today["by_user"]] == ["u1", "u2"]
    assert [(t["value"], t["charge"]) for t in today["by_tag"]] == [("job=a", 700)]
    month_start = dt.datetime.fromtimestamp(now / 1000, dt.UTC).replace(day=1, hour=0, minute=0, second=0)
    in_month = [c for c, ms in ((700, now), (300, now), (400, now - 3 * DAY), (9_000, now - 8 * DAY))
                if ms >= month_start.timestamp() * 1000]  # fmt: skip
    assert s["usage_month"]["charge"] == sum(in_month)
    forecast = s["forecast"]
    assert forecast["burn_per_day"] == 1_400 // 7
    left_ms = view["available"] * 7 * DAY // 1_400
    assert forecast["days_left"] == left_ms // DAY
    run_out = dt.datetime.fromisoformat(forecast["run_out_at"]).timestamp() * 1000
    assert 0 <= run_out - (now + left_ms) < 60_000


async def test_summary_without_burn_has_no_forecast(sidecar: Sidecar) -> None:
    account, key = await sidecar.account(1_000)
    status, s = await get(sidecar, "/v1/credits/summary", key)
    assert status == 200
    assert s["forecast"]["run_out_at"] is None
    assert s["forecast"]["days_left"] is None
    assert s["usage_today"]["requests"] == 0
    assert s["usage_today"]["by_model"] == []
    status, admin = await get(sidecar, f"/admin/accounts/{account}/credits/summary")
    assert status == 200
    assert admin["balance"] == 1_000


async def history_setup(sc: Sidecar) -> tuple[str, str, int]:
    account, key = await sc.account(1_000_000)
    base = now_ms() - 20 * DAY
    events = [ev(f"r{i:02d}", 10 + i, base + i * DAY // 2, key_id="k1" if i % 2 else "k2") for i in range(30)]
    await usage_rows(sc, account, *events)
    stream = sc.services.keys.outbox(sc.services.keys.partition_of(account))
    move = f'{{"account":"{account}","grant":"x1","amount":"55","at":"{base + 5 * DAY}"}}'
    await sc.services.redis.xadd(stream, {"x": move})
    await sc.client.app[SERVICES].flusher().drain()
    return account, key, base


async def test_history_pages_through_every_entry_newest_first(sidecar: Sidecar) -> None:
    _account, key, _base = await history_setup(sidecar)
    seen: list[dict[str, Any]] = []
    cursor: str | None = None
    while True:
        params = {"limit": "7", **({"cursor": cursor} if cursor else {})}
        status, page = await get(sidecar, "/v1/credits/history", key, **params)
        assert status == 200, page
        seen += page["data"]
        cursor = page["next_cursor"]
        assert page["has_more"] == (cursor is not None)
        if cursor is None:
            break
    status, _ = await get(sidecar, "/v1/credits/history", key, **{"from": "2000-01-01"})
    assert status == 400  # 2000 .. now is more than 400 days
    ids = [e["id"] for e in seen]
    assert len(ids) == len(set(ids)) == 32  # 30 usage rows, the expiry, the money in
    times = [e["created_at"] for e in seen]
    assert times == sorted(times, reverse=True)
    assert {e["kind"] for e in seen} == {"usage", "expiry", "grant"}
    expiry = next(e for e in seen if e["kind"] == "expiry")
    assert (expiry["amount"], expiry["drawn"]) == (-55, {"x1": 55})
    status, only = await get(sidecar, "/v1/credits/history", key, kind="expiry,grant", limit="500")
    assert sorted(e["kind"] for e in only["data"]) == ["expiry", "grant"]
    status, by_key = await get(sidecar, "/v1/credits/history", key, key_id="k1", limit="500")
    assert len(by_key["data"]) == 15
    assert {e["key_id"] for e in by_key["data"]} == {"k1"}


@pytest.mark.parametrize(("from_day", "to_day"), [(3, 12), (0, 30), (7, 7)])
async def test_the_csv_statement_sums_to_the_balance_change(
    sidecar: Sidecar, from_day: int, to_day: int
) -> None:
    account, key, base = await history_setup(sidecar)
    start = dt.datetime.fromtimestamp((base + from_day * DAY // 2 - 1) / 1000, dt.UTC)
    end = dt.datetime.fromtimestamp((base + to_day * DAY // 2) / 1000, dt.UTC)
    params = {"format": "csv", "from": start.isoformat(), "to": end.isoformat()}
    resp = await sidecar.client.get(
        "/v1/credits/history", headers={"Authorization": f"Bearer {key}"}, params=params
    )
    assert resp.status == 200
    assert resp.content_type == "text/csv"
    rows = list(csv.DictReader(io.StringIO(await resp.text())))
    pool = sidecar.services.store.pool

    async def balance_at(at: dt.datetime) -> int:
        sql = "SELECT coalesce(sum(amount), 0) FROM ledger WHERE account_id = $1 AND created_at < $2"
        return int(await pool.fetchval(sql, account, at))

    assert sum(int(r["amount"]) for r in rows) == await balance_at(end) - await balance_at(start)
    assert all(r["amount_credits"] for r in rows)
    if from_day != to_day:
        assert rows


async def test_one_requests_cost(sidecar: Sidecar) -> None:
    account, key = await sidecar.account(1_000_000)
    other, other_key = await sidecar.account(1_000)
    now = now_ms()
    event = ev("req_stream", 1234, now, model="m1", key_id="k1", user="u", tags=["a=b"], hold=2000,
               started_ms=now - 500, prompt_tokens=3, completion_tokens=9)  # fmt: skip
    await usage_rows(sidecar, account, event, drawn='[["g", "1000"]]')
    status, r = await get(sidecar, "/v1/credits/requests/req_stream", key)
    assert status == 200, r
    assert (r["charge"], r["charge_credits"], r["hold"], r["model"], r["key_id"]) == (
        1234, "0.001234", 2000, "m1", "k1")  # fmt: skip
    assert (r["user"], r["tags"], r["drawn"], r["completion_tokens"]) == ("u", ["a=b"], {"g": 1000}, 9)
    assert r["started_at"] < r["settled_at"]
    status, err = await get(sidecar, "/v1/credits/requests/req_stream", other_key)  # another account's
    assert status == 404
    assert err["error"]["param"] == "request_id"
    status, err = await get(sidecar, "/v1/credits/requests/req_nope", key)
    assert status == 404
    status, r = await get(sidecar, f"/admin/accounts/{account}/credits/requests/req_stream")
    assert status == 200
    assert r["charge"] == 1234
    status, err = await get(sidecar, f"/admin/accounts/{other}/credits/requests/req_stream")
    assert status == 404


async def test_usage_groups(sidecar: Sidecar) -> None:
    account, key = await sidecar.account(1_000_000)
    now = now_ms()
    await usage_rows(
        sidecar, account,
        ev("a", 100, now, model="small", user="u1"), ev("b", 900, now, model="big", user="u1"),
        ev("c", 50, now - DAY, model="small", user="u2"), ev("d", 5, now - 40 * DAY, model="old"),
    )  # fmt: skip
    today = dt.datetime.fromtimestamp(now / 1000, dt.UTC).date()
    status, days = await get(sidecar, "/v1/credits/usage", key, group_by="day")
    assert status == 200, days
    assert [(d["day"], d["charge"]) for d in days["data"]] == [
        ((today - dt.timedelta(days=1)).isoformat(), 50), (today.isoformat(), 1000)]  # fmt: skip
    assert days["totals"]["charge"] == 1050
    assert days["totals"]["requests"] == 3
    status, models = await get(sidecar, "/v1/credits/usage", key, group_by="model", **{"from": "2026-01-01"})
    assert [(m["model"], m["charge"]) for m in models["data"]][:3] == [
        ("big", 900),
        ("small", 150),
        ("old", 5),
    ]
    status, top = await get(sidecar, "/v1/credits/usage", key, group_by="user", limit="1")
    assert [(u["user"], u["charge_credits"]) for u in top["data"]] == [("u1", "0.001")]
    status, admin = await get(sidecar, f"/admin/accounts/{account}/credits/usage", group_by="model")
    assert status == 200
    assert admin["data"] == (await get(sidecar, "/v1/credits/usage", key, group_by="model"))[1]["data"]


BAD = [
    ("history", {"from": "yesterday"}, "from"),
    ("history", {"to": "2026-13-01"}, "to"),
    ("history", {"from": "2026-12-02", "to": "2026-12-01"}, "from"),
    ("history", {"from": "2024-01-01", "to": "2026-01-01"}, "from"),
    ("history", {"kind": "gift"}, "kind"),
    ("history", {"limit": "0"}, "limit"),
    ("history", {"limit": "501"}, "limit"),
    ("history", {"limit": "ten"}, "limit"),
    ("history", {"cursor": "%%%"}, "cursor"),
    ("history", {"cursor": "bm90LWEtY3Vyc29y"}, "cursor"),  # base64 of "not-a-cursor"
    ("history", {"cursor": "MTc5NjAwMDAwMDAwMDAwMDpyZXFfeA"}, "cursor"),  # well formed, no such row
    ("history", {"format": "xml"}, "format"),
    ("usage", {"group_by": "week"}, "group_by"),
    ("usage", {"from": "2026-12-05", "to": "2026-12-01"}, "from"),
    ("usage", {"from": "2020-01-01", "to": "2026-01-01"}, "from"),
    ("usage", {"to": "12/01/2026"}, "to"),
    ("usage", {"limit": "1001"}, "limit"),
]


@pytest.mark.parametrize(("path", "params", "param"), BAD)
async def test_bad_input_is_a_400_naming_the_param(
    sidecar: Sidecar, path: str, params: dict[str, str], param: str
) -> None:
    account, key = await sidecar.account(1_000)
    for url, auth in ((f"/v1/credits/{path}", key), (f"/admin/accounts/{account}/credits/{path}", None)):
        status, body = await get(sidecar, url, auth, **params)
        assert status == 400, body
        assert body["error"]["param"] == param
        assert body["error"]["type"] == "invalid_request_error"
    assert (await sidecar.balance(account))["balance"] == 1_000


async def test_who_may_read_what(sidecar: Sidecar) -> None:
    account, key = await sidecar.account(1_000)
    for path in ("summary", "history", "usage", "requests/r1"):
        resp = await sidecar.client.get(f"/v1/credits/{path}")
        assert resp.status == 401
        assert "error" in await resp.json()
        status, _ = await get(sidecar, f"/admin/accounts/{account}/credits/{path}", key)  # a client key
        assert status == 401
        status, err = await get(sidecar, f"/admin/accounts/acct_{uuid.uuid4().hex}/credits/{path}")
        assert status == 404
        assert err["error"]["param"] == "account"
