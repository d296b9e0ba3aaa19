"""Referrals: what an account's codes have earned (``GET /v1/credits/referrals`` for a client key, its
own account; ``GET /admin/accounts/{id}/referrals``), and the referrer's bonus, granted once when the
referred account's first purchase lands (`referral_bonus`, a `Payments.on_purchase` hook).

The bonus is a `bonus` grant through `AdminOps.grant` with the idempotency key ``referral:<referred
account>``: however often the hook runs, and however many at once, it credits once. Then the referral is
marked rewarded, and later purchases skip it."""

from __future__ import annotations

import logging
from typing import Any

import msgspec
from aiohttp import web

from ..admin import ADMIN_OPS, AdminOps
from ..config import ACCOUNT_ID
from ..errors import IdempotencyConflict, NotFound
from ..money import format_credits
from ..wallet_api import WALLET_OPS
from .landing import PurchaseHook
from .orders import Order

log = logging.getLogger("creditgate.referrals")


async def reward_referrer(ops: AdminOps, account: str) -> bool:
    """Grant the bonus of `account`'s referrer unless it was granted; True when this call credited it."""
    store = ops.referrals
    link = await store.referral_of(account)
    if link is None or link.rewarded_at is not None:
        return False
    credited = False
    if store.policy.bonus > 0:
        try:
            granted = await ops.grant(
                link.referrer,
                store.policy.bonus,
                f"referral:{account}",
                "bonus",
                f"referral bonus: {account} made its first purchase",
            )
            credited = bool(granted["credited"])
        except IdempotencyConflict:  # granted before, when the bonus setting was another amount
            pass
    await store.mark_rewarded(account)
    if credited:
        log.info("referral bonus %d to %s for %s", store.policy.bonus, link.referrer, account)
    return credited


def referral_bonus(ops: AdminOps) -> PurchaseHook:
    """The `Payments.on_purchase` hook: the referrer's bonus on the referred account's first purchase."""

    async def on_purchase(order: Order) -> None:
        await reward_referrer(ops, order.account)

    return on_purchase


async def referrals_view(ops: AdminOps, account: str) -> dict[str, Any]:
    """The account's codes (made now if it has none), the accounts they referred and the bonus earned."""
    store = ops.referrals
    await store.ensure_codes(account)
    codes = await store.codes_of(account)
    referred, rewarded, earned = await store.referred_by(account)
    link = await store.referral_of(account)
    return {
        "object": "credits.referrals",
        "account": account,
        "codes": [
            {"code": c.code, "uses": c.uses, "max_uses": c.max_uses, "created_at": _iso(c.created_at)}
            for c in codes
        ],
        "referred_accounts": referred,
        "rewarded_accounts": rewarded,
        "bonus_earned": earned,
        "bonus_earned_credits": format_credits(earned),
        "bonus_per_referral": store.policy.bonus,
        "bonus_per_referral_credits": format_credits(store.policy.bonus),
        "referred_by_code": link.code if link is not None else None,
    }


def _iso(at: Any) -> str:
    return str(at.isoformat().replace("+00:00", "Z"))


def _json(data: dict[str, Any]) -> web.Response:
    return web.Response(body=msgspec.json.encode(data), content_type="application/json")


def add_referral_routes(app: web.Application, *, admin: bool = False) -> None:
    """``GET /v1/credits/referrals`` (a client key, its own account) on the API app, or, with `admin`,
    ``GET /accounts/{account}/referrals`` on the /admin sub-app."""

    async def own(request: web.Request) -> web.Response:
        caller = await request.config_dict[WALLET_OPS].caller(request)
        return _json(await referrals_view(request.config_dict[ADMIN_OPS], caller.account))

    async def of_account(request: web.Request) -> web.Response:
        account = request.match_info["account"]
        if not ACCOUNT_ID.match(account):
            raise NotFound(f"No account {account!r}.", param="account")
        return _json(await referrals_view(request.config_dict[ADMIN_OPS], account))

    if admin:
        app.router.add_get("/accounts/{account}/referrals", of_account)
    else:
        app.router.add_get("/v1/credits/referrals", own)
