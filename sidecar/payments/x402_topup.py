"""POST /v1/credits/topup: credits bought with USDC over x402 (a client key, its own account).

The body names the amount, ``{"amount": <USDC atomic units>}`` (6 decimals: 1000000 is $1). Without a
payment header the answer is 402 with the requirements (the v1 body, and the v2 PAYMENT-REQUIRED header).
With X-PAYMENT (v1) or PAYMENT-SIGNATURE (v2) the payment is checked against those requirements, then
verified and settled by the facilitator, and lands once as a purchase grant of ``amount / credit_price``
micro-credits (USDC at $1; an amount that would give a fraction of a micro-credit is refused, 400). A
payment is its network (CAIP-2), payer and EIP-3009 nonce (the nonce is the payer's, on chain): the
order of that ref is claimed once; the same payment presented again credits nothing more, answers the
same 200."""

from __future__ import annotations

from collections.abc import AsyncIterator
from decimal import Decimal
from fractions import Fraction
from typing import Any

import aiohttp
import asyncpg
import msgspec
from aiohttp import web

from ..config import Settings
from ..errors import BadRequest, Conflict, Forbidden, NotFound
from ..money import MAX_GRANT, format_credits
from ..pipeline import admit
from .landing import PAYMENTS, Payments
from .orders import Order
from .settings import PaymentSettings
from .x402_facilitator import Facilitator
from .x402_store import X402Orders
from .x402_wire import (
    PAYMENT_REQUIRED,
    PAYMENT_RESPONSE,
    PAYMENT_SIGNATURE,
    X_PAYMENT,
    X_PAYMENT_RESPONSE,
    Offer,
    Payment,
    SettleResponse,
    caip2,
    decode_payment,
    encode_header,
)

PROVIDER = "x402"
LOCK_CONNECTIONS = 8  # payments of one process settling (or waiting for their order's lock) at once


class TopUpBody(msgspec.Struct, forbid_unknown_fields=True):
    amount: int  # USDC atomic units


class PaymentRequired(Exception):
    """Answered as a 402 with the requirements: no payment, one that does not match, or one the
    facilitator refused (then with its settle response, when settling failed)."""

    def __init__(self, error: str, settled: SettleResponse | None = None) -> None:
        super().__init__(error)
        self.error = error
        self.settled = settled


def micro_credits(amount: int, credit_price: str) -> int:
    """The micro-credits `amount` USDC atomic units buy: USDC has 6 decimals, as micro-credits do, and is
    worth $1, so it is amount / credit_price exactly; refused when that is not a whole micro-credit."""
    price = Fraction(Decimal(credit_price))
    micro = amount / price
    if micro.denominator != 1:
        step = price.numerator
        raise BadRequest(
            f"amount {amount} buys a fraction of a micro-credit at credit_price {credit_price}; "
            f"use a multiple of {step} atomic units.",
            param="amount",
        )
    return int(micro)


class X402TopUps:
    def __init__(
        self, settings: PaymentSettings, payments: Payments, facilitator: Facilitator, store: X402Orders
    ) -> None:
        self.settings = settings
        self.payments = payments
        self.facilitator = facilitator
        self.store = store

    def offer(self, amount: int, resource: str) -> Offer:
        s = self.settings
        if not s.x402_min_amount <= amount <= s.x402_max_amount:
            raise BadRequest(
                f"amount must be {s.x402_min_amount}..{s.x402_max_amount} USDC atomic units.", param="amount"
            )
        if micro_credits(amount, s.credit_price) > MAX_GRANT:
            raise BadRequest("amount buys more credits than one grant may hold.", param="amount")
        assert s.x402_pay_to is not None
        return Offer(s.x402_network, s.x402_asset, s.x402_pay_to, amount, resource, s.x402_timeout_seconds)

    async def pay(
        self, account: str, offer: Offer, payment: Payment
    ) -> tuple[dict[str, Any], SettleResponse]:
        """Verify, settle and land `payment` for `account` once; (the grant's view, the settle response)."""
        why = offer.mismatch(payment)
        if why is not None:
            raise PaymentRequired(f"The payment does not match the requirements: {why}.")
        micro = micro_credits(offer.amount, self.settings.credit_price)  # checked by offer()
        # The same authorization sent as v1 and as v2 is one payment: its network in one (CAIP-2) form.
        ref = f"{caip2(payment.network)}:{payment.payer.lower()}:{payment.nonce.lower()}"
        order, _ = await self.payments.orders.claim_ref(
            account, PROVIDER, ref, credits=micro, amount_minor=offer.amount, currency="usdc",
            note=f"x402 v{payment.version} from {payment.payer}",
        )  # fmt: skip
        if order.account != account:
            raise Forbidden("This payment was presented for another account.", param=payment.header)
        if order.amount_minor != offer.amount:
            raise Conflict("This payment was presented before for another amount.", param=payment.header)
        async with self.store.locked(order.order_id):
            current = await self.payments.orders.get(order.order_id)
            assert current is not None
            settled = await self._settle(current, offer, payment)
            if settled is not None:
                await self.store.record_settled(order.order_id, settled.transaction or ref)
                current = await self.payments.orders.get(order.order_id)
                assert current is not None
            landed = await self.payments.land(current, payment_ref=current.payment_ref)
        tx = current.payment_ref or ""
        return landed, settled or SettleResponse(True, tx, payment.network, payment.payer)

    async def _settle(self, order: Order, offer: Offer, payment: Payment) -> SettleResponse | None:
        """The facilitator's settle of a pending order not settled yet (None: it was, or it is paid)."""
        if order.status == "paid" or (order.status == "pending" and order.payment_ref is not None):
            return None
        if order.status != "pending":
            raise PaymentRequired(
                f"This payment was refused before (order {order.status}); sign a new one (a new nonce)."
            )
        requirements = offer.requirements(payment.version)
        verified = await self.facilitator.verify(payment.version, payment.raw, requirements)
        if not verified.is_valid:  # nothing happened on chain: the order stays pending
            raise PaymentRequired(f"The facilitator refused the payment: {verified.invalid_reason}.")
        settled = await self.facilitator.settle(payment.version, payment.raw, requirements)
        if not settled.success:
            await self.payments.orders.set_status(order.order_id, "failed")
            raise PaymentRequired(f"The payment did not settle: {settled.error_reason}.", settled)
        return settled


