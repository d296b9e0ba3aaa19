"""What an account on invoice accrued in a period: its usage ledger rows (kind 'usage', amounts negative)
grouped by (route, model), for the lines of its usage invoice. An operation's hold is route "operation"
with the operation's name as its model; a meter's period is route "meter" with no model. Rows charging
nothing (a cache hit, a free request) count as requests with 0 credits."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from ..signals.events import Connection

_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


@dataclass(frozen=True, slots=True)
class UsageLine:
    route: str | None
    model: str | None
    requests: int  # usage rows
    credits: int  # micro-credits charged, positive


def instant(ms: int) -> dt.datetime:
    """Epoch milliseconds as an aware UTC datetime, exactly (no float)."""
    return _EPOCH + dt.timedelta(milliseconds=ms)


async def usage_lines(conn: Connection, account: str, start_ms: int, end_ms: int) -> list[UsageLine]:
    """The account's usage rows created in [start_ms, end_ms), grouped by (route, model), ordered by
    route then model (byte order, no route or model first): the same order on every call."""
    rows = await conn.fetch(
        'SELECT route COLLATE "C" AS route, model COLLATE "C" AS model, count(*) AS requests,'
        " -coalesce(sum(amount), 0) AS credits FROM ledger"
        " WHERE account_id = $1 AND kind = 'usage' AND created_at >= $2 AND created_at < $3"
        " GROUP BY 1, 2 ORDER BY 1 NULLS FIRST, 2 NULLS FIRST",
        account,
        instant(start_ms),
        instant(end_ms),
    )
    return [UsageLine(r["route"], r["model"], int(r["requests"]), int(r["credits"])) for r in rows]
