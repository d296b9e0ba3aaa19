"""Usage: the last 30 days by day, stacked by model (or key, end user, tag), drawn as SVG on the server
with the same numbers in a table, and the top consumers of the range. Read from the roll-ups the
flusher keeps (usage_rollup), as GET /v1/credits/usage is: nothing scans the ledger."""

from __future__ import annotations

import datetime as dt

from aiohttp import web

from ..credit_params import UsageQuery
from ..credits_api import CreditReads
from . import chart
from .edge import desk, viewer
from .pages import page

DAYS = 30
TOP_CONSUMERS = 20
DIMENSIONS = {"model": "Model", "key": "API key", "user": "End user", "tag": "Tag"}
IN_TEXT = {"model": "model", "key": "API key", "user": "end user", "tag": "tag"}  # the same, mid-sentence

_BY_DAY = """
SELECT day, dim, value, sum(charge)::bigint AS charge FROM usage_rollup
WHERE account_id = $1 AND day BETWEEN $2 AND $3 AND dim = ANY($4::text[])
GROUP BY day, dim, value
"""


def points(rows: list[tuple[dt.date, str, str, int]], dim: str) -> list[tuple[dt.date, str, int]]:
    """(day, dim, value, charge) roll-up sums -> the chart's (day, series, charge): a dimension's values,
    and what no value covers ('total' less their sum: usage without a key or user) as chart.NONE. Tags
    overlap (a request with two tags counts under each), so they get no remainder."""
    out = [(day, value, charge) for day, d, value, charge in rows if d == dim and charge > 0]
    if dim != "tag":
        covered: dict[dt.date, int] = {}
        for day, _, charge in out:
            covered[day] = covered.get(day, 0) + charge
        for day, d, _, charge in rows:
            if d == "total" and charge > covered.get(day, 0):
                out.append((day, chart.NONE, charge - covered.get(day, 0)))
    return out


async def usage(request: web.Request) -> web.StreamResponse:
    d = desk(request)
    account = viewer(request).of()
    dim = request.query.get("by", "model")
    if dim not in DIMENSIONS:
        dim = "model"
    today = dt.datetime.fromtimestamp(d.now_ms() // 1000, dt.UTC).date()
    first = today - dt.timedelta(days=DAYS - 1)
    raw = await d.services.store.pool.fetch(_BY_DAY, account, first, today, ["total", dim])
    rows = [(r["day"], r["dim"], r["value"], int(r["charge"])) for r in raw]
    order, values = chart.fold(points(rows, dim))
    days = [first + dt.timedelta(days=i) for i in range(DAYS)]
    drawn = chart.stacked(days, order, values)
    top = await CreditReads(d.services).usage(
        account, UsageQuery(group_by=dim, first_day=first, last_day=today, limit=TOP_CONSUMERS)
    )
    return await page(
        request,
        "usage.html",
        active="usage",
        title="Usage",
        chart=drawn,
        dim=dim,
        dimensions=DIMENSIONS,
        words=IN_TEXT,
        top=top,
        first=first,
        today=today,
    )
