"""What the payment routes share, at `PAYMENT_CONTEXT` in the app (routes.py sets it): the payment
settings, the Stripe adapter (None: checkout is off) and the webhook rejection counts."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

from aiohttp import web
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from ..errors import ServiceUnavailable
from .settings import PaymentSettings
from .stripe_adapter import StripeAdapter


class Rejections(Collector):
    """Webhooks refused before anything was done, by (provider, reason): a plain counter, exported as
    `creditgate_webhook_rejections_total` when registered on the metrics registry."""

    def __init__(self) -> None:
        self.counts: Counter[tuple[str, str]] = Counter()

    def add(self, provider: str, reason: str) -> None:
        self.counts[provider, reason] += 1

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(
            "creditgate_webhook_rejections",
            "Payment webhooks refused (bad or missing signature, stale timestamp, bad body), by reason.",
            labels=["provider", "reason"],
        )
        for (provider, reason), n in sorted(self.counts.items()):
            family.add_metric([provider, reason], n)
        yield family


@dataclass
class PaymentContext:
    settings: PaymentSettings
    rejections: Rejections = field(default_factory=Rejections)
    stripe: StripeAdapter | None = None

    def stripe_on(self) -> StripeAdapter:
        if self.stripe is None:
            raise stripe_off()
        return self.stripe


def stripe_off() -> ServiceUnavailable:
    """The error of a Stripe route when `stripe_api_key` is unset."""
    return ServiceUnavailable(
        "Stripe checkout is off: set stripe_api_key to turn it on.",
        param="stripe_api_key",
        code="checkout_disabled",
    )


PAYMENT_CONTEXT = web.AppKey("payment_context", PaymentContext)
