"""The billing portal's edge over real HTTP, Redis and Postgres: a client key exchanged for a session in
Redis (HttpOnly, SameSite=Strict cookie; Secure when asked; the key never in the browser), sign-out and
revocation ending it, CSRF on every form, an operator's sessions, errors as HTML pages, and another
account's data never reachable, by URL or by form field."""

from __future__ import annotations

import dataclasses
import re
import time
import uuid
from typing import Any

import pytest

from sidecar.config import load_settings
from sidecar.keys import as_text
from sidecar.portal.sessions import token_hash
from sidecar.portal.settings import portal_on

from .conftest import ADMIN_TOKEN, Sidecar, SidecarFactory
from .support import scrape, value
from .support_portal import csrf_of, post_form, sign_in, text_of

C = 1_000_000
SESSION_SECONDS = 600
PAGES = ("", "usage", "usage?by=tag", "history", "history.csv", "keys", "provider-keys", "settings", "buy",
         "documents")  # fmt: skip


@pytest.fixture
async def portal(make_sidecar: SidecarFactory) -> Sidecar:
    return await make_sidecar(portal_session_seconds=SESSION_SECONDS)


def session_cookie(resp: Any) -> str:
    """The Set-Cookie header of the session cookie (its attributes as sent)."""
    (header,) = [h for h in resp.headers.getall("Set-Cookie") if h.startswith("creditgate_portal=")]
    return str(header)


async def bought(sc: Sidecar, account: str) -> str:
    """A paid manual order on `account`: its receipt's id."""
    order = await sc.admin("POST", f"/accounts/{account}/orders", {"credits": "10", "amount_minor": 1000})
    await sc.admin("POST", f"/orders/{order['id']}/paid", {"payment_ref": f"wire-{uuid.uuid4().hex[:6]}"})
    listed = await sc.admin("GET", f"/invoices?account={account}")
    return str(listed["data"][0]["id"])


async def works(sc: Sidecar, key: str) -> bool:
    resp = await sc.client.get("/v1/credits/summary", headers={"Authorization": f"Bearer {key}"})
    return resp.status == 200


def test_the_portal_is_on_standalone_and_off_in_sidecar_mode() -> None:
    assert portal_on(load_settings(environ={}))
    assert not portal_on(load_settings(environ={"CREDITGATE_MODE": "sidecar"}))
    both = {"CREDITGATE_MODE": "sidecar", "CREDITGATE_PORTAL_ENABLED": "true"}
    assert portal_on(load_settings(environ=both))
    assert load_settings(environ={}).portal_session_seconds == 3600
    assert load_settings(environ={}).portal_session_max_seconds == 12 * 3600


async def test_a_key_becomes_a_session_and_never_reaches_the_browser(portal: Sidecar) -> None:
    account, key = await portal.account(5 * C)
    client = portal.client
    form = await client.get("/portal/sign-in")
    page = await form.text()
    signin_cookie = [h for h in form.headers.getall("Set-Cookie") if "creditgate_portal_signin=" in h]
    assert signin_cookie
    assert "HttpOnly" in signin_cookie[0]
    assert "SameSite=Strict" in signin_cookie[0]
    resp = await client.post(
        "/portal/sign-in", data={"csrf": csrf_of(page), "key": key}, allow_redirects=False
    )
    assert (resp.status, resp.headers["Location"]) == (303, f"/portal/accounts/{account}/")
    header = session_cookie(resp)
    assert "HttpOnly" in header
    assert "SameSite=Strict" in header
    assert "Path=/portal" in header
    assert "Secure" not in header  # plain HTTP, no portal_secure_cookie
    token = header.split(";")[0].removeprefix("creditgate_portal=")
    assert key not in header
    assert token not in key
    stored = portal.services.keys.portal_session(token_hash(token))
    redis = portal.services.redis
    assert 0 < await redis.ttl(stored) <= SESSION_SECONDS
    fields = {as_text(k): as_text(v) for k, v in (await redis.hgetall(stored)).items()}
    assert fields["account"] == account
    assert key not in str(fields)
    overview = await client.get(resp.headers["Location"])
    body = await overview.text()
    assert overview.status == 200
    assert key not in body
    assert "Available 5 credits" in text_of(body)
    assert overview.headers["Cache-Control"] == "no-store"
    assert "default-src 'none'" in overview.headers["Content-Security-Policy"]
    assert overview.headers["X-Frame-Options"] == "DENY"