X402 = web.AppKey("x402_topups", X402TopUps)


def _headers(payment: Payment | None, settled: SettleResponse | None) -> dict[str, str]:
    if settled is None:
        return {}
    out = {PAYMENT_RESPONSE: encode_header(settled)}
    if payment is not None and payment.version == 1:
        out[X_PAYMENT_RESPONSE] = out[PAYMENT_RESPONSE]
    return out


def _required(offer: Offer, err: PaymentRequired, payment: Payment | None) -> web.Response:
    headers = {
        PAYMENT_REQUIRED: encode_header(offer.required_v2(err.error)),
        **_headers(payment, err.settled),
    }
    return web.Response(
        status=402, body=msgspec.json.encode(offer.required_v1(err.error)), content_type="application/json",
        headers=headers,
    )  # fmt: skip


def add_x402_routes(app: web.Application, settings: Settings, proxy: web.AppKey[Any]) -> None:
    """POST /v1/credits/topup on `app` (the API app); `proxy` is the gateway's key (the caller's key)."""

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        url = settings.x402_facilitator_url
        if url is None or settings.x402_pay_to is None:
            yield
            return
        assert settings.database_url is not None
        # The order locks' own connections (see X402Orders.locked): a payment waiting for its order's lock
        # never takes a connection the lock's holder needs to land it.
        locks = await asyncpg.create_pool(settings.database_url, min_size=0, max_size=LOCK_CONNECTIONS)
        async with aiohttp.ClientSession() as session:
            facilitator = Facilitator(session, url, settings.x402_facilitator_timeout_seconds)
            app[X402] = X402TopUps(
                settings, app[PAYMENTS], facilitator, X402Orders(app[PAYMENTS].orders.pool, locks)
            )
            try:
                yield
            finally:
                await locks.close()

    async def topup(request: web.Request) -> web.Response:
        gateway = request.config_dict[proxy]
        caller = await admit.authenticate(request.headers, gateway.accounts, gateway.admit_policy)
        topups = request.config_dict.get(X402)
        if topups is None:
            raise NotFound(
                "x402 top-ups are off: set x402_facilitator_url and x402_pay_to.",
                param="x402_facilitator_url",
            )
        try:
            amount = msgspec.json.decode(await request.read(), type=TopUpBody).amount
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise BadRequest(
                f'The body must be {{"amount": <USDC atomic units>}}: {exc}.', param="amount"
            ) from None
        offer = topups.offer(amount, str(request.url))
        present = [h for h in (X_PAYMENT, PAYMENT_SIGNATURE) if h in request.headers]
        if len(present) > 1:
            raise BadRequest(f"Send one of {X_PAYMENT} and {PAYMENT_SIGNATURE}, not both.", param=present[1])
        payment = decode_payment(present[0], request.headers[present[0]]) if present else None
        try:
            if payment is None:
                raise PaymentRequired(f"A payment is required: {X_PAYMENT} (v1) or {PAYMENT_SIGNATURE} (v2).")
            landed, settled = await topups.pay(caller.account, offer, payment)
        except PaymentRequired as err:
            return _required(offer, err, payment)
        body = {
            "object": "credits.topup",
            "order": landed["order"],
            "credited": landed["credited"],
            "credits": landed["amount"],
            "credits_credits": format_credits(landed["amount"]),
            "balance": landed["balance"],
            "balance_credits": landed["balance_credits"],
            "transaction": settled.transaction,
        }
        return web.Response(
            body=msgspec.json.encode(body),
            content_type="application/json",
            headers=_headers(payment, settled),
        )

    app.cleanup_ctx.append(lifecycle)
    app.router.add_post("/v1/credits/topup", topup)
