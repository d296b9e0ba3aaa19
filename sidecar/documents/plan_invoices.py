"""Provider-billed plans: Stripe's verified `invoice.paid` (payments/webhooks.py checks the signature,
stripe_events.py routes the event here) grants the period the invoice paid, once.

- The subscription: `invoice.subscription` (API versions before 2025-03-31), else
  `invoice.parent.subscription_details.subscription`; ours is the one whose `provider_ref` it is (the
  admin start's `stripe_subscription`). None of ours, or not a subscription's invoice: acknowledged,
  nothing done (the outcome is recorded and logged, as for any event that is not ours).
- The line: the invoice line whose price is the plan's `stripe_price` (`line.price.id`, or newer
  `line.pricing.price_details.price`), the plan being the one the subscription has for its next period
  (`next_plan`, else `plan`). No such line: 'price_mismatch', nothing granted (the operator changes the
  plan here when changing the price in Stripe, then resends the event from Stripe's dashboard).
- The period: Stripe bills on UTC periods from its billing-cycle anchor; a provider-billed subscription
  is on UTC and its anchor becomes the first granted invoice's `period.start`. The line's period maps to
  ours by its midpoint (`period_at`), so Stripe's instants may be off by seconds (or hours) either way.
- Once: the row is locked (FOR UPDATE: a duplicate event waits, then finds the period granted) and the
  grant's key is the worker's 'sub:<id>:<period>' (a rerun after a crash credits nothing more). The
  period row records the invoice id; the grant's payment_ref is it too.
- A stale invoice: a period at or before the one granted last changes nothing ('already_granted' /
  'period_ended'); a period not granted yet but already over (paid after its end) is not granted either
  ('period_ended': its credits would expire at once). A canceled subscription grants nothing ('canceled').
"""

from __future__ import annotations

import logging

import msgspec

from .plan_periods import period_at, to_dt, to_ms
from .plans import Plans

log = logging.getLogger("creditgate.plans")
Outcome = tuple[str | None, str]


class LinePeriod(msgspec.Struct):
    start: int  # seconds
    end: int


class PriceRef(msgspec.Struct):
    id: str


class PriceDetails(msgspec.Struct):
    price: str | None = None


class Pricing(msgspec.Struct):
    price_details: PriceDetails | None = None


class Line(msgspec.Struct):
    period: LinePeriod | None = None
    price: PriceRef | None = None  # before 2025-03-31
    pricing: Pricing | None = None  # from 2025-03-31 (basil)

    def price_id(self) -> str | None:
        if self.price is not None:
            return self.price.id
        details = self.pricing.price_details if self.pricing else None
        return details.price if details else None


class Lines(msgspec.Struct):
    data: list[Line] = []


class SubscriptionDetails(msgspec.Struct):
    subscription: str | None = None


class Parent(msgspec.Struct):
    subscription_details: SubscriptionDetails | None = None


class Invoice(msgspec.Struct):
    id: str
    subscription: str | None = None  # before 2025-03-31
    parent: Parent | None = None  # from 2025-03-31
    lines: Lines = msgspec.field(default_factory=Lines)

    def subscription_ref(self) -> str | None:
        details = self.parent.subscription_details if self.parent else None
        return self.subscription or (details.subscription if details else None)


async def invoice_paid(plans: Plans, raw: msgspec.Raw) -> Outcome:
    invoice = msgspec.json.decode(raw, type=Invoice)
    ref = invoice.subscription_ref()
    if ref is None or not 0 < len(ref) <= 200 or not 0 < len(invoice.id) <= 200:
        return None, "not_a_subscription"
    async with plans.pool.acquire() as conn, conn.transaction():
        row = await conn.fetchrow("SELECT * FROM subscriptions WHERE provider_ref = $1 FOR UPDATE", ref)
        if row is None:
            log.info("invoice %s paid for Stripe subscription %s: not ours", invoice.id, ref)
            return None, "unknown_subscription"
        if row["status"] != "active":
            return None, "canceled"
        name = row["next_plan"] or row["plan"]
        plan = plans.catalog.get(name)
        if plan is None or plan.billing != "provider":
            log.warning(
                "invoice %s paid for subscription %s: plan %r not provider-billed",
                invoice.id,
                row["id"],
                name,
            )
            return None, "unknown_plan"
        line = next((x for x in invoice.lines.data if x.period and x.price_id() == plan.stripe_price), None)
        if line is None or line.period is None:
            log.warning(
                "invoice %s paid for subscription %s has no line of %s (plan %r): nothing granted",
                invoice.id, row["id"], plan.stripe_price, name,
            )  # fmt: skip
            return None, "price_mismatch"
        start_ms, end_ms = line.period.start * 1000, line.period.end * 1000
        first = row["period_index"] < 0
        anchor = start_ms if first else to_ms(row["anchor"])
        p = period_at(anchor, row["time_zone"], plan.period, (start_ms + end_ms) // 2)
        if p.index <= row["period_index"]:
            return None, "already_granted" if p.index == row["period_index"] else "period_ended"
        if p.end_ms <= plans.clock():
            return None, "period_ended"
        if first:
            await conn.execute("UPDATE subscriptions SET anchor = $2 WHERE id = $1", row["id"], to_dt(anchor))
        await plans.record(conn, row, p, name, plan, invoice=invoice.id)
    log.info("invoice %s paid: subscription %s period %d granted", invoice.id, row["id"], p.index)
    return None, "granted"
