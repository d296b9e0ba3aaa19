"""Shared by the subscription plan tests (test_plans.py, test_provider_plans.py): the plan catalog, the
controlled clock's instants, and a `Scene` (a sidecar whose plans and wallet run on that clock)."""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

from sidecar.documents.plans import Plans
from sidecar.documents.plans_api import PLANS
from sidecar.outbox import UsageEvent
from sidecar.wallet import GrantTerms, WalletPolicy

from .conftest import Sidecar, SidecarFactory
from .support_wallet import Clock

C = 1_000_000
PLAN_SETTINGS = {
    "basic": {"included_credits": 10 * C, "price": 900, "title": "Basic"},
    "pro": {"included_credits": 50 * C, "price": 4900},
    "carry": {"included_credits": 10 * C, "rollover": "capped", "rollover_cap": 3 * C},
    "keep": {"included_credits": 10 * C, "rollover": "all"},
    "yearly": {"included_credits": 100 * C, "period": "year"},
}


def ms(text: str) -> int:
    return int(dt.datetime.fromisoformat(text).timestamp()) * 1000


def iso(at_ms: int, tz: str = "UTC") -> str:
    return dt.datetime.fromtimestamp(at_ms // 1000, dt.UTC).astimezone(_zone(tz)).isoformat()


def _zone(tz: str) -> dt.tzinfo:
    import zoneinfo

    return zoneinfo.ZoneInfo(tz)


JAN31 = ms("2027-01-31T10:00+00:00")
FEB28 = ms("2027-02-28T10:00+00:00")
MAR31 = ms("2027-03-31T10:00+00:00")


class Scene:
    def __init__(self, sc: Sidecar, clock: Clock) -> None:
        self.sc, self.clock = sc, clock
        sc.balances.wallet = WalletPolicy(30 * 86_400_000, clock)
        self.plans: Plans = sc.client.app[PLANS]
        self.plans.clock = clock

    async def account(self, purchased: int = 0) -> tuple[str, str]:
        account, key = await self.sc.account(0)
        if purchased:
            terms = GrantTerms("purchase")
            await self.sc.services.admin.grant(account, purchased, uuid.uuid4().hex, "purchase", terms=terms)
        return account, key

    async def post(self, path: str, body: Any = None, status: int = 200) -> Any:
        resp = await self.sc.client.post(f"/admin{path}", json=body, headers=self.sc.admin_headers())
        data = await resp.json()
        assert resp.status == status, data
        return data

    async def subscribe(self, account: str, plan: str) -> dict[str, Any]:
        sub: dict[str, Any] = (await self.post(f"/accounts/{account}/subscription", {"plan": plan}, 201))[
            "subscription"
        ]
        return sub

    async def spend(self, account: str, micro: int) -> None:
        rid = "req_" + uuid.uuid4().hex
        await self.sc.balances.settle(
            account, rid, micro, UsageEvent(route="chat", settled_ms=self.clock.now)
        )

    async def flush(self) -> None:
        await self.sc.services.flusher().drain()

    async def ledger(self, account: str, kind: str) -> list[tuple[str, int]]:
        rows = await self.sc.services.store.pool.fetch(
            "SELECT idempotency_id, amount FROM ledger WHERE account_id = $1 AND kind = $2"
            " ORDER BY created_at",
            account,
            kind,
        )
        return [(r["idempotency_id"], r["amount"]) for r in rows]

    async def periods(self, sid: str) -> list[tuple[int, str, int, int | None]]:
        rows = await self.sc.services.store.pool.fetch(
            "SELECT period_index, plan, amount, carried FROM subscription_periods WHERE subscription_id = $1"
            " ORDER BY period_index",
            sid,
        )
        return [(r["period_index"], r["plan"], r["amount"], r["carried"]) for r in rows]


async def new_sidecar(make_sidecar: SidecarFactory, **overrides: Any) -> Sidecar:
    return await make_sidecar(
        flusher_enabled=False, plans=PLAN_SETTINGS, subscription_interval_seconds=3600, **overrides
    )
