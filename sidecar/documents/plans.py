"""Subscriptions to the configured plans (settings `plans`): each period's included credits arrive as a
`subscription` grant that expires at the period's end, granted exactly once per (subscription, period).

- Start: the subscription row is written due now (period -1 ended at the anchor), then its due period is
  granted at once; a start that stops half-way is finished by the worker's next pass.
- A period's grant: the subscription row is claimed (FOR UPDATE SKIP LOCKED: one sidecar per row), the
  grant is made through AdminOps.grant with the key 'sub:<id>:<period>' (ledger row first, then Redis,
  then applied: a rerun credits nothing), then the period row is written and the row moved on, in the
  claiming transaction. Missed periods are not caught up: only the period `now` falls in is granted.
- A change of plan waits for the next period (`next_plan`); a cancel grants nothing more (the current
  grant runs to its period's end).
- Rollover ("all", or "capped" at N): once the ledger holds everything the previous period's grants
  became (their remainder is 0 in Postgres: used, or expired by the sweeper and flushed), their expired
  micro-credits (the ledger's expiry rows), capped, arrive as a second grant 'sub:<id>:<period>:carry'
  that ends with the current period. Until then the period row's `carried` is NULL and each pass looks
  again; a period that ended first carries nothing.
- Billing: operator-billed (the operator invoices `price`; the worker grants), or provider-billed (the
  subscription names its Stripe subscription; the worker never grants it: Stripe's verified
  `invoice.paid` does, through `record`, plan_invoices.py).
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Callable
from typing import Any

import asyncpg

from ..admin import AdminOps
from ..config import ACCOUNT_ID
from ..errors import BadRequest, Conflict, NotFound
from ..wallet import GrantTerms
from .plan_periods import Period, period, period_at, to_dt, to_ms
from .plan_settings import PlanConfig
from .plan_views import catalog_view, subscription_view

STRIPE_SUBSCRIPTION = re.compile(r"^sub_[A-Za-z0-9_]{1,196}\Z")
SubRow = asyncpg.Record
Conn = asyncpg.Connection | asyncpg.pool.PoolConnectionProxy


def known(account: str) -> str:
    """An id no account can have names none: a 404 before any query (no NUL reaches Postgres)."""
    if not ACCOUNT_ID.match(account):
        raise NotFound(f"No account {account!r}.", param="account")
    return account


def grant_key(subscription: str, index: int, carry: bool = False) -> str:
    return f"sub:{subscription}:{index}" + (":carry" if carry else "")


class Plans:
    """The catalog, the subscriptions (Postgres) and the grants of their periods (through AdminOps)."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        ops: AdminOps,
        catalog: dict[str, PlanConfig],
        clock: Callable[[], int],
        batch: int = 100,
    ) -> None:
        self.pool, self.ops, self.catalog, self.clock, self.batch = pool, ops, catalog, clock, batch

    def plan(self, name: Any, field: str = "plan") -> PlanConfig:
        if not isinstance(name, str) or name not in self.catalog:
            known = ", ".join(sorted(self.catalog)) or "none configured"
            raise BadRequest(f"{field} must be one of the configured plans ({known}).", param=field)
        return self.catalog[name]

    def catalog_view(self) -> dict[str, Any]:
        return catalog_view(self.catalog)

    # ---- the operator's actions ---------------------------------------------------------------------

    async def start(self, account: str, plan_name: Any, stripe_sub: Any = None) -> dict[str, Any]:
        """A new subscription: its first period begins now and is granted now; a provider-billed one
        names its Stripe subscription and waits for its paid invoices (on Stripe's UTC periods)."""
        plan = self.plan(plan_name)
        provider = plan.billing == "provider"
        if provider != (stripe_sub is not None) or not STRIPE_SUBSCRIPTION.match(stripe_sub or "sub_x"):
            why = (
                "a Stripe subscription id (sub_...)" if provider else "given for a provider-billed plan only"
            )
            raise BadRequest(f"stripe_subscription is {why}.", param="stripe_subscription")
        known(account)
        now = self.clock()
        sid = f"sub_{secrets.token_hex(8)}"
        async with self.pool.acquire() as conn, conn.transaction():
            tz = await conn.fetchval("SELECT coalesce(time_zone, 'UTC') FROM accounts WHERE id = $1", account)
            if tz is None:
                raise NotFound(f"No account {account!r}.", param="account")
            tz = "UTC" if provider else tz
            first = period(now, tz, plan.period, 0)
            try:
                await conn.execute(
                    "INSERT INTO subscriptions (id, account_id, plan, status, anchor, time_zone,"
                    " period_index, period_end, provider_ref) VALUES ($1, $2, $3, 'active', $4, $5, -1, $4,"
                    " $6)",
                    sid,
                    account,
                    plan_name,
                    to_dt(first.start_ms),
                    tz,
                    stripe_sub,
                )
            except asyncpg.UniqueViolationError as exc:
                if exc.constraint_name == "subscriptions_provider_ref":
                    msg = f"Stripe subscription {stripe_sub!r} is another subscription's."
                    raise Conflict(msg, param="stripe_subscription") from None
                raise Conflict(f"Account {account!r} has an active subscription.", param="account") from None
        if not provider:
            await self.grant_due(now, sid)
        return await self.view(account)

    async def change(self, account: str, plan_name: Any) -> dict[str, Any]:
        """The plan from the next period on (the same plan as now: no change pending)."""
        plan = self.plan(plan_name)
        row = await self._active(account)
        now = self.catalog.get(row["plan"], plan)
        if (now.period, now.billing) != (plan.period, plan.billing):
            msg = f"plan must bill per {now.period}, billed by the {now.billing}, as the current plan is."
            raise BadRequest(msg, param="plan")
        pending = None if plan_name == row["plan"] else plan_name
        await self.pool.execute("UPDATE subscriptions SET next_plan = $2 WHERE id = $1", row["id"], pending)
        return await self.view(account)

    async def cancel(self, account: str) -> dict[str, Any]:
        row = await self._active(account)
        await self.pool.execute(
            "UPDATE subscriptions SET status = 'canceled', canceled_at = $2, next_plan = NULL WHERE id = $1",
            row["id"],
            to_dt(self.clock()),
        )
        return await self.view(account, row["id"])

    async def _active(self, account: str) -> SubRow:
        known(account)
        row = await self.pool.fetchrow(
            "SELECT * FROM subscriptions WHERE account_id = $1 AND status = 'active'", account
        )
        if row is None:
            raise NotFound(f"Account {account!r} has no active subscription.", param="account")
        return row

    async def view(self, account: str, subscription: str | None = None) -> dict[str, Any]:
        known(account)
        row = await self.pool.fetchrow(
            "SELECT * FROM subscriptions WHERE account_id = $1 AND ($2::text IS NULL OR id = $2)"
            " ORDER BY (status = 'active') DESC, created_at DESC LIMIT 1",
            account,
            subscription,
        )
        if row is None:
            return {"account": account, "subscription": None}
        current = await self.pool.fetchrow(
            "SELECT * FROM subscription_periods WHERE subscription_id = $1 AND period_index = $2",
            row["id"],
            row["period_index"],
        )
        return {"account": account, "subscription": subscription_view(row, current)}

    # ---- the worker ---------------------------------------------------------------------------------

    async def run_pass(self, now: int | None = None) -> int:
        """Grant the periods that came due and the rollovers that are ready; returns the grants made."""
        now = self.clock() if now is None else now
        return await self.grant_due(now) + await self.carry_ready(now)

    async def grant_due(self, now: int, subscription: str | None = None) -> int:
        made = 0
        async with self.pool.acquire() as conn, conn.transaction():
            rows = await conn.fetch(
                "SELECT * FROM subscriptions WHERE status = 'active' AND period_end <= $1"
                " AND provider_ref IS NULL AND ($2::text IS NULL OR id = $2)"
                " ORDER BY period_end LIMIT $3 FOR UPDATE SKIP LOCKED",
                to_dt(now),
                subscription,
                self.batch,
            )
            for row in rows:
                made += await self._grant_period(conn, row, now)
        return made

    async def _grant_period(self, conn: Conn, row: SubRow, now: int) -> int:
        name = row["next_plan"] or row["plan"]
        plan = self.catalog.get(name)
        if plan is None:  # a plan no longer configured: nothing to grant (the operator sees it)
            return 0
        p = period_at(to_ms(row["anchor"]), row["time_zone"], plan.period, now)
        if p.index <= row["period_index"]:  # (a clock behind the row's end: nothing due yet)
            return 0
        await self.record(conn, row, p, name, plan)
        return 1

    async def record(
        self, conn: Conn, row: SubRow, p: Period, name: str, plan: PlanConfig, invoice: str | None = None
    ) -> None:
        """Period `p` granted (its key: a rerun credits nothing) and written, the row moved on to it, in
        the transaction that holds the row (`invoice`: the paid Stripe invoice of a provider-billed one)."""
        await self._grant(row["account_id"], row["id"], plan.included_credits, p, ref=invoice)
        await conn.execute(
            "INSERT INTO subscription_periods (subscription_id, period_index, plan, amount, starts_at,"
            " ends_at, carried, invoice_ref) VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT DO NOTHING",
            row["id"],
            p.index,
            name,
            plan.included_credits,
            to_dt(p.start_ms),
            to_dt(p.end_ms),
            0 if p.index == 0 else None,
            invoice,
        )
        await conn.execute(
            "UPDATE subscriptions SET period_index = $2, period_end = $3, plan = $4, next_plan = NULL"
            " WHERE id = $1",
            row["id"],
            p.index,
            to_dt(p.end_ms),
            name,
        )

    async def _grant(
        self, account: str, sid: str, amount: int, p: Period, carry: bool = False, ref: str | None = None
    ) -> None:
        terms = GrantTerms("subscription", None, p.end_ms, idle=False)
        note = f"subscription {sid} period {p.index}" + (" rollover" if carry else "")
        key = grant_key(sid, p.index, carry)
        await self.ops.grant(account, amount, key, "subscription", note, terms=terms, payment_ref=ref)

    async def carry_ready(self, now: int) -> int:
        """Rollovers: for each current period still waiting (carried NULL), once Postgres holds all its
        previous period's grants became, grant what expired of them (capped)."""
        made = 0
        async with self.pool.acquire() as conn, conn.transaction():
            rows = await conn.fetch(
                "SELECT sp.*, s.account_id FROM subscription_periods sp JOIN subscriptions s"
                " ON s.id = sp.subscription_id WHERE sp.carried IS NULL AND sp.ends_at > $1"
                " LIMIT $2 FOR UPDATE OF sp SKIP LOCKED",
                to_dt(now),
                self.batch,
            )
            for row in rows:
                made += await self._carry(conn, row)
        return made

    async def _carry(self, conn: Conn, row: SubRow) -> int:
        sid, index, account = row["subscription_id"], row["period_index"], row["account_id"]
        before = await conn.fetchval(
            "SELECT plan FROM subscription_periods WHERE subscription_id = $1 AND period_index = $2",
            sid,
            index - 1,
        )
        plan = self.catalog.get(before) if before is not None else None
        carried = 0
        if plan is not None and plan.rollover != "none":
            ids = [grant_key(sid, index - 1), grant_key(sid, index - 1, carry=True)]
            left = await conn.fetchval(
                "SELECT coalesce(sum(g.amount - g.drawn - coalesce((SELECT sum(d.amount) FROM grant_draws d"
                " WHERE d.account_id = g.account_id AND d.grant_id = g.grant_id), 0)), 0)"
                " FROM grants g WHERE g.account_id = $1 AND g.grant_id = ANY($2::text[])",
                account,
                ids,
            )
            if left > 0:  # not all used or expired (and flushed) yet: look again next pass
                return 0
            # Their expiry rows: whole (by id), or in parts while live holds kept the rest (the
            # account's few expiry-part rows, by id range, that name these grants).
            expired = await conn.fetchval(
                "SELECT coalesce(-sum(amount), 0) FROM ledger WHERE account_id = $1 AND kind = 'expiry'"
                " AND (idempotency_id = ANY($2::text[])"
                " OR (idempotency_id >= $3 AND idempotency_id < $4 AND drawn ?| $5::text[]))",
                account,
                [f"expiry:{account}:{i}" for i in ids],
                f"expiry-part:{account}:",
                f"expiry-part:{account};",  # ';' follows ':'
                ids,
            )
            carried = int(expired) if plan.rollover == "all" else min(int(expired), plan.rollover_cap or 0)
        if carried > 0:
            p = Period(index, to_ms(row["starts_at"]), to_ms(row["ends_at"]))
            await self._grant(account, sid, carried, p, carry=True)
        await conn.execute(
            "UPDATE subscription_periods SET carried = $3 WHERE subscription_id = $1 AND period_index = $2",
            sid,
            index,
            carried,
        )
        return int(carried > 0)
