"""The portal's pages over real HTTP, Redis and Postgres: the overview's figures are the summary API's, its
warnings (an alert threshold crossed, recurring charges with less than 48 h of runway), the usage chart
stacked by model and switched to keys, the history's pages and its CSV summing to the balance, keys made
(shown once), named, capped and revoked, and every settings form changing what it says."""

from __future__ import annotations

import csv
import datetime as dt
import io
import re
import time
import uuid
from typing import Any

import pytest

from sidecar.outbox import UsageEvent
from sidecar.portal.sessions import token_hash

from .conftest import Sidecar, SidecarFactory
from .support_portal import chat, csrf_of, post_form, sign_in, text_of, usage_rows

C = 1_000_000
DAY_MS = 86_400_000


@pytest.fixture
async def portal(make_sidecar: SidecarFactory) -> Sidecar:
    return await make_sidecar()


def micro(page: str, element: str) -> int:
    found = re.search(rf'id="{element}" data-micro="(-?\d+)"', page)
    assert found, f"no {element} on the page"
    return int(found.group(1))


async def api(sc: Sidecar, key: str, path: str) -> Any:
    resp = await sc.client.get(path, headers={"Authorization": f"Bearer {key}"})
    assert resp.status == 200, await resp.text()
    return await resp.json()


async def grant(sc: Sidecar, account: str, body: dict[str, Any]) -> None:
    await sc.admin("POST", f"/accounts/{account}/grants", body, **{"Idempotency-Key": uuid.uuid4().hex})


async def test_the_overview_shows_the_summary(portal: Sidecar) -> None:
    account, key = await portal.account(0)
    await grant(portal, account, {"credits": "10", "kind": "purchase"})
    await grant(portal, account, {"credits": "2.5", "kind": "promotion", "expires_in_days": 3})
    assert await chat(portal, key) == 200
    assert await chat(portal, key) == 200  # the same again: a cache hit, free, its saving recorded
    summary = await api(portal, key, "/v1/credits/summary")
    assert summary["usage_today"]["saved"] > 0
    await sign_in(portal.client, key)
    page = await (await portal.client.get(f"/portal/accounts/{account}/")).text()
    words = text_of(page)
    for element, name in (("balance", "balance"), ("available", "available"), ("held", "held")):
        assert micro(page, element) == summary[name]
    assert "Purchased 10" in words
    assert "Promotion" in words
    (expiring,) = summary["expiring"]
    assert f"{expiring['expires_at'][:10]}" in words  # when the promotion ends
    today = re.search(r'data-period="usage_today">(.*?)</tr>', page, re.S)
    assert today
    cells = text_of(today.group(1))
    assert cells.startswith("Today 2 ")  # two requests, one of them from the cache
    assert f"{summary['usage_today']['saved_credits']}" in cells
    assert "credits a day" in words  # a forecast at the last 7 days' pace
    assert "gpt-4o-mini" in words  # this month by model


async def test_warnings_for_a_threshold_crossed_and_a_short_runway(portal: Sidecar) -> None:
    account, key = await portal.account(10 * C)
    await sign_in(portal.client, key)
    overview = f"/portal/accounts/{account}/"
    assert 'class="banner' not in await (await portal.client.get(overview)).text()
    await portal.admin(
        "PUT", f"/accounts/{account}/alerts", {"rules": [{"kind": "balance_below", "amount": 20 * C}]}
    )
    words = text_of(await (await portal.client.get(overview)).text())
    assert "Your balance of 10 credits is below your alert threshold of 20 credits." in words
    await portal.admin("PUT", f"/accounts/{account}/alerts", {"rules": [], "defaults": False})
    meter = {"resource_id": "box-1", "kind": "period", "price": C, "period": "hour"}
    resp = await portal.client.post("/v1/meters", json=meter, headers={"Authorization": f"Bearer {key}"})
    assert resp.status == 201, await resp.text()
    page = await (await portal.client.get(f"/portal/accounts/{account}/keys")).text()  # on every page
    words = text_of(page)
    assert "Recurring charges need 48 credits in the next 48 hours; 9 are available." in words
    assert "alert threshold" not in words


