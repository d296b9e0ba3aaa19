"""History: the account's statement page by page, newest first, filtered by kind and dates, and the CSV
download of the same range, both by `CreditReads` (what GET /v1/credits/history and its format=csv
answer). The page's dates are whole UTC days, both inclusive."""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from urllib.parse import urlencode

from aiohttp import web

from ..credit_params import LEDGER_KINDS, HistoryQuery
from ..credits_api import CreditReads
from ..errors import BadRequest
from .edge import desk, viewer
from .pages import form_error, page

PAGE_SIZE = 50


def api_query(query: Mapping[str, str], *, csv: bool = False) -> dict[str, str]:
    """The page's filters as the history API's parameters: `to` is the day after the last one shown."""
    out: dict[str, str] = {"limit": str(PAGE_SIZE)}
    kind = query.get("kind", "")
    if kind:
        out["kind"] = kind
    for name in ("from", "to"):
        raw = query.get(name, "").strip()
        if not raw:
            continue
        try:
            day = dt.date.fromisoformat(raw)
        except ValueError:
            raise BadRequest(f"{name} must be a date (YYYY-MM-DD).", param=name) from None
        out[name] = (day + dt.timedelta(days=1) if name == "to" else day).isoformat()
    if "from" in out and "to" in out and out["from"] >= out["to"]:
        raise BadRequest("from must not be after to.", param="from")
    if query.get("cursor") and not csv:
        out["cursor"] = query["cursor"]
    if csv:
        out["format"] = "csv"
        del out["limit"]
    return out


def filters(query: Mapping[str, str]) -> dict[str, str]:
    return {k: query[k] for k in ("kind", "from", "to") if query.get(k)}


async def history(request: web.Request) -> web.StreamResponse:
    d = desk(request)
    account = viewer(request).of()
    chosen = filters(request.query)
    shown: dict[str, object] = {"data": [], "has_more": False, "next_cursor": None}
    problem: dict[str, object] = {}
    status = 200
    try:
        q = HistoryQuery.parse(api_query(request.query), d.now())
        shown = await CreditReads(d.services).history(account, q)
    except BadRequest as err:
        problem, status = form_error(err), 400
    cursor = shown.get("next_cursor")
    older = f"?{urlencode({**chosen, 'cursor': cursor})}" if isinstance(cursor, str) else None
    return await page(
        request,
        "history.html",
        active="history",
        title="History",
        status=status,
        entries=shown["data"],
        older=older,
        paged="cursor" in request.query,
        newest=f"?{urlencode(chosen)}",
        csv=f"history.csv?{urlencode(chosen)}",
        chosen=chosen,
        kinds=LEDGER_KINDS,
        **problem,
    )


async def history_csv(request: web.Request) -> web.StreamResponse:
    d = desk(request)
    account = viewer(request).of()
    q = HistoryQuery.parse(api_query(request.query, csv=True), d.now())
    return await CreditReads(d.services).statement(request, account, q)
