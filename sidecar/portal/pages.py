"""What every account page shares: its layout's context (the viewer, the CSRF token, the navigation), the
in-app warnings shown on each page, and the notice a finished form leaves (`?done=<what>`, after its
redirect: a fixed text per name, so a link can never put words of its own on the page)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

from aiohttp import web

from ..errors import CreditgateError
from ..metering import meters_store
from ..metering.meters_runway import cost_ahead
from ..signals import alert_rules
from .edge import desk, viewer
from .render import credits

NOTICES = {
    "key-created": "The key is created. Its secret is shown only once, on the first page after it was made.",
    "key-revoked": "The key is revoked: it no longer works anywhere.",
    "key-renamed": "The key's name is saved.",
    "provider-key-added": "The provider key is stored: requests to that provider now go out with it.",
    "provider-key-replaced": "The provider key is replaced: requests to that provider now use the new one.",
    "provider-key-deleted": "The provider key is deleted from the vault.",
    "cap-set": "The spend cap is saved; it applies to the next request.",
    "cap-deleted": "The spend cap is removed.",
    "zone-set": "The time zone is saved.",
    "alerts-set": "The alert rules are saved.",
    "reload-set": "The auto-reload settings are saved.",
    "contact-set": "The contact address is saved.",
    "profile-set": "The billing profile is saved.",
    "checkout-success": "Payment received by the provider. Your credits appear here as soon as it "
    "confirms the payment, usually within seconds.",
    "checkout-canceled": "The checkout was canceled; nothing was charged.",
}


@dataclass(frozen=True, slots=True)
class Banner:
    level: str  # "warning" or "danger"
    text: str


def account_url(account: str, page: str = "") -> str:
    return f"/portal/accounts/{account}/{page}"


def done(account: str, page: str, what: str, **query: str) -> web.HTTPSeeOther:
    """The redirect after a form that worked (Post/Redirect/Get), with its notice."""
    return web.HTTPSeeOther(f"{account_url(account, page)}?{urlencode({'done': what, **query})}")


async def warnings(request: web.Request, account: str) -> list[Banner]:
    """The banners: no credits left; the balance under one of the account's low-balance thresholds;
    recurring charges with less than 48 hours of runway."""
    d = desk(request)
    view = await d.services.balances.balance(account)
    out: list[Banner] = []
    async with d.services.store.pool.acquire() as conn:
        signals = (await d.signals.accounts(conn, [account])).get(account)
        meters = await meters_store.live_of(conn, [account])
    if view.balance <= 0:
        out.append(Banner("danger", "No credits left: new requests are refused (402) until you buy more."))
    elif signals is not None:
        limits = [
            alert_rules.threshold(r, signals.last_top_up)
            for r in signals.rules
            if r.kind in alert_rules.LOW_KINDS
        ]
        under = [t for t in limits if t is not None and view.balance < t]
        if under:
            out.append(
                Banner(
                    "warning",
                    f"Your balance of {credits(view.balance)} credits is below your alert threshold of "
                    f"{credits(max(under))} credits.",
                )
            )
    cost = cost_ahead(meters, d.now_ms())
    if cost > 0 and view.available < cost:
        out.append(
            Banner(
                "danger",
                f"Recurring charges need {credits(cost)} credits in the next 48 hours; "
                f"{credits(view.available)} are available. Buy credits to keep them running.",
            )
        )
    return out


async def page(
    request: web.Request, template: str, *, active: str = "", status: int = 200, **context: Any
) -> web.Response:
    """An account page (or the picker, without an account) rendered with the layout's context."""
    v = viewer(request)
    d = desk(request)
    banners = await warnings(request, v.account) if v.account else []
    base = {
        "viewer": v,
        "account": v.account,
        "csrf": v.csrf,
        "active": active,
        "banners": banners,
        "notice": NOTICES.get(request.query.get("done", "")),
    }
    html = d.templates.render(template, {**base, **context})
    return web.Response(text=html, status=status, content_type="text/html")


def form_error(err: CreditgateError) -> dict[str, Any]:
    """A form's error as the page shows it: the message, and the field it names (highlighted)."""
    return {"error": err.message, "field": err.param}


async def form_data(request: web.Request) -> dict[str, str]:
    """The POSTed form's text fields (the edge has read and checked it already)."""
    return {k: v for k, v in (await request.post()).items() if isinstance(v, str)}
