"""Stripe's API, through the official `stripe` library's async client: Checkout Sessions for orders, refunds
of operator refunds, and the refunds of a charge. Every create carries an idempotency key (the order id, the
reversal id), so a retried call makes nothing twice. Stripe's errors become a 502 that names no secret."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import stripe

from ..errors import UpstreamUnavailable
from .orders import Order

log = logging.getLogger("creditgate.stripe")


@dataclass(frozen=True, slots=True)
class Session:
    session_id: str
    url: str


@dataclass(frozen=True, slots=True)
class RefundSeen:
    """One refund of a charge, as a webhook or the refund list shows it."""

    refund_id: str
    amount: int
    reversal_id: str | None  # ours: the refund was an operator's (metadata.reversal_id)


class PaymentDeclined(Exception):
    """Stripe refused an off-session payment (the card declined, or it needs the customer present)."""

    def __init__(self, code: str) -> None:
        super().__init__(code)
        self.code = code


class StripeAdapter:
    """The calls creditgate makes to Stripe. `close()` ends its HTTP session."""

    def __init__(self, api_key: str, api_base: str | None = None, *, retries: int = 2) -> None:
        bases: Any = {"api": api_base.rstrip("/")} if api_base else None
        self.http = stripe.AIOHTTPClient()
        self.client = stripe.StripeClient(
            api_key, base_addresses=bases, http_client=self.http, max_network_retries=retries
        )

    async def close(self) -> None:
        await self.http.close_async()  # type: ignore[no-untyped-call]

    async def create_session(
        self, order: Order, name: str, success_url: str, cancel_url: str, *, save_method: bool = False
    ) -> Session:
        """A hosted Checkout Session that sells `order` (once per order: its id is the idempotency key).
        With `save_method` Stripe keeps the card on a customer for later off-session payments."""
        params: Any = {
            "mode": "payment",
            "client_reference_id": order.order_id,
            "metadata": {"order_id": order.order_id, "account": order.account},
            "payment_intent_data": {"metadata": {"order_id": order.order_id}},
            "line_items": [
                {
                    "quantity": 1,
                    "price_data": {
                        "currency": order.currency,
                        "unit_amount": order.amount_minor,
                        "product_data": {"name": name},
                    },
                }
            ],
            "success_url": success_url,
            "cancel_url": cancel_url,
        }
        if save_method:
            params["payment_intent_data"]["setup_future_usage"] = "off_session"
            params["customer_creation"] = "always"
            params["metadata"]["save_payment_method"] = "1"
        async with _calling("create a checkout session"):
            made = await self.client.v1.checkout.sessions.create_async(
                params, {"idempotency_key": order.order_id}
            )
        return Session(made.id, made.url or "")

    async def document_session(
        self, document: dict[str, Any], amount_minor: int, success_url: str, cancel_url: str
    ) -> Session:
        """A hosted Checkout Session that pays `amount_minor` of an issued invoice (once per document and
        amount due: the idempotency key). Its `checkout.session.completed` records the payment."""
        doc_id = document["id"]
        params: Any = {
            "mode": "payment",
            "client_reference_id": doc_id,
            "metadata": {"document": doc_id, "account": document["account"]},
            "payment_intent_data": {"metadata": {"document": doc_id}},
            "line_items": [
                {
                    "quantity": 1,
                    "price_data": {
                        "currency": document["currency"],
                        "unit_amount": amount_minor,
                        "product_data": {"name": f"Invoice {document['number']}"},
                    },
                }
            ],
            "success_url": success_url,
            "cancel_url": cancel_url,
        }
        async with _calling("create a checkout session"):
            made = await self.client.v1.checkout.sessions.create_async(
                params, {"idempotency_key": f"pay:{doc_id}:{amount_minor}"}
            )
        return Session(made.id, made.url or "")

    async def charge_saved(self, order: Order, customer: str, payment_method: str) -> str:
        """An off-session payment for `order` with the customer's saved payment method (once per order:
        its id is the idempotency key); the payment intent's id. Its credits arrive by the verified
        `payment_intent.succeeded` webhook. Raises PaymentDeclined when the card is refused."""
        params: Any = {
            "amount": order.amount_minor,
            "currency": order.currency,
            "customer": customer,
            "payment_method": payment_method,
            "off_session": True,
            "confirm": True,
            "metadata": {"order_id": order.order_id, "account": order.account, "charge": "off_session"},
        }
        async with _calling("create a payment"):
            try:
                made = await self.client.v1.payment_intents.create_async(
                    params, {"idempotency_key": order.order_id}
                )
            except stripe.CardError as exc:
                raise PaymentDeclined(exc.code or "card_declined") from None
        return made.id

    async def payment_method_of(self, payment_intent: str) -> str | None:
        """The payment method a payment intent was paid with (to save it for off-session payments)."""
        async with _calling("read a payment"):
            intent = await self.client.v1.payment_intents.retrieve_async(payment_intent)
        method = intent.payment_method
        return method if isinstance(method, str) else (method.id if method is not None else None)

    async def refund(self, payment_intent: str, amount: int, reversal_id: str) -> str:
        """Refund `amount` minor units of `payment_intent`, once per `reversal_id`; the refund's id."""
        params: Any = {
            "payment_intent": payment_intent,
            "amount": amount,
            "metadata": {"reversal_id": reversal_id},
        }
        async with _calling("create a refund"):
            made = await self.client.v1.refunds.create_async(params, {"idempotency_key": reversal_id})
        return made.id

    async def refunds_of(self, charge: str) -> list[RefundSeen]:
        """The refunds of `charge` (for a `charge.refunded` event whose charge does not list them)."""
        params: Any = {"charge": charge, "limit": 100}
        async with _calling("list refunds"):
            page = await self.client.v1.refunds.list_async(params)
        return [refund_seen(r.to_dict()) for r in page.data]


def refund_seen(raw: dict[str, Any]) -> RefundSeen:
    metadata = raw.get("metadata") or {}
    reversal = metadata.get("reversal_id")
    return RefundSeen(str(raw["id"]), int(raw["amount"]), str(reversal) if reversal else None)


@contextlib.asynccontextmanager
async def _calling(what: str) -> AsyncIterator[None]:
    """Stripe's errors as an UpstreamUnavailable naming the call and Stripe's error code, nothing more
    (a message could echo a part of the request)."""
    try:
        yield
    except stripe.StripeError as exc:
        code = exc.code or type(exc).__name__
        log.error("Stripe refused to %s: %s (HTTP %s)", what, code, exc.http_status)
        raise UpstreamUnavailable(
            f"Stripe could not {what} ({code}); retry shortly.", code="stripe_error"
        ) from None