async def test_the_usage_chart_stacks_by_model_and_switches_to_keys(portal: Sidecar) -> None:
    account, key = await portal.account(C)
    now = time.time_ns() // 1_000_000
    events = [
        UsageEvent(
            request_id="r1", charge=3 * C, settled_ms=now - 2 * DAY_MS, model="gpt-4o", key_id="key_a"
        ),
        UsageEvent(request_id="r2", charge=1 * C, settled_ms=now - 2 * DAY_MS, model="gpt-4o-mini"),
        UsageEvent(request_id="r3", charge=2 * C, settled_ms=now, model="gpt-4o-mini", key_id="key_a"),
        UsageEvent(request_id="r4", charge=C // 2, settled_ms=now - 40 * DAY_MS, model="gpt-4o"),  # too old
    ]
    await usage_rows(portal, account, *events)
    await sign_in(portal.client, key)
    page = await (await portal.client.get(f"/portal/accounts/{account}/usage")).text()
    bars = re.findall(r'<rect [^>]*data-day="([^"]+)" data-series="([^"]+)" data-micro="(\d+)"', page)

    def day(ms: int) -> str:
        return dt.datetime.fromtimestamp(ms // 1000, dt.UTC).date().isoformat()

    assert sorted(bars) == sorted(
        [(day(now - 2 * DAY_MS), "gpt-4o", str(3 * C)), (day(now - 2 * DAY_MS), "gpt-4o-mini", str(C)),
         (day(now), "gpt-4o-mini", str(2 * C))]
    )  # fmt: skip
    assert 'data-total="6000000"' in page
    table = re.search(r'<table id="usage-days">(.*?)</table>', page, re.S)
    assert table
    assert len(re.findall(r"<tr data-day=", table.group(1))) == 30
    top = text_of(re.search(r'<table id="top-consumers">(.*?)</table>', page, re.S).group(1))  # type: ignore[union-attr]
    assert top.index("gpt-4o ") < top.index("gpt-4o-mini")  # by spend: 3 before 3... by name after
    by_key = await (await portal.client.get(f"/portal/accounts/{account}/usage?by=key")).text()
    series = set(re.findall(r'data-series="([^"]+)"', by_key))
    assert series == {"key_a", "(none)"}  # usage without a key is its own part of the stack
    assert 'data-total="6000000"' in by_key
    unknown = await portal.client.get(f"/portal/accounts/{account}/usage?by=nonsense")
    assert unknown.status == 200  # an unknown switch shows the default, by model


async def test_history_pages_and_its_csv_sum_to_the_balance(portal: Sidecar) -> None:
    account, key = await portal.account(5 * C)
    for n in range(3):
        await grant(portal, account, {"credits": str(n + 1), "kind": "bonus"})
    assert await chat(portal, key, "one") == 200
    assert await chat(portal, key, "two") == 200
    await sign_in(portal.client, key)
    client = portal.client
    page = await (await client.get(f"/portal/accounts/{account}/history")).text()
    rows = re.findall(r'<tr data-id="([^"]+)">', page)
    assert len(rows) == 6  # 4 grants (the first at creation) and 2 requests, newest first
    assert "usage" in text_of(page)
    only = await (await client.get(f"/portal/accounts/{account}/history?kind=usage")).text()
    assert len(re.findall(r"<tr data-id=", only)) == 2
    link = re.search(r'href="(history\.csv\?[^"]*)" id="csv-link"', page)
    assert link
    resp = await client.get(f"/portal/accounts/{account}/{link.group(1).replace('&amp;', '&')}")
    assert resp.status == 200
    assert resp.headers["Content-Disposition"] == f'attachment; filename="statement-{account}.csv"'
    lines = list(csv.DictReader(io.StringIO(await resp.text())))
    assert len(lines) == 6
    balance = (await portal.balance(account))["balance"]
    assert sum(int(r["amount"]) for r in lines) == balance
    bad = await client.get(f"/portal/accounts/{account}/history?from=yesterday")
    assert bad.status == 400
    assert "from must be a date" in text_of(await bad.text())
    backwards = await client.get(f"/portal/accounts/{account}/history?from=2026-12-02&to=2026-12-01")
    assert backwards.status == 400


async def test_history_pages_by_cursor(portal: Sidecar) -> None:
    account, key = await portal.account(C)
    for n in range(55):
        await grant(portal, account, {"amount": n + 1, "kind": "bonus"})
    await sign_in(portal.client, key)
    first = await (await portal.client.get(f"/portal/accounts/{account}/history")).text()
    assert len(re.findall(r"<tr data-id=", first)) == 50
    older = re.search(r'href="(\?[^"]*cursor=[^"]+)" rel="next"', first)
    assert older
    second = await (
        await portal.client.get(f"/portal/accounts/{account}/history{older.group(1).replace('&amp;', '&')}")
    ).text()
    ids = re.findall(r'<tr data-id="([^"]+)">', first) + re.findall(r'<tr data-id="([^"]+)">', second)
    assert len(ids) == len(set(ids)) == 56
    assert 'rel="next"' not in second


async def test_a_key_is_made_shown_once_named_capped_and_revoked(portal: Sidecar) -> None:
    account, key = await portal.account(C)
    client = portal.client
    _, csrf = await sign_in(client, key)
    base = f"/portal/accounts/{account}"
    status, _, location = await post_form(
        client, f"{base}/keys", {"csrf": csrf, "name": "ci", "expires_on": "2099-01-31"}
    )
    assert (status, location) == (303, f"{base}/keys?done=key-created")  # Post/Redirect/Get
    (cookie,) = [c for c in client.session.cookie_jar if c.key == "creditgate_portal"]
    kept = portal.services.keys.portal_new_key(token_hash(cookie.value))
    sealed = await portal.services.redis.get(kept)  # waiting for its page, sealed: no key in Redis
    assert isinstance(sealed, bytes)
    page = await (await client.get(f"{base}/keys?done=key-created")).text()
    made = re.search(r'id="new-key" class="secret" type="text" readonly value="(cgk-[^"]+)"', page)
    assert made
    new_key = made.group(1)
    assert "shown only this once" in text_of(page)
    assert new_key.encode() not in sealed
    assert new_key[len("cgk-") :].encode() not in sealed
    assert not await portal.services.redis.exists(kept)  # the read that showed it deleted it
    reloaded = await (await client.get(f"{base}/keys?done=key-created")).text()  # a refresh
    assert new_key not in reloaded  # never again, and nothing sent again
    assert 'id="new-key"' not in reloaded
    assert "The key is created" in text_of(reloaded)
    assert new_key not in await (await client.get(f"{base}/keys")).text()
    assert len((await portal.admin("GET", f"/accounts/{account}/keys"))["data"]) == 2  # its own and ci
    assert await chat(portal, new_key) == 200  # it works on the API
    keys = (await portal.admin("GET", f"/accounts/{account}/keys"))["data"]
    (ci,) = [k for k in keys if k["name"] == "ci"]
    assert ci["expires_at"] == "2099-02-01T00:00:00Z"
    status, _, location = await post_form(
        client, f"{base}/keys/{ci['id']}/name", {"csrf": csrf, "name": "deploy"}
    )
    assert (status, location) == (303, f"{base}/keys?done=key-renamed")
    status, _, _ = await post_form(
        client, f"{base}/keys/{ci['id']}/cap", {"csrf": csrf, "period": "day", "limit": "0.5"}
    )
    assert status == 303
    caps = (await portal.admin("GET", f"/accounts/{account}/caps"))["caps"]
    assert caps == [{"scope": f"key:{ci['id']}", "period": "day", "limit": C // 2, "limit_credits": "0.5"}]
    words = text_of(await (await client.get(f"{base}/keys?done=cap-set")).text())
    assert "deploy" in words
    assert "Caps: 0.5 per day" in words
    assert "The spend cap is saved" in words
    status, _, location = await post_form(client, f"{base}/keys/{ci['id']}/revoke", {"csrf": csrf})
    assert (status, location) == (303, f"{base}/keys?done=key-revoked")
    assert await chat(portal, new_key) == 401
    assert "Revoked keys" in text_of(await (await client.get(f"{base}/keys")).text())
    # revoking the key this session was opened with ends the session
    own = [k for k in (await portal.admin("GET", f"/accounts/{account}/keys"))["data"] if not k["revoked"]]
    status, _, location = await post_form(client, f"{base}/keys/{own[0]['id']}/revoke", {"csrf": csrf})
    assert (status, location) == (303, "/portal/sign-in?ended=1")
    assert (await client.get(f"{base}/", allow_redirects=False)).status == 303


async def test_the_settings_forms_change_what_they_say(portal: Sidecar) -> None:
    account, key = await portal.account(C)
    client = portal.client
    _, csrf = await sign_in(client, key)
    base = f"/portal/accounts/{account}"

    async def send(path: str, **data: str) -> None:
        status, body, location = await post_form(client, f"{base}/{path}", {"csrf": csrf, **data})
        assert status == 303, text_of(body)
        assert location is not None
        assert location.startswith(f"{base}/settings?done=")

    await send("caps", scope="account", period="month", limit="12.5")
    await send("caps", scope="account", user="alice", period="day", limit="1")  # the end user wins
    await send("caps", scope="model:gpt-4o-mini", period="total", limit="0")
    caps = {
        (c["scope"], c["period"]): c["limit"]
        for c in (await portal.admin("GET", f"/accounts/{account}/caps"))["caps"]
    }
    assert caps == {
        ("account", "month"): 12_500_000,
        ("user:alice", "day"): C,
        ("model:gpt-4o-mini", "total"): 0,
    }
    await send("caps/delete", scope="user:alice", period="day")
    assert len((await portal.admin("GET", f"/accounts/{account}/caps"))["caps"]) == 2
    await send("time-zone", time_zone="Europe/Berlin")
    assert (await portal.admin("GET", f"/accounts/{account}/time-zone"))["time_zone"] == "Europe/Berlin"
    await send("alerts", action="add", kind="balance_below", value="5")
    await send("alerts", action="add", kind="top_up_share", value="30")
    await send("alerts", action="defaults")  # the box unticked: the defaults off
    alerts = await portal.admin("GET", f"/accounts/{account}/alerts")
    assert [r["id"] for r in alerts["rules"]] == ["balance_below:5000000", "top_up_share:30"]
    assert alerts["defaults"] is False
    await send("alerts", action="remove", rule="balance_below:5000000")
    assert [r["id"] for r in (await portal.admin("GET", f"/accounts/{account}/alerts"))["rules"]] == [
        "top_up_share:30"
    ]
    await send("auto-reload", enabled="on", threshold="2", credits="50", method="webhook")
    reload = await portal.admin("GET", f"/accounts/{account}/auto-reload")
    assert (reload["enabled"], reload["threshold"], reload["credits"], reload["method"]) == (
        True,
        2 * C,
        50 * C,
        "webhook",
    )
    await send("contact", email="billing@example.com")
    assert (await portal.admin("GET", f"/accounts/{account}/contact"))["email"] == "billing@example.com"
    page = text_of(await (await client.get(f"{base}/settings")).text())
    assert "STR-" in page  # the referral codes
    assert "12.5" in page
    assert "Europe/Berlin" in page
    await send("contact", email="")
    assert (await portal.admin("GET", f"/accounts/{account}/contact"))["email"] is None


PROFILE = {"legal_name": "Acme", "address_lines": "1 Road", "city": "Paris", "postal_code": "75001",
           "country": "FR", "billing_email": "a@example.com"}  # fmt: skip
BAD_FORMS: list[tuple[str, dict[str, str], int, str]] = [
    ("caps", {"scope": "account", "period": "day", "limit": "lots"}, 400, "must be a number of credits"),
    ("caps", {"scope": "account", "period": "day", "limit": "0.0000001"}, 400, "more than 6 decimals"),
    ("caps", {"scope": "account", "period": "week", "limit": "1"}, 400, "period must be one of"),
    ("caps", {"scope": "model:no-such-model", "period": "day", "limit": "1"}, 400, "No priced model"),
    ("caps", {"scope": "nonsense", "period": "day", "limit": "1"}, 400, "scope must be account"),
    ("caps/delete", {"scope": "x:y", "period": "day"}, 400, "scope must be account"),
    ("time-zone", {"time_zone": "Mars/Olympus"}, 400, "IANA time zone"),
    ("alerts", {"action": "add", "kind": "top_up_share", "value": "101"}, 400, "from 1 to 100"),
    ("alerts", {"action": "add", "kind": "balance_below", "value": "-3"}, 400, "more than 0"),
    ("alerts", {"action": "add", "kind": "often", "value": "3"}, 400, "kind must be one of"),
    ("auto-reload", {"enabled": "on", "threshold": "2", "credits": "0.5", "method": "webhook"}, 400,
     "reload_min_credits"),
    ("auto-reload", {"enabled": "on", "threshold": "2", "credits": "50", "method": "stripe"}, 400,
     "saved payment method"),
    ("contact", {"email": "not an address"}, 400, "email must be an email address"),
    ("keys", {"name": "x" * 101}, 400, "name must be 1-100"),
    ("keys", {"expires_on": "2001-01-01"}, 400, "expires_at must be in the future"),
    ("keys", {"expires_on": "someday"}, 400, "expires_on must be a date"),
    ("billing-profile", {**PROFILE, "country": "XX"}, 400, "country"),
    ("billing-profile", {**PROFILE, "address_lines": ""}, 400, "address_lines"),
    ("buy", {"package": "pro"}, 503, "checkout is off"),
]  # fmt: skip


async def test_bad_input_in_any_form_is_a_message_and_changes_nothing(portal: Sidecar) -> None:
    account, key = await portal.account(C)
    client = portal.client
    _, csrf = await sign_in(client, key)
    base = f"/portal/accounts/{account}"

    async def state() -> Any:
        return [
            await portal.admin("GET", f"/accounts/{account}/{part}")
            for part in ("caps", "alerts", "auto-reload", "contact", "keys", "time-zone")
        ]

    before = await state()
    for path, data, status, words in BAD_FORMS:
        got, body, _ = await post_form(client, f"{base}/{path}", {"csrf": csrf, **data})
        assert got == status, (path, data, got, text_of(body)[:400])
        message = re.search(r'<div class="problem" role="alert" id="form-error">(.*?)</div>', body, re.S)
        assert message, (path, data)
        assert words in text_of(message.group(1)), (path, text_of(message.group(1)))
        assert "aria-invalid" in body or path in ("buy", "caps/delete"), path  # the field is marked
        assert csrf_of(body) == csrf  # the page again, ready to correct and send
    assert await state() == before
    assert (await client.get(f"{base}/documents")).status == 200
    profile = await client.get("/v1/billing-profile", headers={"Authorization": f"Bearer {key}"})
    assert profile.status == 404  # none was saved
