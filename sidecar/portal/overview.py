"""The overview: balance, held, available; credits by kind and what expires when; the run-out forecast;
usage today and this month with what the response cache saved. All from `CreditReads.summary`, the
same figures as GET /v1/credits/summary."""

from __future__ import annotations

from aiohttp import web

from ..credits_api import CreditReads
from .edge import desk, viewer
from .pages import page

KINDS = {
    "purchase": "Purchased",
    "starter": "Starter",
    "promotion": "Promotion",
    "bonus": "Bonus",
    "subscription": "Subscription",
    "refund": "Refunded",
    "adjustment": "Adjustment",
    "grant": "Granted",
}


async def overview(request: web.Request) -> web.StreamResponse:
    d = desk(request)
    account = viewer(request).of()
    summary = await CreditReads(d.services).summary(account, d.now_ms())
    return await page(request, "overview.html", active="overview", title="Overview", s=summary, kinds=KINDS)
