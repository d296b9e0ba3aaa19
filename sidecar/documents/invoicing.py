"""The invoicing worker: an invoice for each ended calendar month of every account in invoice billing mode,
one for each operator-billed plan period with a price, and the overdue rule (an invoice unpaid
`invoice_block_after_days` after its due date refuses its account's new work until it is paid).

What a month's invoice bills is what the account owes at the month's end and was not billed before: the
ledger balance at the end (every row created before it: usage at its settle time, grants, expiries), below
zero, less the credits of earlier invoices not yet paid back by then (paying an invoice grants its credits
back, `invoices.py`). Its lines are the month's usage by route and model (`accrual.usage_lines`), and a
line for the difference: credits that prepaid or included grants covered (negative), or earlier usage not
billed before (positive). Billing by debt rather than by usage alone bills nothing twice and loses nothing
that was flushed late: it lands on the next month's invoice. A month is billed `SETTLE_LAG_MS` after its
end (the flusher's rows of its last minutes are in by then) and once (`source` `period:<account>:<YYYY-MM>`).
One rounding step per line: credits to minor units at `credit_price`, half-up; then the tax per line.
"""

from __future__ import annotations

import datetime as dt
import zoneinfo
from collections.abc import Awaitable, Callable, Mapping
from decimal import Decimal
from typing import Any

from ..money import MICRO, format_credits
from ..payments.packages import minor_digits
from .accrual import usage_lines
from .invoices import Invoices
from .issuing import EPOCH, Draft, Line, to_dt
from .plan_settings import PlanConfig

SETTLE_LAG_MS = 15 * 60_000  # a month is billed this long after its end
DEFAULT_TERMS_DAYS = 30  # a plan's invoice for an account without billing terms
OVERDUE = "overdue:"  # the prefix of the block reasons this worker sets (and lifts)
Blocker = Callable[[str, bool, str | None], Awaitable[Any]]  # (account, blocked, reason)


def to_ms(at: dt.datetime) -> int:
    return (at - EPOCH) // dt.timedelta(milliseconds=1)


def last_month(now_ms: int, tz: str) -> tuple[int, int, str]:
    """The calendar month before the one `now_ms` falls in, on the wall clock of `tz`: [start, end) in ms
    and its label (YYYY-MM)."""
    zone = dt.UTC if tz in ("", "UTC") else zoneinfo.ZoneInfo(tz)
    local = to_dt(now_ms).astimezone(zone)
    end = local.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    start = (end - dt.timedelta(days=1)).replace(day=1)
    start, end = (
        start.replace(tzinfo=None).replace(tzinfo=zone),
        end.replace(tzinfo=None).replace(tzinfo=zone),
    )
    return to_ms(start), to_ms(end), f"{start.year:04d}-{start.month:02d}"


def credits_minor(credits: int, credit_price: Decimal, currency: str) -> int:
    """`credits` micro-credits at `credit_price` in minor units, rounded half-up (away from zero)."""
    num, den = credit_price.as_integer_ratio()
    scale = den * MICRO
    whole, rest = divmod(abs(credits) * num * 10 ** minor_digits(currency), scale)
    whole, rest = int(whole), int(rest)
    if 2 * rest >= scale:
        whole += 1
    return -whole if credits < 0 else whole


