"""The portal's tests share these: signing a test client in (the sign-in form's CSRF cookie and field, as
a browser sends them), the CSRF token of the page just read, and the text of a page without its tags."""

from __future__ import annotations

import asyncio
import html
import re
from typing import Any

import msgspec
from aiohttp import web
from aiohttp.test_utils import TestClient

from sidecar.app import PROXY
from sidecar.outbox import UsageEvent, encode_event, ledger_row

from .conftest import Sidecar

Client = TestClient[web.Request, web.Application]
_CSRF = re.compile(r'name="csrf" value="([^"]+)"')
_TAGS = re.compile(r"<[^>]+>")


def csrf_of(page: str) -> str:
    found = _CSRF.search(page)
    assert found, "the page has no form with a CSRF token"
    return found.group(1)


def text_of(page: str) -> str:
    """The page's words, tags removed and whitespace folded (what a reader sees)."""
    return " ".join(html.unescape(_TAGS.sub(" ", page)).split())


async def sign_in(client: Client, secret: str) -> tuple[str, str]:
    """Sign in with a client key or the admin token; (the page signed in to, the session's CSRF token)."""
    form = await client.get("/portal/sign-in")
    assert form.status == 200, await form.text()
    resp = await client.post(
        "/portal/sign-in", data={"csrf": csrf_of(await form.text()), "key": secret}, allow_redirects=False
    )
    assert resp.status == 303, await resp.text()
    location = resp.headers["Location"]
    page = await client.get(location)
    body = await page.text()
    assert page.status == 200, body
    return location, csrf_of(body)


async def post_form(client: Client, path: str, data: dict[str, Any]) -> tuple[int, str, str | None]:
    """POST a portal form (not following its redirect): (status, body, Location)."""
    resp = await client.post(path, data=data, allow_redirects=False)
    return resp.status, await resp.text(), resp.headers.get("Location")


async def usage_rows(sc: Sidecar, account: str, *events: UsageEvent) -> None:
    """Usage rows written as the flusher writes them (one statement with their roll-ups): past days'
    usage without running requests then."""
    rows = []
    for e in events:
        e.account = account
        rows.append(ledger_row({"d": encode_event(e)}, f"{e.settled_ms}-0"))
    await sc.services.store.insert_usage(rows)


async def chat(sc: Sidecar, key: str, text: str = "hello world", **headers: str) -> int:
    """One chat request through the sidecar (temperature 0: an identical one is a cache hit), settled and
    flushed to the ledger before this returns; its status."""
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": text}], "temperature": 0}
    resp = await sc.client.post(
        "/v1/chat/completions",
        data=msgspec.json.encode(body),
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json", **headers},
    )
    await resp.read()
    in_flight = set(sc.client.app[PROXY].in_flight)
    if in_flight:
        await asyncio.wait(in_flight)
    await sc.services.flusher().drain()
    return resp.status
