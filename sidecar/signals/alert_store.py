"""Postgres reads and writes of an account's alert rules and auto-reload settings (migration 012)."""

from __future__ import annotations

import json
from typing import Any, Literal

import asyncpg
import msgspec

from ..errors import BadRequest, UnknownAccount
from ..money import MAX_MICRO
from ..payments import methods
from . import alert_rules
from .alert_rules import Rule
from .alert_settings import AlertSettings
from .events import Connection

Method = Literal["stripe", "webhook"]


class AlertsBody(msgspec.Struct, forbid_unknown_fields=True):
    rules: list[Rule] = []
    defaults: bool = True  # the default rules (alert_top_up_percents) apply as well


class ReloadBody(msgspec.Struct, forbid_unknown_fields=True):
    enabled: bool
    threshold: int  # micro-credits: a settle taking the balance below it starts one reload
    credits: int  # micro-credits one reload buys
    method: Method = "stripe"


class OperatorReloadBody(ReloadBody, forbid_unknown_fields=True):
    # The saved payment method at Stripe (set by the operator only: a client naming one could charge a
    # card that is not its own).
    stripe_customer: str | None = None
    stripe_payment_method: str | None = None


async def _known(conn: Connection, account: str) -> None:
    if not await conn.fetchval("SELECT 1 FROM accounts WHERE id = $1", account):
        raise UnknownAccount(account)


class AlertStore:
    def __init__(self, pool: asyncpg.Pool, settings: AlertSettings) -> None:
        self.pool, self.settings = pool, settings

    async def alerts(self, account: str) -> dict[str, Any]:
        async with self.pool.acquire() as conn:
            await _known(conn, account)
            row = await conn.fetchrow(
                "SELECT defaults, rules FROM alert_settings WHERE account_id = $1", account
            )
        own = msgspec.json.decode(row["rules"], type=list[Rule]) if row else []
        defaults = row["defaults"] if row else True
        default_rules = alert_rules.defaults(self.settings.alert_top_up_percents) if defaults else []
        return {
            "object": "credits.alerts",
            "account": account,
            "defaults": defaults,
            "rules": [r.view() for r in own],
            "default_rules": [r.view() for r in default_rules],
        }

    async def set_alerts(self, account: str, body: AlertsBody) -> dict[str, Any]:
        rules = alert_rules.checked(body.rules)
        async with self.pool.acquire() as conn:
            await _known(conn, account)
            await conn.execute(
                "INSERT INTO alert_settings (account_id, defaults, rules) VALUES ($1, $2, $3::jsonb) ON"
                " CONFLICT (account_id) DO UPDATE SET defaults = $2, rules = $3::jsonb, updated_at = now()",
                account,
                body.defaults,
                json.dumps([msgspec.to_builtins(r) for r in rules]),
            )
        return await self.alerts(account)

    async def reload(self, account: str) -> dict[str, Any]:
        async with self.pool.acquire() as conn:
            await _known(conn, account)
            row = await conn.fetchrow("SELECT * FROM reload_settings WHERE account_id = $1", account)
            method = await methods.saved(conn, account)
            recent = await conn.fetch(
                "SELECT reload_id, status, credits, order_id, error, created_at, finished_at FROM reloads"
                " WHERE account_id = $1 ORDER BY created_at DESC LIMIT 10",
                account,
            )
        out: dict[str, Any] = {"object": "credits.auto_reload", "account": account, "enabled": False}
        if row is not None:
            out.update(
                enabled=row["enabled"],
                threshold=row["threshold"],
                credits=row["credits"],
                method=row["method"],
                failures=row["failures"],
                disabled_reason=row["disabled_reason"],
            )
        out["payment_method_saved"] = method is not None
        out["reloads"] = [reload_view(r) for r in recent]
        return out

    async def set_reload(self, account: str, body: ReloadBody) -> dict[str, Any]:
        s = self.settings
        if not 0 < body.threshold <= MAX_MICRO:
            raise BadRequest("threshold must be a positive integer of micro-credits.", param="threshold")
        if not s.reload_min_credits <= body.credits <= s.reload_max_credits:
            raise BadRequest(
                f"credits must be from {s.reload_min_credits} to {s.reload_max_credits} micro-credits"
                " (reload_min_credits, reload_max_credits).",
                param="credits",
            )
        given = None
        if isinstance(body, OperatorReloadBody) and (body.stripe_customer or body.stripe_payment_method):
            given = methods.checked(body.stripe_customer or "", body.stripe_payment_method or "")
        async with self.pool.acquire() as conn, conn.transaction():
            await _known(conn, account)
            if given is not None:
                await methods.save(conn, account, given)
            if body.enabled and body.method == "stripe" and await methods.saved(conn, account) is None:
                raise BadRequest(
                    "Auto-reload by Stripe needs a saved payment method: buy credits once with"
                    " save_payment_method, or the operator sets one.",
                    param="method",
                )
            await conn.execute(
                "INSERT INTO reload_settings (account_id, enabled, threshold, credits, method)"
                " VALUES ($1, $2, $3, $4, $5) ON CONFLICT (account_id) DO UPDATE SET enabled = $2,"
                " threshold = $3, credits = $4, method = $5, updated_at = now(),"
                " failures = CASE WHEN $2 THEN 0 ELSE reload_settings.failures END,"
                " disabled_reason = CASE WHEN $2 THEN NULL ELSE reload_settings.disabled_reason END",
                account, body.enabled, body.threshold, body.credits, body.method,
            )  # fmt: skip
        return await self.reload(account)


def reload_view(r: asyncpg.Record) -> dict[str, Any]:
    return {
        "id": r["reload_id"],
        "status": r["status"],
        "credits": r["credits"],
        "order_id": r["order_id"],
        "error": r["error"],
        "created_at": r["created_at"].isoformat(),
        "finished_at": r["finished_at"].isoformat() if r["finished_at"] else None,
    }
