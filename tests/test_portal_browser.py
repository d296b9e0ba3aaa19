"""The billing portal in a real browser: Playwright driving Debian's Chromium (/usr/bin/chromium) against a
real creditgate on real Redis and Postgres over real HTTP. One browser for the module, one page reused.

A person signs in (by keyboard), sees the balance, makes an API call and sees the balance and the chart
change, downloads the CSV and it sums to the balance, buys a package through the fake Stripe and sees the
grant once its webhook came, creates and revokes a key, stores a provider key, sets a cap and gets a 402
from the API, and signs out. Every page is photographed at 360 and 1440 px (saved under
$CREDITGATE_ARTIFACTS, else tests/artifacts), must not be wider than the window, and axe-core (vendored)
finds no serious or critical violation in it. CREDITGATE_WRITE_DOCS=1 also writes the README's picture,
docs/portal-overview.png."""

from __future__ import annotations

import asyncio
import csv
import io
import os
import re
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from playwright.async_api import Browser, Page, Route, async_playwright

from .conftest import Sidecar, SidecarFactory
from .support_portal import chat
from .support_stripe import FakeStripe, event, post_event, stripe_settings
from .support_stripe import fake_stripe as fake_stripe  # the fixture
from .support_vault import MASTER, VAULT_KEY

CHROMIUM = "/usr/bin/chromium"
HERE = Path(__file__).parent
AXE_VERSION = "4.14.1"
AXE = HERE / "vendor" / "axe-core" / "axe.min.js"
WIDTHS = (360, 1440)
C = 1_000_000

if not Path(CHROMIUM).exists():
    if os.environ.get("CI") == "true":
        raise RuntimeError(
            f"{CHROMIUM} is missing; with CI=true the browser tests need it (.ci/run installs it)"
        )
    pytest.skip(f"no {CHROMIUM} (apt-get install chromium)", allow_module_level=True)


def artifacts() -> Path:
    where = Path(os.environ.get("CREDITGATE_ARTIFACTS") or HERE / "artifacts") / "portal"
    where.mkdir(parents=True, exist_ok=True)
    return where


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as p:
        launched = await p.chromium.launch(executable_path=CHROMIUM)
        try:
            yield launched
        finally:
            await launched.close()


class Looker:
    """Checks each page as a person would see it: at each width a screenshot, no sideways scrolling, and
    axe's scan (serious and critical violations fail)."""

    def __init__(self, page: Page) -> None:
        self.page = page
        self.seen: list[str] = []
        self.axe = AXE.read_text()
        assert f"axe v{AXE_VERSION}" in self.axe[:100]

    async def check(self, name: str) -> None:
        page = self.page
        for width in WIDTHS:
            await page.set_viewport_size({"width": width, "height": 900})
            shot = artifacts() / f"{name}-{width}.png"
            await page.screenshot(path=str(shot), full_page=True)
            scroll, inner = await page.evaluate("[document.documentElement.scrollWidth, window.innerWidth]")
            assert scroll <= inner, f"{name} is {scroll} px wide in a {inner} px window ({shot})"
            if not await page.evaluate("typeof axe !== 'undefined'"):
                await page.evaluate(self.axe)
            found = await page.evaluate(
                "async () => (await axe.run(document, {resultTypes: ['violations']})).violations"
                ".map(v => ({id: v.id, impact: v.impact, nodes: v.nodes.map(n => n.target.join(' '))}))"
            )
            bad = [v for v in found if v["impact"] in ("serious", "critical")]
            assert not bad, f"{name} at {width} px: {bad}"
        self.seen.append(name)


async def go(page: Page, name: str) -> None:
    """Follow the account navigation's link to the page `name`."""
    nav = page.get_by_role("navigation", name="Account pages")
    await nav.get_by_role("link", name=name, exact=True).click()


async def figure(page: Page, element: str) -> int:
    return int(await page.get_attribute(f"#{element}", "data-micro") or "x")


async def api_status(sc: Sidecar, key: str, path: str = "/v1/credits/summary") -> int:
    resp = await sc.client.get(path, headers={"Authorization": f"Bearer {key}"})
    return resp.status


