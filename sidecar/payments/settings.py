"""The payment settings, a part of `config.Settings` (which inherits these fields; they are documented in
the README beside the rest). Money amounts are integer minor units of `currency`; the credit price is an
exact decimal string of the currency's major unit per credit."""

from __future__ import annotations

from typing import Annotated

import msgspec


class PackageConfig(msgspec.Struct, forbid_unknown_fields=True):
    """A package of credits sold at checkout: its credits (an exact decimal string) and, when it is not
    `credits` × `credit_price`, its own price in minor units."""

    credits: str
    price_minor: Annotated[int, msgspec.Meta(ge=0)] | None = None
    name: str | None = None


class WebhookProviderConfig(msgspec.Struct, forbid_unknown_fields=True):
    """A payment provider other than Stripe that signs its webhooks like Stripe does (HMAC-SHA256 over
    `<timestamp>.<body>`, in `header` as ``t=<unix seconds>,v1=<hex>``); any of `secrets` verifies."""

    secrets: list[str]
    header: str = "x-creditgate-signature"


def default_packages() -> dict[str, PackageConfig]:
    return {
        "starter": PackageConfig(credits="1000", name="Starter"),
        "pro": PackageConfig(credits="5000", name="Pro"),
        "enterprise": PackageConfig(credits="25000", name="Enterprise"),
    }


class PaymentSettings(msgspec.Struct, kw_only=True):
    # Packages and top-up tiers (GET /v1/credits/packages): the currency, the price of one credit, the
    # packages, the one-off top-up amounts offered (minor units) and the range a custom amount may take.
    currency: str = "usd"
    credit_price: str = "0.01"
    packages: dict[str, PackageConfig] = msgspec.field(default_factory=default_packages)
    top_up_amounts: list[Annotated[int, msgspec.Meta(gt=0)]] = msgspec.field(
        default_factory=lambda: [1000, 5000, 10000, 50000]
    )
    top_up_min_minor: Annotated[int, msgspec.Meta(gt=0)] = 500
    top_up_max_minor: Annotated[int, msgspec.Meta(gt=0)] = 1_000_000
    # Stripe Checkout: the secret API key (unset: checkout is off), the API's base URL (a test's fake
    # Stripe), the webhook signing secrets (several while one rotates), where the hosted page returns.
    stripe_api_key: str | None = None
    stripe_api_base: str | None = None
    stripe_webhook_secrets: list[str] = msgspec.field(default_factory=list)
    checkout_success_url: str = "http://localhost:8080/portal?checkout=success"
    checkout_cancel_url: str = "http://localhost:8080/portal?checkout=canceled"
    # Webhooks: how old (or how far ahead) a signed timestamp may be; other providers' HMAC webhooks
    # (POST /webhooks/<name>).
    webhook_tolerance_seconds: Annotated[int, msgspec.Meta(ge=1, le=3600)] = 300
    payment_webhooks: dict[str, WebhookProviderConfig] = msgspec.field(default_factory=dict)
    # Refunds of unused purchased credits by an operator: how long after the purchase.
    refund_window_days: Annotated[int, msgspec.Meta(ge=0, le=3650)] = 30
    # x402 (USDC) top-ups at POST /v1/credits/topup: the facilitator (unset: off), where the USDC goes,
    # the network and the asset (the USDC contract), the amounts a payment may carry (minor units of
    # USDC: 6 decimals), how long a payment requirement is good for, and how long the facilitator may take
    # to answer one /verify or /settle.
    x402_facilitator_url: str | None = None
    x402_pay_to: str | None = None
    x402_network: str = "base-sepolia"
    x402_asset: str = "0x036CbD53842c5426634e7929541eC2318f3dCF7e"
    x402_min_amount: Annotated[int, msgspec.Meta(gt=0)] = 1_000_000
    x402_max_amount: Annotated[int, msgspec.Meta(gt=0)] = 1_000_000_000
    x402_timeout_seconds: Annotated[int, msgspec.Meta(ge=1, le=3600)] = 300
    x402_facilitator_timeout_seconds: Annotated[int, msgspec.Meta(ge=1, le=300)] = 30
    # Referrals: the codes' prefix, how many each account has, how often one code may be used, and the
    # bonus (credits, decimal) its owner earns when a referred account's first purchase lands.
    referral_code_prefix: str = "STR-"
    referral_codes_per_account: Annotated[int, msgspec.Meta(ge=0, le=100)] = 5
    referral_code_max_uses: Annotated[int, msgspec.Meta(ge=1)] = 10
    referral_bonus_credits: str = "25"
