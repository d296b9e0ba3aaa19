"""The portal's tests share these: signing a test client in (the sign-in form's CSRF cookie and field, as
a browser sends them), the CSRF token of the page just read, and the text of a page without its tags."""

from __future__ import annotations

import html
import re
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestClient

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
