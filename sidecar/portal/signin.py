"""Signing in and out, and where /portal leads. A client key (or, for an operator, the admin token) is
posted once and exchanged for a session; the key itself never reaches the browser again: not in a cookie,
not in a page. The sign-in form has a CSRF token of its own (a cookie it must match, there being no
session yet), so no other site can sign a browser into an account of its choosing."""

from __future__ import annotations

import hmac
import secrets
import time

from aiohttp import web

from ..accounts import KEY_PREFIX, hash_key
from .edge import (
    COOKIE,
    SIGNIN_COOKIE,
    clear_cookie,
    current_session,
    desk,
    operator_sign_in,
    same_origin,
    set_cookie,
    viewer,
)
from .pages import account_url, page

ENDED = "Your session ended (signed out, expired, or its key was revoked): sign in again."
LIMITED = "Too many failed sign-ins from your address: wait a few minutes, then try again."
MAX_SECRET_CHARS = 512
CHECKOUT_RETURNS = {"success": "checkout-success", "canceled": "checkout-canceled"}


async def root(request: web.Request) -> web.StreamResponse:
    """/portal/: the signed-in account's overview (the buy page after a checkout), the operator's picker,
    else the sign-in form."""
    session = await current_session(request)
    if session is None:
        raise web.HTTPSeeOther("/portal/sign-in")
    if session.account is None:
        raise web.HTTPSeeOther("/portal/accounts")
    returned = CHECKOUT_RETURNS.get(request.query.get("checkout", ""))
    if returned:
        raise web.HTTPSeeOther(f"{account_url(session.account, 'buy')}?done={returned}")
    raise web.HTTPSeeOther(account_url(session.account))


def _form(request: web.Request, *, error: str | None = None, status: int = 200) -> web.Response:
    d = desk(request)
    token = secrets.token_urlsafe(24)
    notice = ENDED if request.query.get("ended") else None
    if request.query.get("signed_out"):
        notice = "You are signed out."
    context = {
        "title": "Sign in",
        "signin_csrf": token,
        "error": error,
        "notice": notice,
        "operator_on": operator_sign_in(d),
    }
    html = d.templates.render("sign_in.html", context)
    response = web.Response(text=html, status=status, content_type="text/html")
    set_cookie(response, request, SIGNIN_COOKIE, token)
    return response


async def sign_in_form(request: web.Request) -> web.StreamResponse:
    if await current_session(request) is not None:
        raise web.HTTPSeeOther("/portal/")
    return _form(request)


async def sign_in(request: web.Request) -> web.StreamResponse:
    d = desk(request)
    form = await request.post()
    presented, expected = form.get("csrf"), request.cookies.get(SIGNIN_COOKIE, "")
    if (
        not same_origin(request)
        or not isinstance(presented, str)
        or not expected
        or not hmac.compare_digest(presented.encode(), expected.encode())
    ):
        return _form(request, error="The sign-in form was out of date: try again.", status=403)
    secret = form.get("key")
    secret = secret.strip() if isinstance(secret, str) else ""
    if not secret or len(secret) > MAX_SECRET_CHARS or not secret.isascii():
        return _form(request, error="Enter an API key.", status=400)
    now_ms = d.now_ms()
    attempt = await d.attempts.reserve(request.remote, now_ms)
    if d.attempts.limited(attempt):  # the secret is not even checked
        response = _form(request, error=LIMITED, status=429)
        response.headers["Retry-After"] = str(d.attempts.retry_after(attempt, now_ms))
        return response
    token = d.settings.admin_token
    if operator_sign_in(d) and token and hmac.compare_digest(secret.encode(), token.encode()):
        cookie, _ = await d.sessions.open(None, "", now_ms)
        target = "/portal/accounts"
    else:
        key_hash = hash_key(secret)
        caller = (
            await d.services.accounts.caller_for_hash(key_hash, time.monotonic(), now_ms)
            if secret.startswith(KEY_PREFIX)
            else None
        )
        if caller is None:
            return _form(request, error="That key is not valid: unknown, revoked or expired.", status=401)
        cookie, _ = await d.sessions.open(caller.account, key_hash, now_ms)
        target = account_url(caller.account)
    await d.attempts.succeeded(attempt)
    response = web.HTTPSeeOther(target)
    set_cookie(response, request, COOKIE, cookie)
    clear_cookie(response, SIGNIN_COOKIE)
    raise response


async def sign_out(request: web.Request) -> web.StreamResponse:
    await desk(request).sessions.close(viewer(request).session)
    response = web.HTTPSeeOther("/portal/sign-in?signed_out=1")
    clear_cookie(response, COOKIE)
    raise response


async def accounts(request: web.Request) -> web.StreamResponse:
    """The operator's picker: accounts by id prefix. A customer goes to its own account."""
    v = viewer(request)
    if v.session.account is not None:
        raise web.HTTPSeeOther(account_url(v.session.account))
    query = request.query.get("q", "").strip()[:64]
    found = await desk(request).find_accounts(query)
    return await page(request, "accounts.html", title="Accounts", query=query, found=found)
