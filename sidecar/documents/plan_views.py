"""What the plan routes show: the catalog (GET /v1/plans) and a subscription with its current period
(GET /v1/subscription, the admin's subscription routes). Pure: rows in, JSON-ready dicts out."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

from .plan_periods import iso
from .plan_settings import PlanConfig


class Row(Protocol):  # a database row (asyncpg.Record): fields by name
    def __getitem__(self, key: str, /) -> Any: ...


def catalog_view(catalog: Mapping[str, PlanConfig]) -> dict[str, Any]:
    return {
        "object": "list",
        "data": [
            {
                "id": name,
                "title": p.title,
                "price": p.price,
                "period": p.period,
                "included_credits": p.included_credits,
                "rollover": p.rollover,
                "rollover_cap": p.rollover_cap,
                "billing": p.billing,
                "stripe_price": p.stripe_price,
            }
            for name, p in sorted(catalog.items())
        ],
    }


def subscription_view(row: Row, current: Row | None) -> dict[str, Any]:
    """A subscription row and its current period's row (None: none granted yet)."""
    period = None
    if current is not None:
        period = {
            "index": current["period_index"],
            "start": iso(current["starts_at"]),
            "end": iso(current["ends_at"]),
            "granted": current["amount"],
            "carried": current["carried"],
            "invoice": current["invoice_ref"],  # the paid Stripe invoice (provider-billed plans)
        }
    return {
        "id": row["id"],
        "plan": row["plan"],
        "status": row["status"],
        "next_plan": row["next_plan"],
        "anchor": iso(row["anchor"]),
        "time_zone": row["time_zone"],
        "stripe_subscription": row["provider_ref"],
        "period": period,
        "canceled_at": iso(row["canceled_at"]),
    }