async def test_the_cookie_is_secure_when_asked(make_sidecar: SidecarFactory) -> None:
    sc = await make_sidecar(portal_secure_cookie=True)
    _, key = await sc.account(C)
    form = await sc.client.get("/portal/sign-in")
    assert all("Secure" in h for h in form.headers.getall("Set-Cookie"))
    csrf = csrf_of(await form.text())  # a client on plain HTTP keeps no Secure cookie: sent by hand
    resp = await sc.client.post(
        "/portal/sign-in",
        data={"csrf": csrf, "key": key},
        headers={"Cookie": f"creditgate_portal_signin={csrf}"},
        allow_redirects=False,
    )
    assert "Secure" in session_cookie(resp)


async def test_bad_sign_ins_say_why_and_open_nothing(portal: Sidecar) -> None:
    account, key = await portal.account(C)
    client = portal.client
    csrf = csrf_of(await (await client.get("/portal/sign-in")).text())
    for secret, status, words in (
        ("cgk-not-a-key", 401, "That key is not valid"),
        ("", 400, "Enter an API key"),
        ("wrong-admin-token", 401, "That key is not valid"),
    ):
        resp = await client.post("/portal/sign-in", data={"csrf": csrf, "key": secret}, allow_redirects=False)
        body = await resp.text()
        assert resp.status == status
        assert words in text_of(body)
        csrf = csrf_of(body)  # the form again, with a new token (and its cookie)
        assert not [h for h in resp.headers.getall("Set-Cookie", []) if h.startswith("creditgate_portal=")]
    # the sign-in form's own token: missing, or from another form, is refused (no login CSRF)
    resp = await client.post("/portal/sign-in", data={"key": key}, allow_redirects=False)
    assert resp.status == 403
    assert "out of date" in text_of(await resp.text())
    resp = await client.post("/portal/sign-in", data={"csrf": "forged", "key": key}, allow_redirects=False)
    assert resp.status == 403
    page = await client.get(f"/portal/accounts/{account}/", allow_redirects=False)
    assert (page.status, page.headers["Location"]) == (303, "/portal/sign-in?ended=1")


async def test_sign_out_ends_the_session_and_its_cookie_opens_nothing_after(portal: Sidecar) -> None:
    account, key = await portal.account(C)
    client = portal.client
    _, csrf = await sign_in(client, key)
    (cookie,) = [c for c in client.session.cookie_jar if c.key == "creditgate_portal"]
    token = cookie.value
    status, body, _ = await post_form(client, "/portal/sign-out", {})  # no CSRF token: refused
    assert status == 403
    assert "out of date" in text_of(body)
    assert (await client.get(f"/portal/accounts/{account}/")).status == 200  # still signed in
    status, _, location = await post_form(client, "/portal/sign-out", {"csrf": csrf})
    assert (status, location) == (303, "/portal/sign-in?signed_out=1")
    assert not await portal.services.redis.exists(portal.services.keys.portal_session(token_hash(token)))
    client.session.cookie_jar.update_cookies({"creditgate_portal": token})  # the old cookie, replayed
    page = await client.get(f"/portal/accounts/{account}/", allow_redirects=False)
    assert (page.status, page.headers["Location"]) == (303, "/portal/sign-in?ended=1")


async def test_a_session_ends_at_its_absolute_lifetime_however_busy(make_sidecar: SidecarFactory) -> None:
    sc = await make_sidecar(portal_session_seconds=SESSION_SECONDS, portal_session_max_seconds=3600)
    start = time.time_ns() // 1_000_000
    now = [start]  # the app's clock, moved by the test (Redis' TTLs run on the real one)
    sc.balances.wallet = dataclasses.replace(sc.balances.wallet, clock=lambda: now[0])
    account, key = await sc.account(C)
    await sign_in(sc.client, key)
    (cookie,) = [c for c in sc.client.session.cookie_jar if c.key == "creditgate_portal"]
    stored = sc.services.keys.portal_session(token_hash(cookie.value))
    redis = sc.services.redis
    page = f"/portal/accounts/{account}/"
    for minute in range(9, 50, 9):  # a page every 9 minutes: never idle for the 10 of its idle time
        now[0] = start + minute * 60_000
        assert (await sc.client.get(page, allow_redirects=False)).status == 200, minute
        assert SESSION_SECONDS * 1000 - 5_000 < await redis.pttl(stored) <= SESSION_SECONDS * 1000
    now[0] = start + 58 * 60_000  # 2 minutes before its end: Redis keeps it no longer than that
    assert (await sc.client.get(page, allow_redirects=False)).status == 200
    assert 120_000 - 5_000 < await redis.pttl(stored) <= 120_000
    now[0] = start + 60 * 60_000  # its end: the next page is the sign-in, the session deleted
    resp = await sc.client.get(page, allow_redirects=False)
    assert (resp.status, resp.headers["Location"]) == (303, "/portal/sign-in?ended=1")
    assert not await redis.exists(stored)
    assert (await sign_in(sc.client, key))[0] == page  # signing in again opens a new one


