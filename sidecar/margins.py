"""GET /admin/margins: what the metered requests of a time range brought in (their charges), what their
providers charge the operator for them (the usage rows' `cost`), and the margin, by model, upstream or
account (README "Provider costs and margins").

A row whose cost is unknown (no cost profile, or a 200 that reported no usage) is counted apart, and its
revenue is left out of the margin, so the margin is never overstated by work whose cost was not seen.
The rows are read from the ledger itself, by time (partition pruning and the BRIN index on created_at):
an operator's report, not a figure to poll.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import asyncpg
import msgspec
from aiohttp import web

from .config import Settings
from .credit_params import time_range
from .errors import BadRequest
from .features import Feature, Running
from .money import format_credits
from .wire import ROUTES

GROUPS = {"model": "model", "upstream": "provider", "account": "account_id"}
ROUTE_KINDS = sorted({route.kind for route in ROUTES.values()})  # the proxied routes (no meters)
DEFAULT_LIMIT, MAX_LIMIT = 100, 1000

_SUMS = """count(*)::bigint AS requests, coalesce(sum(-amount), 0)::bigint AS revenue,
        coalesce(sum(-amount) FILTER (WHERE cost IS NOT NULL), 0)::bigint AS costed_revenue,
        coalesce(sum(cost), 0)::bigint AS cost,
        count(*) FILTER (WHERE cost IS NULL)::bigint AS unknown_requests,
        coalesce(sum(-amount) FILTER (WHERE cost IS NULL), 0)::bigint AS unknown_revenue"""
_TOTALS = ", ".join(
    f"sum({c})::bigint"
    for c in ("requests", "revenue", "costed_revenue", "cost", "unknown_requests", "unknown_revenue")
)

# One statement (one snapshot): the top `limit` groups by revenue, and the totals over every group.
_MARGINS = f"""
WITH groups AS (
    SELECT {{}} AS value, {_SUMS}
    FROM ledger
    WHERE kind = 'usage' AND route = ANY($3::text[]) AND created_at >= $1 AND created_at < $2
    GROUP BY 1
)
(SELECT false AS total, * FROM groups ORDER BY revenue DESC, value LIMIT $4)
UNION ALL
(SELECT true, NULL, {_TOTALS} FROM groups)
"""


@dataclass(frozen=True, slots=True)
class MarginQuery:
    group_by: str
    start: dt.datetime
    to: dt.datetime
    limit: int

    @classmethod
    def parse(cls, query: Mapping[str, str], now: dt.datetime) -> MarginQuery:
        group_by = query.get("group_by", "model")
        if group_by not in GROUPS:
            raise BadRequest(f"group_by must be one of {', '.join(GROUPS)}.", param="group_by")
        start, to = time_range(query, now)
        text = query.get("limit", str(DEFAULT_LIMIT))
        if not (text.isascii() and text.isdigit()) or not 1 <= int(text) <= MAX_LIMIT:
            raise BadRequest(f"limit must be an integer from 1 to {MAX_LIMIT}.", param="limit")
        return cls(group_by, start, to, int(text))


def _money(out: dict[str, Any], name: str, micro: int) -> None:
    out[name] = micro
    out[f"{name}_credits"] = format_credits(micro)


def _figures(r: Any) -> dict[str, Any]:
    """A group's figures: revenue (every charge), cost and margin over the rows whose cost is known, and
    the rows whose cost is not (their revenue is in `revenue`, never in `margin`)."""
    out: dict[str, Any] = {"requests": int(r["requests"])}
    _money(out, "revenue", int(r["revenue"]))
    _money(out, "cost", int(r["cost"]))
    _money(out, "margin", int(r["costed_revenue"]) - int(r["cost"]))
    costed = {"requests": int(r["requests"]) - int(r["unknown_requests"])}
    _money(costed, "revenue", int(r["costed_revenue"]))
    unknown = {"requests": int(r["unknown_requests"])}
    _money(unknown, "revenue", int(r["unknown_revenue"]))
    out["cost_known"], out["cost_unknown"] = costed, unknown
    return out


def _iso(at: dt.datetime) -> str:
    return at.astimezone(dt.UTC).isoformat().replace("+00:00", "Z")


class Margins:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    async def report(self, q: MarginQuery) -> dict[str, Any]:
        sql = _MARGINS.format(GROUPS[q.group_by])
        rows = await self.pool.fetch(sql, q.start, q.to, ROUTE_KINDS, q.limit)
        data = [{q.group_by: r["value"], **_figures(r)} for r in rows if not r["total"]]
        total = next(r for r in rows if r["total"])
        totals = _figures(total) if total["requests"] is not None else _figures(_ZERO)
        return {
            "object": "margins",
            "group_by": q.group_by,
            "from": _iso(q.start),
            "to": _iso(q.to),
            "data": data,
            "totals": totals,
        }


_ZERO = dict.fromkeys(
    ("requests", "revenue", "costed_revenue", "cost", "unknown_requests", "unknown_revenue"), 0
)
MARGINS = web.AppKey("margins", Margins)


async def start(app: web.Application, running: Running) -> None:
    app[MARGINS] = Margins(running.services.store.pool)


def admin_routes(admin: web.Application, settings: Settings) -> None:
    async def margins(request: web.Request) -> web.Response:
        q = MarginQuery.parse(request.query, dt.datetime.now(dt.UTC))
        report = await request.config_dict[MARGINS].report(q)
        return web.Response(body=msgspec.json.encode(report), content_type="application/json")

    admin.router.add_get("/margins", margins)


FEATURE = Feature("margins", admin_routes=admin_routes, start=start)
