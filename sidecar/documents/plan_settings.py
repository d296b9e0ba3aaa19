"""The settings of subscription plans, a part of `config.Settings` (the README's "Subscription plans"
section documents each). msgspec takes one base with fields per Struct, so this block stands in the
chain of bases: Settings inherits it, it inherits the idempotency settings."""

from __future__ import annotations

import re
from typing import Annotated, Literal

import msgspec

from ..errors import ConfigError
from ..money import MAX_GRANT
from .tax_settings import TaxSettings

PLAN_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}\Z")
STRIPE_PRICE = re.compile(r"^price_[A-Za-z0-9_]{1,194}\Z")


class PlanConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """One plan of the catalog: its price per period (minor units of `currency`), who collects it (the
    operator, or Stripe: `billing` "provider" with the plan's `stripe_price`), the micro-credits each
    period grants, and what of them the next period carries."""

    included_credits: int  # micro-credits granted at each period's start, expiring at its end
    price: int = 0  # minor units per period
    period: Literal["month", "year"] = "month"
    rollover: Literal["none", "all", "capped"] = "none"
    rollover_cap: int | None = None  # micro-credits, with rollover "capped"
    title: str | None = None  # shown in the catalog
    # Who collects the price: "operator" (the worker grants each period), or "provider" (Stripe bills its
    # price `stripe_price`; each period is granted on its verified invoice.paid webhook).
    billing: Literal["operator", "provider"] = "operator"
    stripe_price: str | None = None  # the Stripe price id (price_...), with billing "provider" only


class PlanSettings(TaxSettings, kw_only=True):
    # The plan catalog (name -> plan), and how often the worker grants the periods that came due.
    plans: dict[str, PlanConfig] = msgspec.field(default_factory=dict)
    subscription_interval_seconds: Annotated[float, msgspec.Meta(gt=0)] = 60.0


def check_plan_settings(settings: PlanSettings) -> None:
    """What the types cannot say; raises ConfigError naming the setting (plans.<name>.<field>)."""
    for name, plan in settings.plans.items():
        where = f"plans.{name}"
        if not PLAN_NAME.match(name):
            raise ConfigError(f"{where}: a plan's name is 1-64 characters of A-Z a-z 0-9 _ . -.", param=where)
        if not 0 < plan.included_credits <= MAX_GRANT:
            raise ConfigError(
                f"{where}.included_credits must be between 1 and {MAX_GRANT} micro-credits.",
                param=f"{where}.included_credits",
            )
        if plan.price < 0:
            raise ConfigError(f"{where}.price must be 0 or more (minor units).", param=f"{where}.price")
        if (plan.rollover == "capped") != (plan.rollover_cap is not None):
            raise ConfigError(
                f"{where}.rollover_cap is given with rollover 'capped', and only then.",
                param=f"{where}.rollover_cap",
            )
        if (plan.billing == "provider") != (plan.stripe_price is not None):
            raise ConfigError(
                f"{where}.stripe_price (a Stripe price id) is given with billing 'provider', and only then.",
                param=f"{where}.stripe_price",
            )
        if plan.stripe_price is not None and not STRIPE_PRICE.match(plan.stripe_price):
            raise ConfigError(
                f"{where}.stripe_price must be a Stripe price id (price_..., at most 200 characters).",
                param=f"{where}.stripe_price",
            )
        if plan.billing == "provider" and not settings.stripe_webhook_secrets:
            raise ConfigError(
                f"{where}: a provider-billed plan is granted on Stripe's signed invoice.paid webhook;"
                " set stripe_webhook_secrets.",
                param="stripe_webhook_secrets",
            )
        if plan.rollover_cap is not None and not 0 < plan.rollover_cap <= MAX_GRANT:
            raise ConfigError(
                f"{where}.rollover_cap must be between 1 and {MAX_GRANT} micro-credits.",
                param=f"{where}.rollover_cap",
            )
