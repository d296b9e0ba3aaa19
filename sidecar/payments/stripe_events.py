"""What a verified Stripe event does (webhooks.py checks its signature first). Each lands or reverses through
`Payments`, whose grant and reversal ids make a repeated or concurrent event change nothing more:

- `checkout.session.completed` (payment_status 'paid') and `checkout.session.async_payment_succeeded`:
  the order (metadata.order_id, else client_reference_id; its session id must match) lands, when the
  session's amount_total and currency are the order's (else 'amount_mismatch', nothing credited); a
  checkout that asked to save the card saves its customer and payment method (methods.py);
- `checkout.session.expired` / `checkout.session.async_payment_failed`: a pending order ends;
- `charge.refunded`: each refund of the charge takes back its share of the order's credits, once per
  refund ('stripe:<refund id>'; an operator's refund carries its own reversal id in metadata);
- `charge.dispute.created`: the disputed share is taken back ('stripe:<dispute id>');
- `charge.dispute.closed` with status 'won': what that dispute took back is given back, once (a `refund`
  grant, `Payments.restore`); a lost dispute changes nothing more;
- `payment_intent.succeeded` / `payment_intent.payment_failed` of an off-session payment (auto-reload:
  metadata.charge 'off_session' and order_id): the order lands (amount and currency checked), or fails
  (`Payments.fail`). A checkout's own payment intent is left to its session's events;
- `invoice.paid` of a provider-billed subscription: the period it paid is granted, once
  (documents/plan_invoices.py, given as `invoices` when plans are on).

Anything else, or an order that is not ours, is an outcome to record, never an error."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import msgspec

from ..errors import BadRequest
from . import methods
from .landing import Payments
from .orders import Order
from .stripe_adapter import RefundSeen, StripeAdapter

PROVIDER = "stripe"
OFF_SESSION = "off_session"  # metadata.charge of the payment intents StripeAdapter.charge_saved makes
Outcome = tuple[str | None, str]  # (the order id, what happened)


class Session(msgspec.Struct):
    id: str
    client_reference_id: str | None = None
    metadata: dict[str, str] = {}
    payment_status: str | None = None
    payment_intent: str | None = None
    amount_total: int | None = None
    currency: str | None = None
    customer: str | None = None


class Refund(msgspec.Struct):
    id: str
    amount: int
    metadata: dict[str, str] = {}


class RefundList(msgspec.Struct):
    data: list[Refund] = []
    has_more: bool = False


class Charge(msgspec.Struct):
    id: str
    payment_intent: str | None = None
    refunds: RefundList | None = None


class Dispute(msgspec.Struct):
    id: str
    amount: int
    payment_intent: str | None = None
    status: str | None = None


class PaymentError(msgspec.Struct):
    code: str | None = None


class Intent(msgspec.Struct):
    id: str
    amount: int | None = None
    currency: str | None = None
    metadata: dict[str, str] = {}
    last_payment_error: PaymentError | None = None


class EventData(msgspec.Struct):
    object: msgspec.Raw


class Event(msgspec.Struct):
    id: str
    type: str
    data: EventData


def decode_event(body: bytes) -> Event:
    try:
        return msgspec.json.decode(body, type=Event)
    except msgspec.MsgspecError as exc:
        raise BadRequest(f"Invalid Stripe event: {exc}", param="body") from None


def share(order: Order, amount_minor: int) -> int:
    """The micro-credits `amount_minor` of the order's price bought (rounded down, at most all of them)."""
    if order.amount_minor <= 0 or amount_minor <= 0:
        return 0
    return min(order.credits, order.credits * amount_minor // order.amount_minor)


class StripeEvents:
    def __init__(
        self,
        payments: Payments,
        adapter: StripeAdapter | None,
        invoices: Callable[[msgspec.Raw], Awaitable[Outcome]] | None = None,
    ) -> None:
        self.payments = payments
        self.orders = payments.orders
        self.adapter = adapter
        self.handlers: dict[str, Callable[[msgspec.Raw], Awaitable[Outcome]]] = {
            "checkout.session.completed": lambda raw: self._paid(raw, paid_only=True),
            "checkout.session.async_payment_succeeded": lambda raw: self._paid(raw, paid_only=False),
            "checkout.session.expired": lambda raw: self._ended(raw, "expired"),
            "checkout.session.async_payment_failed": lambda raw: self._ended(raw, "failed"),
            "charge.refunded": self._refunded,
            "charge.dispute.created": self._disputed,
            "charge.dispute.closed": self._dispute_closed,
            "payment_intent.succeeded": self._intent_paid,
            "payment_intent.payment_failed": self._intent_failed,
        }
        if invoices is not None:
            self.handlers["invoice.paid"] = invoices

    async def apply(self, event: Event) -> Outcome:
        handler = self.handlers.get(event.type)
        if handler is None:
            return None, "ignored"
        try:
            return await handler(event.data.object)
        except msgspec.MsgspecError as exc:
            raise BadRequest(f"Invalid {event.type} object: {exc}", param="data.object") from None

    async def _session_order(self, s: Session) -> tuple[Order | None, Outcome]:
        claimed = s.metadata.get("order_id") or s.client_reference_id
        if claimed is None:
            return None, (None, "unknown_order")
        if s.client_reference_id not in (None, claimed):
            return None, (claimed, "order_mismatch")
        order = await self.orders.get(claimed) if len(claimed) <= 200 else None
        if order is None or order.provider != PROVIDER:
            return None, (claimed, "unknown_order")
        if order.provider_ref is None:  # the session was made but its id not stored (a crash between)
            await self.orders.set_provider_ref(order.order_id, s.id)
        elif order.provider_ref != s.id:
            return None, (order.order_id, "session_mismatch")
        return order, (order.order_id, "")

    async def _paid(self, raw: msgspec.Raw, *, paid_only: bool) -> Outcome:
        s = msgspec.json.decode(raw, type=Session)
        if "document" in s.metadata:  # an issued invoice's checkout (documents/invoices_api.py)
            return await self._document_paid(s, paid_only=paid_only)
        order, outcome = await self._session_order(s)
        if order is None:
            return outcome
        if paid_only and s.payment_status != "paid":
            return order.order_id, "awaiting_payment"  # an async method: its _succeeded event lands it
        if s.amount_total != order.amount_minor or (s.currency or "").lower() != order.currency:
            return order.order_id, "amount_mismatch"
        landed = await self.payments.land(order, s.payment_intent)
        if s.metadata.get("save_payment_method") == "1" and s.customer and s.payment_intent:
            await self._save_method(order, s.customer, s.payment_intent)
        return order.order_id, "landed" if landed["credited"] else "already_landed"

    async def _document_paid(self, s: Session, *, paid_only: bool) -> Outcome:
        if paid_only and s.payment_status != "paid":
            return None, "awaiting_payment"
        pay = self.payments.pay_document
        if pay is None or s.amount_total is None or not s.currency:
            return None, "unknown_invoice"
        payment_id = f"stripe:{s.payment_intent or s.id}"
        return None, await pay(s.metadata["document"][:200], payment_id, s.amount_total, s.currency, PROVIDER)

    async def _save_method(self, order: Order, customer: str, payment_intent: str) -> None:
        """The card the checkout asked to keep becomes the account's saved method (auto-reload)."""
        method = await self.adapter.payment_method_of(payment_intent) if self.adapter else None
        if method:
            await methods.save(self.orders.pool, order.account, methods.checked(customer, method))

    async def _ended(self, raw: msgspec.Raw, status: str) -> Outcome:
        order, outcome = await self._session_order(msgspec.json.decode(raw, type=Session))
        if order is None:
            return outcome
        ended = await self.orders.set_status(order.order_id, "expired" if status == "expired" else "failed")
        return order.order_id, status if ended else f"{status}_ignored"

    async def _payment_order(self, payment_intent: str | None) -> Order | None:
        if payment_intent is None or len(payment_intent) > 200:
            return None
        return await self.orders.by_payment_ref(PROVIDER, payment_intent)

    async def _refunded(self, raw: msgspec.Raw) -> Outcome:
        charge = msgspec.json.decode(raw, type=Charge)
        order = await self._payment_order(charge.payment_intent)
        if order is None:
            return None, "unknown_order"
        listed = charge.refunds
        if listed is not None and not listed.has_more:
            refunds = [RefundSeen(r.id, r.amount, r.metadata.get("reversal_id")) for r in listed.data]
        elif self.adapter is not None:  # newer API versions do not list a charge's refunds in the event
            refunds = await self.adapter.refunds_of(charge.id)
        else:
            return order.order_id, "refunds_unlisted"
        ours = f"operator:{order.order_id}:"
        for refund in refunds:
            # An operator's refund was taken back already, under its own id: never twice.
            mine = refund.reversal_id if (refund.reversal_id or "").startswith(ours) else None
            reversal_id = mine or f"stripe:{refund.refund_id}"
            await self.payments.reverse(order, reversal_id, "refund", share(order, refund.amount))
            await self.payments.refunded(order, reversal_id, refund.amount)
        return order.order_id, "reversed"

    async def _dispute_order(self, raw: msgspec.Raw) -> tuple[Dispute, Order | None]:
        dispute = msgspec.json.decode(raw, type=Dispute)
        return dispute, await self._payment_order(dispute.payment_intent)

    async def _disputed(self, raw: msgspec.Raw) -> Outcome:
        dispute, order = await self._dispute_order(raw)
        if order is None:
            return None, "unknown_order"
        await self.payments.reverse(order, f"stripe:{dispute.id}", "dispute", share(order, dispute.amount))
        return order.order_id, "reversed"

    async def _dispute_closed(self, raw: msgspec.Raw) -> Outcome:
        dispute, order = await self._dispute_order(raw)
        if order is None:
            return None, "unknown_order"
        if dispute.status != "won":
            return order.order_id, f"dispute_{dispute.status or 'closed'}"
        await self.payments.restore(order, f"stripe:{dispute.id}")
        return order.order_id, "restored"

    async def _intent_order(self, raw: msgspec.Raw) -> tuple[Intent, Order | None, Outcome]:
        intent = msgspec.json.decode(raw, type=Intent)
        claimed = intent.metadata.get("order_id")
        if intent.metadata.get("charge") != OFF_SESSION or not claimed or len(claimed) > 200:
            return intent, None, (claimed, "ignored")  # a checkout's intent: its session's events count
        order = await self.orders.get(claimed)
        if order is None or order.provider != PROVIDER:
            return intent, None, (claimed, "unknown_order")
        if order.provider_ref is None:  # the intent was made but its id not stored yet
            await self.orders.set_provider_ref(order.order_id, intent.id)
        elif order.provider_ref != intent.id:
            return intent, None, (order.order_id, "intent_mismatch")
        return intent, order, (order.order_id, "")

    async def _intent_paid(self, raw: msgspec.Raw) -> Outcome:
        intent, order, outcome = await self._intent_order(raw)
        if order is None:
            return outcome
        if intent.amount != order.amount_minor or (intent.currency or "").lower() != order.currency:
            return order.order_id, "amount_mismatch"
        landed = await self.payments.land(order, intent.id)
        return order.order_id, "landed" if landed["credited"] else "already_landed"

    async def _intent_failed(self, raw: msgspec.Raw) -> Outcome:
        intent, order, outcome = await self._intent_order(raw)
        if order is None:
            return outcome
        error = intent.last_payment_error
        ended = await self.payments.fail(order, (error.code if error else None) or "payment_failed")
        return order.order_id, "failed" if ended else "failed_ignored"
