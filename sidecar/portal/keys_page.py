"""API keys: the account's keys (revoked ones too), a new key (shown once, on the page its form redirects
to, and never again: a reload of that page creates nothing and shows nothing), a name, revocation, and
each key's spend caps. Through the same objects as the admin API (`AdminOps.create_key`, `revoke_key`)
and /v1/credits/keys (`KeyOps`, `CapOps`); a key id from a form is always checked to be the page's
account's before anything is done with it."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from ..caps import CapBody
from ..errors import CreditgateError, NotFound
from ..keys_api import KeyBody, new_key_terms
from ..responses import status_of
from ..wallet import PERIODS
from . import forms
from .edge import COOKIE, clear_cookie, desk, viewer
from .pages import done, form_data, form_error, page
from .sessions import NewKey


async def keys_view(request: web.Request, *, status: int = 200, **extra: Any) -> web.Response:
    d = desk(request)
    listed = await d.wallet.key_ops.list_keys(viewer(request).of())
    live = [k for k in listed["data"] if not k["revoked"]]
    revoked = [k for k in listed["data"] if k["revoked"]]
    context: dict[str, Any] = {"new_key": None, "form": {}, **extra}
    return await page(
        request,
        "keys.html",
        active="keys",
        title="API keys",
        status=status,
        live=live,
        revoked=revoked,
        periods=PERIODS,
        **context,
    )


async def keys(request: web.Request) -> web.StreamResponse:
    """The list, and a key just made by this session, if this is the first page since (sessions.py)."""
    made = await desk(request).sessions.take_new_key(request.cookies.get(COOKIE, ""))
    return await keys_view(request, new_key=made)


async def _own_key(request: web.Request) -> Any:
    """The key the URL names, if it is the page's account's (else as unknown as a key that is not)."""
    key_id = request.match_info["key_id"]
    row = await desk(request).key_store.key(key_id) if len(key_id) <= 64 else None
    if row is None or row.account != viewer(request).of():
        raise NotFound(f"No API key {key_id!r} in this account.", param="key_id")
    return row


async def create_key(request: web.Request) -> web.StreamResponse:
    d = desk(request)
    account = viewer(request).of()
    form = await form_data(request)
    try:
        name = forms.text(form, "name", longest=100)
        expires = forms.day(form, "expires_on")
        body = KeyBody(name=name, expires_at=forms.end_of_day_iso(expires) if expires else None)
        name, expires_ms = new_key_terms(body, d.now_ms())
        made = await d.admin.create_key(account, name, expires_ms)
    except CreditgateError as err:
        err.param = "expires_on" if err.param == "expires_at" else err.param  # the form's field
        return await keys_view(request, status=status_of(err), form=form, **form_error(err))
    # Post/Redirect/Get: the key waits, sealed, for the one page that shows it; never in a URL.
    kept = NewKey(id=made["id"], name=made["name"], key=made["key"])
    await d.sessions.keep_new_key(request.cookies.get(COOKIE, ""), kept)
    raise done(account, "keys", "key-created")


async def revoke_key(request: web.Request) -> web.StreamResponse:
    d = desk(request)
    v = viewer(request)
    try:
        row = await _own_key(request)
    except CreditgateError as err:
        return await keys_view(request, status=status_of(err), **form_error(err))
    await d.admin.revoke_key(row.key_id)
    if row.key_hash == v.session.key_hash:  # the key this session was opened with: the session ends
        await d.sessions.close(v.session)
        response = web.HTTPSeeOther("/portal/sign-in?ended=1")
        clear_cookie(response, COOKIE)
        raise response
    raise done(v.of(), "keys", "key-revoked")


async def rename_key(request: web.Request) -> web.StreamResponse:
    d = desk(request)
    account = viewer(request).of()
    form = await form_data(request)
    try:
        row = await _own_key(request)
        name = forms.text(form, "name", longest=100)
        await d.wallet.key_ops.update_key(row.key_id, KeyBody(name=name), account=account)
    except CreditgateError as err:
        return await keys_view(request, status=status_of(err), form=form, **form_error(err))
    raise done(account, "keys", "key-renamed")


async def key_cap(request: web.Request) -> web.StreamResponse:
    d = desk(request)
    account = viewer(request).of()
    form = await form_data(request)
    try:
        row = await _own_key(request)
        period = forms.choice(form, "period", PERIODS)
        limit = forms.credits(form, "limit", positive=False)
        await d.wallet.caps.set_cap(account, CapBody(scope=f"key:{row.key_id}", period=period, limit=limit))
    except CreditgateError as err:
        return await keys_view(request, status=status_of(err), form=form, **form_error(err))
    raise done(account, "keys", "cap-set")