class Invoicing:
    def __init__(
        self,
        invoices: Invoices,
        *,
        credit_price: Decimal,
        currency: str,
        block_after_days: int | None,
        blocker: Blocker,
        plans: Mapping[str, PlanConfig],
    ) -> None:
        self.invoices, self.pool = invoices, invoices.pool
        self.credit_price, self.currency = credit_price, currency
        self.block_after_days, self.blocker, self.plans = block_after_days, blocker, plans

    def clock(self) -> int:
        return self.invoices.issuer.clock()

    async def run_pass(self, now: int | None = None) -> int:
        """Bill the ended months and the plan periods, then apply the overdue rule; returns the invoices
        issued."""
        now = self.clock() if now is None else now
        issued = await self.bill_months(now) + await self.bill_plans()
        await self.enforce_overdue(now)
        return issued

    # ---- usage months ---------------------------------------------------------------------------------

    async def bill_months(self, now: int) -> int:
        rows = await self.pool.fetch(
            "SELECT b.account_id, b.terms_days, coalesce(a.time_zone, 'UTC') AS tz FROM account_billing b"
            " JOIN accounts a ON a.id = b.account_id WHERE b.mode = 'invoice' ORDER BY b.account_id"
        )
        issued = 0
        for row in rows:
            start, end, label = last_month(now - SETTLE_LAG_MS, row["tz"])
            source = f"period:{row['account_id']}:{label}"
            if await self.pool.fetchval("SELECT 1 FROM documents WHERE source = $1", source):
                continue
            draft = await self.month_draft(row["account_id"], start, end, source, row["terms_days"])
            if draft is not None:
                await self.invoices.issue(draft)
                issued += 1
        return issued

    async def month_draft(self, account: str, start: int, end: int, source: str, terms: int) -> Draft | None:
        async with self.pool.acquire() as conn:
            balance = await conn.fetchval(
                "SELECT coalesce(sum(amount), 0) FROM ledger WHERE account_id = $1 AND created_at < $2",
                account,
                to_dt(end),
            )
            unpaid = await conn.fetchval(
                "SELECT coalesce(sum(d.credits), 0) FROM documents d WHERE d.account_id = $1"
                " AND d.kind = 'invoice' AND d.source LIKE 'period:%' AND NOT EXISTS (SELECT 1 FROM"
                " money_in_keys k WHERE k.account_id = d.account_id"
                " AND k.idempotency_id = 'in:' || d.account_id || ':invoice:' || d.id AND k.created_at < $2)",
                account,
                to_dt(end),
            )
            owed = max(0, -int(balance)) - int(unpaid)
            if owed <= 0:
                return None
            used = await usage_lines(conn, account, start, end)
        lines = [
            Line(
                f"{u.model or 'unknown'} ({u.route})",
                u.requests,
                "requests",
                u.credits,
                self.minor(u.credits),
            )
            for u in used
        ]
        rest = owed - sum(u.credits for u in used)
        if rest < 0:
            lines.append(
                Line("Covered by prepaid and included credits", 1, "adjustment", rest, self.minor(rest))
            )
        elif rest > 0:
            lines.append(Line("Earlier usage not billed before", 1, "adjustment", rest, self.minor(rest)))
        if sum(line.amount_minor for line in lines) <= 0:  # a fraction of a cent: the next month bills it
            return None
        return Draft("invoice", account, source, self.currency, tuple(lines), owed, due_days=terms,
                     period=(start, end), notes=(f"Usage of {format_credits(owed)} credits.",))  # fmt: skip

    def minor(self, credits: int) -> int:
        return credits_minor(credits, self.credit_price, self.currency)

    # ---- operator-billed plans ------------------------------------------------------------------------

    async def bill_plans(self) -> int:
        """An invoice for each granted period of an operator-billed plan with a price, once per period
        (`source` `sub:<subscription>:<period>`), due after the account's terms."""
        rows = await self.pool.fetch(
            "SELECT sp.subscription_id, sp.period_index, sp.plan, sp.starts_at, sp.ends_at, s.account_id,"
            " coalesce(b.terms_days, $1) AS terms FROM subscription_periods sp"
            " JOIN subscriptions s ON s.id = sp.subscription_id"
            " LEFT JOIN account_billing b ON b.account_id = s.account_id"
            " WHERE NOT EXISTS (SELECT 1 FROM documents d"
            " WHERE d.source = 'sub:' || sp.subscription_id || ':' || sp.period_index)"
            " ORDER BY sp.granted_at LIMIT 500",
            DEFAULT_TERMS_DAYS,
        )
        issued = 0
        for r in rows:
            plan = self.plans.get(r["plan"])
            if plan is None or plan.price <= 0 or plan.billing != "operator":
                continue
            title = plan.title or r["plan"]
            line = Line(f"Plan {title}, {r['starts_at']:%Y-%m-%d} to {r['ends_at']:%Y-%m-%d}", 1, "period", 0,
                        plan.price)  # fmt: skip
            source = f"sub:{r['subscription_id']}:{r['period_index']}"
            period = (to_ms(r["starts_at"]), to_ms(r["ends_at"]))
            await self.invoices.issue(
                Draft(
                    "invoice",
                    r["account_id"],
                    source,
                    self.currency,
                    (line,),
                    0,
                    due_days=r["terms"],
                    period=period,
                )
            )
            issued += 1
        return issued

    # ---- the overdue rule -----------------------------------------------------------------------------

    async def enforce_overdue(self, now: int, account: str | None = None) -> None:
        """Block the accounts with an invoice unpaid `block_after_days` past its due date (reason
        `overdue:<number>`); lift this worker's block from those with none left."""
        late: dict[str, str] = {}
        if self.block_after_days is not None:
            cutoff = to_dt(now) - dt.timedelta(days=self.block_after_days)
            for r in await self.pool.fetch(
                "SELECT d.account_id, min(d.number) AS number FROM documents d WHERE d.kind = 'invoice'"
                " AND d.due_at < $1 AND ($2::text IS NULL OR d.account_id = $2) AND d.gross_minor >"
                " (SELECT coalesce(sum(p.amount_minor), 0) FROM document_payments p"
                " WHERE p.document_id = d.id)"
                " GROUP BY d.account_id",
                cutoff,
                account,
            ):
                late[r["account_id"]] = r["number"]
        blocked = await self.pool.fetch(
            "SELECT account_id, blocked, blocked_reason FROM account_billing"
            " WHERE ($1::text IS NULL OR account_id = $1) AND (blocked OR account_id = ANY($2::text[]))",
            account,
            list(late),
        )
        known = {r["account_id"]: r for r in blocked}
        for who, number in late.items():
            row = known.get(who)
            if row is None or not row["blocked"]:
                await self.blocker(who, True, f"{OVERDUE}{number}")
        for who, row in known.items():
            if row["blocked"] and who not in late and (row["blocked_reason"] or "").startswith(OVERDUE):
                await self.blocker(who, False, None)