async def test_a_customer_uses_the_portal_in_a_browser(
    make_sidecar: SidecarFactory, fake_stripe: FakeStripe, browser: Browser
) -> None:
    sc = await make_sidecar(**stripe_settings(fake_stripe), vault_master_key=MASTER)
    account, key = await sc.account(10 * C)
    base = str(sc.client.make_url("")).rstrip("/")
    context = await browser.new_context(viewport={"width": 1440, "height": 900}, accept_downloads=True)
    page = await context.new_page()
    look = Looker(page)

    # sign in, by keyboard: the skip link first, then the field, Enter sends
    await page.goto(f"{base}/portal")
    assert page.url == f"{base}/portal/sign-in"
    await look.check("sign-in")
    await page.keyboard.press("Tab")
    assert await page.evaluate("document.activeElement.textContent") == "Skip to content"
    await page.get_by_label("API key or admin token").focus()
    await page.keyboard.type(key)
    await page.keyboard.press("Enter")
    await page.wait_for_url(f"{base}/portal/accounts/{account}/")
    assert await figure(page, "balance") == 10 * C
    assert key not in await page.content()
    assert key not in str(await context.cookies())

    # an API call: the balance and the chart change
    await go(page, "Usage")
    assert await page.locator("#usage-chart rect").count() == 0
    assert await chat(sc, key) == 200
    await page.reload()
    bars = page.locator("#usage-chart rect[data-series='gpt-4o-mini']")
    assert await bars.count() == 1
    spent = int(await bars.first.get_attribute("data-micro") or "0")
    assert spent > 0
    await look.check("usage")
    await go(page, "Overview")
    assert await figure(page, "balance") == 10 * C - spent

    # the history's CSV sums to the balance
    await go(page, "History")
    await look.check("history")
    async with page.expect_download() as download_info:
        await page.get_by_role("link", name="Download as CSV").click()
    download = await download_info.value
    saved = await download.path()
    text = await asyncio.to_thread(saved.read_text)
    shutil.copy(await download.path(), artifacts() / "statement.csv")
    rows = list(csv.DictReader(io.StringIO(text)))
    assert sum(int(r["amount"]) for r in rows) == (await sc.balance(account))["balance"] == 10 * C - spent

    # buy a package: to the provider's page (faked here), paid, its webhook; then the grant shows
    async def provider_page(route: Route) -> None:
        await route.fulfill(
            content_type="text/html",
            body="<!doctype html><title>Pay</title><main><h1>Fake Stripe Checkout</h1></main>",
        )

    await page.route("https://checkout.stripe.test/**", provider_page)
    await go(page, "Buy credits")
    await look.check("buy")
    await page.get_by_role("button", name=re.compile("^Buy Starter")).click()
    await page.wait_for_url(re.compile(r"https://checkout\.stripe\.test/c/pay/"))
    session_id = page.url.rsplit("/", 1)[1]
    status, body = await post_event(
        sc.client, event("checkout.session.completed", fake_stripe.pay(session_id))
    )
    assert (status, body["outcome"]) == (200, "landed")
    await page.goto(f"{base}/portal?checkout=success")  # where the provider sends the buyer back
    assert page.url == f"{base}/portal/accounts/{account}/buy?done=checkout-success"
    assert await page.locator("#orders .status-paid").count() == 1
    await go(page, "Overview")
    assert await figure(page, "balance") == 1010 * C - spent
    await look.check("overview")
    if os.environ.get("CREDITGATE_WRITE_DOCS") == "1":
        await page.set_viewport_size({"width": 1440, "height": 900})
        await page.screenshot(path=str(HERE.parent / "docs" / "portal-overview.png"))

    # a key: made and shown once, works, revoked, refused
    await go(page, "API keys")
    await page.get_by_label("Name (optional)").fill("browser")
    await page.get_by_role("button", name="Create key").click()
    new_key = await page.input_value("#new-key")
    assert new_key.startswith("cgk-")
    await look.check("keys")
    assert await api_status(sc, new_key) == 200
    await go(page, "API keys")
    assert new_key not in await page.content()
    await page.get_by_role("button", name="Revoke key browser").click()
    assert "The key is revoked" in await page.inner_text("main")
    assert await api_status(sc, new_key) == 401

    # a provider key: stored in the vault, listed by its last four characters only
    await go(page, "Provider keys")
    await page.get_by_label("Key", exact=True).fill(VAULT_KEY)
    await page.get_by_label("Label (optional)").fill("mine")
    await page.get_by_role("button", name="Add key").click()
    assert "The provider key is stored" in await page.inner_text("main")
    assert await page.locator("#provider-keys tbody tr").count() == 1
    assert f"…{VAULT_KEY[-4:]}" in await page.inner_text("#provider-keys")
    assert VAULT_KEY not in await page.content()
    await look.check("provider-keys")

    # a cap of 0 a day: the API refuses the next request with a 402
    await go(page, "Settings")
    await page.get_by_label("Limit in credits").fill("abc")
    await page.get_by_role("button", name="Set cap").click()
    assert "Nothing was changed" in await page.inner_text("main")  # bad input: a message, no cap
    assert await page.get_attribute("#cap-limit", "aria-invalid") == "true"
    await page.get_by_label("Limit in credits").fill("0")
    await page.get_by_role("button", name="Set cap").click()
    assert "The spend cap is saved" in await page.inner_text("main")
    await look.check("settings")
    assert await chat(sc, key, "capped") == 402

    await go(page, "Documents")
    assert await page.locator("#documents tr[data-doc]").count() == 1  # the purchase's receipt
    await look.check("documents")

    # sign out: the session is gone, its pages lead to the sign-in
    await page.get_by_role("button", name="Sign out").click()
    await page.wait_for_url(f"{base}/portal/sign-in?signed_out=1")
    assert "You are signed out." in await page.inner_text("main")
    await page.goto(f"{base}/portal/accounts/{account}/")
    assert page.url.startswith(f"{base}/portal/sign-in")
    assert look.seen == [
        "sign-in",
        "usage",
        "history",
        "buy",
        "overview",
        "keys",
        "provider-keys",
        "settings",
        "documents",
    ]
    await context.close()