async def test_a_revoked_key_ends_its_sessions(portal: Sidecar) -> None:
    account, key = await portal.account(C)
    _, _ = await sign_in(portal.client, key)
    keys = await portal.admin("GET", f"/accounts/{account}/keys")
    await portal.admin("DELETE", f"/keys/{keys['data'][0]['id']}")
    page = await portal.client.get(f"/portal/accounts/{account}/", allow_redirects=False)
    assert (page.status, page.headers["Location"]) == (303, "/portal/sign-in?ended=1")
    again = await portal.client.get("/portal/sign-in?ended=1")
    assert "sign in again" in text_of(await again.text())


async def test_every_form_needs_the_session_csrf_token_and_this_origin(portal: Sidecar) -> None:
    account, key = await portal.account(C)
    client = portal.client
    _, csrf = await sign_in(client, key)
    cap = {"scope": "account", "period": "day", "limit": "1"}
    for data, headers in (
        (cap, {}),
        ({**cap, "csrf": "not-the-token"}, {}),
        ({**cap, "csrf": csrf}, {"Origin": "https://evil.example"}),
    ):
        resp = await client.post(f"/portal/accounts/{account}/caps", data=data, headers=headers)
        assert resp.status == 403, await resp.text()
        assert "out of date" in text_of(await resp.text())
    assert (await portal.admin("GET", f"/accounts/{account}/caps"))["caps"] == []
    status, _, _ = await post_form(client, f"/portal/accounts/{account}/caps", {**cap, "csrf": csrf})
    assert status == 303
    assert len((await portal.admin("GET", f"/accounts/{account}/caps"))["caps"]) == 1


async def test_another_accounts_data_is_never_reachable(portal: Sidecar) -> None:
    mine, my_key = await portal.account(3 * C)
    other, other_key = await portal.account(7 * C)
    other_doc = await bought(portal, other)
    other_key_id = (await portal.admin("GET", f"/accounts/{other}/keys"))["data"][0]["id"]
    client = portal.client
    _, csrf = await sign_in(client, my_key)
    # URL tampering: every page and download of the other account is a 404, naming nothing of it
    for path in [*PAGES, f"documents/{other_doc}.pdf", f"documents/{other_doc}.csv"]:
        resp = await client.get(f"/portal/accounts/{other}/{path}", allow_redirects=False)
        body = await resp.text()
        assert resp.status == 404, (path, resp.status)
        assert resp.content_type == "text/html"
        assert other_key_id not in body
    forms = {
        "keys": {"name": "mine now"},
        f"keys/{other_key_id}/revoke": {},
        f"keys/{other_key_id}/cap": {"period": "day", "limit": "0"},
        "caps": {"scope": "account", "period": "day", "limit": "0"},
        "contact": {"email": "attacker@example.com"},
        "billing-profile": {"legal_name": "X", "address_lines": "1 St", "city": "C", "postal_code": "1",
                            "country": "DE", "billing_email": "x@example.com"},
        "buy": {"package": "pro"},
        "provider-keys": {"provider": "default", "key": "AIzaAttackersKey0123456789"},
        "provider-keys/lk_0123/delete": {},
    }  # fmt: skip
    for path, data in forms.items():
        status, _, _ = await post_form(client, f"/portal/accounts/{other}/{path}", {**data, "csrf": csrf})
        assert status == 404, path
    # form fields naming the other account's things, on my own pages
    for path, data in (
        (f"keys/{other_key_id}/revoke", {}),
        (f"keys/{other_key_id}/cap", {"period": "day", "limit": "0"}),
        ("caps", {"scope": f"key:{other_key_id}", "period": "day", "limit": "0"}),
    ):
        status, body, _ = await post_form(client, f"/portal/accounts/{mine}/{path}", {**data, "csrf": csrf})
        assert status == 404, (path, status)
        assert "No API key" in text_of(body)
    for path in (f"documents/{other_doc}.pdf", f"documents/{other_doc}.csv"):
        assert (await client.get(f"/portal/accounts/{mine}/{path}")).status == 404
    # an `account` field is no way in: the cap lands on the session's own account
    extra = {"scope": "account", "period": "day", "limit": "2", "account": other, "csrf": csrf}
    assert (await post_form(client, f"/portal/accounts/{mine}/caps", extra))[0] == 303
    assert await works(portal, other_key)
    assert (await portal.admin("GET", f"/accounts/{other}/caps"))["caps"] == []
    assert (await portal.admin("GET", f"/accounts/{other}/contact"))["email"] is None
    assert len((await portal.admin("GET", f"/accounts/{other}/keys"))["data"]) == 1
    assert len((await portal.admin("GET", f"/accounts/{mine}/caps"))["caps"]) == 1


