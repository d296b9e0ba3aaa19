"""The portal's limit on failed sign-ins over real HTTP and Redis: past `portal_signin_attempts`
failures from one client address in a window the sign-in page answers 429 (a message on the page, a
Retry-After) without checking the key, the admin token counted the same; another address is untouched
(its requests come from 127.0.0.2, the loopback being all of 127/8); a good sign-in under the limit
works and counts nothing; the window ends by the app's clock, moved by the test."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from sidecar.config import load_settings
from sidecar.portal.desk import DESK

from .conftest import ADMIN_TOKEN, Sidecar, SidecarFactory
from .support_portal import csrf_of, text_of

C = 1_000_000
LIMIT = 3
WINDOW_MS = 60_000
START_MS = 30_000 * WINDOW_MS  # the app's clock, at the start of a window
LIMITED = "Too many failed sign-ins from your address"


@pytest.fixture
async def portal(make_sidecar: SidecarFactory) -> tuple[Sidecar, list[int]]:
    sc = await make_sidecar(portal_signin_attempts=LIMIT, portal_signin_window_seconds=WINDOW_MS // 1000)
    now = [START_MS]
    sc.balances.wallet = dataclasses.replace(sc.balances.wallet, clock=lambda: now[0])
    return sc, now


@pytest.fixture
async def elsewhere(portal: tuple[Sidecar, list[int]]) -> AsyncIterator[aiohttp.ClientSession]:
    """A browser at another client address (127.0.0.2) on the same portal."""
    sc, _ = portal
    session = aiohttp.ClientSession(
        base_url=str(sc.client.make_url("")),
        connector=aiohttp.TCPConnector(local_addr=("127.0.0.2", 0)),
        cookie_jar=aiohttp.CookieJar(unsafe=True),
    )
    async with session:
        yield session


async def attempt(client: Any, secret: str) -> tuple[int, str, Any]:
    """One sign-in from `client`'s address: (status, the page's words, the response)."""
    form = await client.get("/portal/sign-in")
    assert form.status == 200
    resp = await client.post(
        "/portal/sign-in", data={"csrf": csrf_of(await form.text()), "key": secret}, allow_redirects=False
    )
    return resp.status, text_of(await resp.text()), resp


def test_the_limit_defaults_to_ten_failures_in_ten_minutes() -> None:
    settings = load_settings(environ={})
    assert (settings.portal_signin_attempts, settings.portal_signin_window_seconds) == (10, 600)


async def test_past_the_limit_even_a_good_key_gets_429(portal: tuple[Sidecar, list[int]]) -> None:
    sc, now = portal
    account, key = await sc.account(C)
    for _ in range(LIMIT):
        status, words, _ = await attempt(sc.client, "cgk-not-a-key")
        assert (status, "That key is not valid" in words) == (401, True)
    now[0] = START_MS + 15_500  # 44.5 s of the window left
    status, words, resp = await attempt(sc.client, key)
    assert status == 429
    assert LIMITED in words
    assert "That key is not valid" not in words
    assert resp.headers["Retry-After"] == "45"
    assert not [h for h in resp.headers.getall("Set-Cookie", []) if h.startswith("creditgate_portal=")]
    page = await sc.client.get(f"/portal/accounts/{account}/", allow_redirects=False)
    assert page.status == 303  # still no session
    now[0] = START_MS + WINDOW_MS  # the next window: the key signs in again
    status, _, resp = await attempt(sc.client, key)
    assert (status, resp.headers["Location"]) == (303, f"/portal/accounts/{account}/")


async def test_the_admin_token_counts_the_same(portal: tuple[Sidecar, list[int]]) -> None:
    sc, _ = portal
    for _ in range(LIMIT):
        assert (await attempt(sc.client, "wrong-admin-token"))[0] == 401
    status, words, resp = await attempt(sc.client, ADMIN_TOKEN)
    assert (status, LIMITED in words, "Retry-After" in resp.headers) == (429, True, True)


async def test_the_limit_is_per_address(
    portal: tuple[Sidecar, list[int]], elsewhere: aiohttp.ClientSession
) -> None:
    sc, _ = portal
    account, key = await sc.account(C)
    for _ in range(LIMIT):
        assert (await attempt(sc.client, "cgk-not-a-key"))[0] == 401
    status, _, resp = await attempt(elsewhere, key)  # another address: not limited
    assert (status, resp.headers["Location"]) == (303, f"/portal/accounts/{account}/")
    counts = sc.client.app[DESK].attempts
    assert await counts.failures("127.0.0.2", START_MS) == 0
    assert await counts.failures("127.0.0.1", START_MS) == LIMIT  # its sign-in reset nothing here
    assert (await attempt(sc.client, key))[0] == 429
    elsewhere.cookie_jar.clear()  # signed out, as a new browser there
    for _ in range(LIMIT - 1):
        assert (await attempt(elsewhere, "cgk-not-a-key"))[0] == 401
    assert (await attempt(elsewhere, key))[0] == 303  # its own count: LIMIT - 1 failures


async def test_a_good_sign_in_under_the_limit_works_and_counts_nothing(
    portal: tuple[Sidecar, list[int]],
) -> None:
    sc, _ = portal
    account, key = await sc.account(C)
    for _ in range(LIMIT - 1):
        assert (await attempt(sc.client, "cgk-not-a-key"))[0] == 401
    for _ in range(3):  # good sign-ins, however many, are no failures
        status, _, resp = await attempt(sc.client, key)
        assert (status, resp.headers["Location"]) == (303, f"/portal/accounts/{account}/")
        page = await sc.client.get(resp.headers["Location"])
        assert page.status == 200
        out = await sc.client.post("/portal/sign-out", data={"csrf": csrf_of(await page.text())})
        assert out.status == 200  # followed to the sign-in form
    assert await sc.client.app[DESK].attempts.failures("127.0.0.1", START_MS) == LIMIT - 1
    assert (await attempt(sc.client, "cgk-not-a-key"))[0] == 401  # the LIMIT-th failure
    assert (await attempt(sc.client, key))[0] == 429