async def test_an_operator_opens_any_account_and_only_existing_ones(portal: Sidecar) -> None:
    one, _ = await portal.account(2 * C, account=f"acme-{uuid.uuid4().hex[:6]}")
    two, _ = await portal.account(9 * C, account=f"acme-{uuid.uuid4().hex[:6]}")
    client = portal.client
    where, _ = await sign_in(client, ADMIN_TOKEN)
    assert where == "/portal/accounts"
    listed = text_of(await (await client.get("/portal/accounts?q=acme-")).text())
    assert one in listed
    assert two in listed
    page = await client.get(f"/portal/accounts/{two}/")
    body = text_of(await page.text())
    assert page.status == 200
    assert "Available 9 credits" in body
    assert "as the operator" in body
    assert (await client.get("/portal/accounts/no-such-account/")).status == 404
    assert (await client.get("/portal/accounts/bad%20id/keys")).status == 404


async def test_operator_sign_in_is_off_without_the_admin_api(make_sidecar: SidecarFactory) -> None:
    sc = await make_sidecar(admin_enabled=False)
    csrf = csrf_of(await (await sc.client.get("/portal/sign-in")).text())
    resp = await sc.client.post("/portal/sign-in", data={"csrf": csrf, "key": ADMIN_TOKEN})
    assert resp.status == 401


async def test_errors_are_pages_and_assets_ship_with_the_package(portal: Sidecar) -> None:
    account, key = await portal.account(C)
    client = portal.client
    await sign_in(client, key)
    missing = await client.get(f"/portal/accounts/{account}/nowhere")
    assert (missing.status, missing.content_type) == (404, "text/html")
    assert "no such page" in text_of(await missing.text())
    html = await (await client.get(f"/portal/accounts/{account}/")).text()
    (css,) = re.findall(r'href="(/portal/static/portal\.[0-9a-f]{12}\.css)"', html)
    asset = await client.get(css)
    assert asset.status == 200
    assert asset.content_type == "text/css"
    assert "immutable" in asset.headers["Cache-Control"]
    assert (await client.get("/portal/static/portal.css")).status == 404  # only by its hashed name
    bare = await client.get("/portal", allow_redirects=False)
    assert (bare.status, bare.headers["Location"]) == (301, "/portal/")


async def test_portal_requests_are_counted_in_the_metrics(portal: Sidecar) -> None:
    account, key = await portal.account(C)
    await sign_in(portal.client, key)  # the form (200), the sign-in (303), the overview (200)
    assert (await portal.client.get(f"/portal/accounts/{account}/keys")).status == 200
    assert (await portal.client.get(f"/portal/accounts/{account}/nowhere")).status == 404
    m = await scrape(portal)
    portal_route = {"route": "portal", "model": "other", "cache": "off"}
    for status_class, count in (("2xx", 3), ("3xx", 1), ("4xx", 1), ("5xx", 0)):
        assert value(m, "creditgate_requests_total", **portal_route, status_class=status_class) == count
    assert value(m, "creditgate_request_duration_seconds_count", route="portal") == 5


async def test_the_portal_is_not_routed_when_off(make_sidecar: SidecarFactory) -> None:
    sc = await make_sidecar(portal_enabled=False)
    resp = await sc.client.get("/portal/sign-in")
    assert resp.status == 404
    assert resp.content_type == "application/json"
