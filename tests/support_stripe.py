"""A fake Stripe API for the payment tests, and Stripe's webhook signing.

`FakeStripe` is an aiohttp app on a real port speaking the part of Stripe's REST API the adapter uses:
form-encoded POSTs (``line_items[0][price_data][currency]=usd``), Bearer auth with the secret key,
Idempotency-Key replay, JSON objects back. The real `stripe` library is pointed at it through
`stripe_api_base`. `pay`, `refund_in_dashboard` and `dispute` change its state as a customer, a
dashboard user or a bank would; `subscribe` and `invoice` are an operator's subscription and its paid
invoices (as an `invoice.paid` event carries them); `event` and `post_event` build and sign webhook
events exactly as Stripe does (``Stripe-Signature: t=<ts>,v1=<hmac>``)."""

from __future__ import annotations

import hashlib
import hmac
import itertools
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import msgspec
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

STRIPE_KEY = "sk_test_fake_secret_key_for_tests"
WEBHOOK_SECRET = "whsec_fake_signing_secret_for_tests"
OLD_SECRET = "whsec_the_secret_being_rotated_out"
_KEY_PART = re.compile(r"\[([^\]]*)\]")


def form_tree(pairs: Any) -> dict[str, Any]:
    """Stripe's form encoding back to nested dicts (list indices stay keys: "0", "1", ...)."""
    tree: dict[str, Any] = {}
    for key, value in pairs:
        head, _, rest = key.partition("[")
        path = [head, *_KEY_PART.findall("[" + rest)] if rest else [head]
        node = tree
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    return tree


@dataclass
class Call:
    method: str
    path: str
    form: dict[str, Any]
    headers: dict[str, str]


@dataclass
class FakeStripe:
    server: TestServer | None = None
    calls: list[Call] = field(default_factory=list)
    sessions: dict[str, dict[str, Any]] = field(default_factory=dict)
    refunds: dict[str, dict[str, Any]] = field(default_factory=dict)
    replies: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)  # by idempotency key
    fail_refunds: int = 0  # the next n refund creates are refused (HTTP 400)
    intents: dict[str, dict[str, Any]] = field(default_factory=dict)
    declines: dict[str, str] = field(default_factory=dict)  # payment method -> the decline code it gets
    subscriptions: dict[str, str] = field(default_factory=dict)  # subscription id -> its price id
    _ids: Any = field(default_factory=lambda: itertools.count(1))

    @property
    def url(self) -> str:
        assert self.server is not None
        return str(self.server.make_url("")).rstrip("/")

    def new_id(self, prefix: str) -> str:
        return f"{prefix}_fake{next(self._ids):06d}"

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/checkout/sessions", self._create_session)
        app.router.add_post("/v1/refunds", self._create_refund)
        app.router.add_get("/v1/refunds", self._list_refunds)
        app.router.add_post("/v1/payment_intents", self._create_intent)
        app.router.add_get("/v1/payment_intents/{id}", self._get_intent)
        return app

    async def _call(self, request: web.Request) -> Call | web.Response:
        form = form_tree((await request.post()).items()) if request.method == "POST" else {}
        call = Call(request.method, request.path, form, dict(request.headers))
        self.calls.append(call)
        if request.headers.get("Authorization") != f"Bearer {STRIPE_KEY}":
            return _error(401, "invalid_request_error", "api_key_invalid")
        return call

    async def _create_session(self, request: web.Request) -> web.Response:
        call = await self._call(request)
        if isinstance(call, web.Response):
            return call
        return self._once(call, lambda: self._session_of(call.form))

    def _session_of(self, form: dict[str, Any]) -> dict[str, Any]:
        item = form["line_items"]["0"]
        session_id = self.new_id("cs_test")
        session = {
            "id": session_id,
            "object": "checkout.session",
            "url": f"https://checkout.stripe.test/c/pay/{session_id}",
            "mode": form["mode"],
            "client_reference_id": form.get("client_reference_id"),
            "metadata": form.get("metadata", {}),
            "amount_total": int(item["price_data"]["unit_amount"]) * int(item["quantity"]),
            "currency": item["price_data"]["currency"],
            "payment_status": "unpaid",
            "status": "open",
            "payment_intent": None,
            "customer": None,
            "customer_creation": form.get("customer_creation"),
            "setup_future_usage": form.get("payment_intent_data", {}).get("setup_future_usage"),
        }
        self.sessions[session_id] = session
        return session

    def _once(self, call: Call, make: Any) -> web.Response:
        key = (call.path, call.headers.get("Idempotency-Key", ""))
        if key[1] and key in self.replies:
            return web.json_response(self.replies[key])
        reply = make()
        if key[1]:
            self.replies[key] = reply
        return web.json_response(reply)

    async def _create_intent(self, request: web.Request) -> web.Response:
        """An off-session, confirmed payment intent: succeeded, or a card error for a declining method."""
        call = await self._call(request)
        if isinstance(call, web.Response):
            return call
        form = call.form
        if form.get("payment_method") in self.declines:
            code = self.declines[form["payment_method"]]
            body = {"error": {"type": "card_error", "code": code, "message": f"fake stripe: {code}"}}
            return web.json_response(body, status=402)

        def intent() -> dict[str, Any]:
            made = {
                "id": self.new_id("pi"),
                "object": "payment_intent",
                "amount": int(form["amount"]),
                "currency": form["currency"],
                "customer": form["customer"],
                "payment_method": form["payment_method"],
                "status": "succeeded",
                "metadata": form.get("metadata", {}),
            }
            self.intents[made["id"]] = made
            return made

        return self._once(call, intent)

    async def _get_intent(self, request: web.Request) -> web.Response:
        call = await self._call(request)
        if isinstance(call, web.Response):
            return call
        intent = self.intents.get(request.match_info["id"])
        if intent is None:
            return _error(404, "invalid_request_error", "resource_missing")
        return web.json_response(intent)

    async def _create_refund(self, request: web.Request) -> web.Response:
        call = await self._call(request)
        if isinstance(call, web.Response):
            return call
        if self.fail_refunds:
            self.fail_refunds -= 1
            return _error(400, "invalid_request_error", "charge_already_refunded")
        form = call.form
        return self._once(call, lambda: self._refund(form["payment_intent"], int(form["amount"]), form))

    def _refund(self, payment_intent: str, amount: int, form: dict[str, Any]) -> dict[str, Any]:
        refund = {
            "id": self.new_id("re"),
            "object": "refund",
            "amount": amount,
            "charge": charge_of(payment_intent),
            "payment_intent": payment_intent,
            "metadata": form.get("metadata", {}),
            "status": "succeeded",
        }
        self.refunds[refund["id"]] = refund
        return refund

    async def _list_refunds(self, request: web.Request) -> web.Response:
        call = await self._call(request)
        if isinstance(call, web.Response):
            return call
        charge = request.query.get("charge")
        data = [r for r in self.refunds.values() if r["charge"] == charge]
        return web.json_response({"object": "list", "url": "/v1/refunds", "has_more": False, "data": data})

    # ---- what happens outside creditgate -----------------------------------------------------------

    def pay(self, session_id: str, status: str = "paid") -> dict[str, Any]:
        """The customer pays on the hosted page: the session (as its completed event carries it)."""
        session = self.sessions[session_id]
        intent = self.new_id("pi")
        session.update(payment_status=status, status="complete", payment_intent=intent)
        if session["customer_creation"] == "always":
            session["customer"] = self.new_id("cus")
        self.intents[intent] = {
            "id": intent,
            "object": "payment_intent",
            "amount": session["amount_total"],
            "currency": session["currency"],
            "customer": session["customer"],
            "payment_method": self.new_id("pm"),
            "status": "succeeded" if status == "paid" else "processing",
            "metadata": {},
        }
        return dict(session)

    def subscribe(self, price: str) -> str:
        """A subscription to `price` the operator made (the dashboard, or the API): its id."""
        sid = self.new_id("sub")
        self.subscriptions[sid] = price
        return sid

    def invoice(
        self, subscription: str, start_s: int, end_s: int, *, legacy: bool = False, price: str | None = None
    ) -> dict[str, Any]:
        """The paid invoice of `subscription`'s period [start_s, end_s) (seconds), as an `invoice.paid`
        event carries it: API 2025-03-31 (basil) names the subscription and the line's price under
        `parent` and `pricing`; `legacy` (older versions) as `subscription` and `price`."""
        price = price or self.subscriptions[subscription]
        line: dict[str, Any] = {
            "id": self.new_id("il"),
            "object": "line_item",
            "amount": 900,
            "currency": "usd",
            "period": {"start": start_s, "end": end_s},
        }
        invoice: dict[str, Any] = {
            "id": self.new_id("in"),
            "object": "invoice",
            "status": "paid",
            "amount_paid": 900,
            "currency": "usd",
            "billing_reason": "subscription_cycle",
            "period_start": start_s,  # (the invoice's own period: the one before; not the line's)
            "period_end": start_s,
        }
        if legacy:
            line.update(
                type="subscription", subscription=subscription, price={"id": price, "object": "price"}
            )
            invoice["subscription"] = subscription
        else:
            line["pricing"] = {
                "type": "price_details",
                "price_details": {"price": price, "product": "prod_x"},
            }
            line["parent"] = {"type": "subscription_item_details", "subscription_item_details": {}}
            details = {"subscription": subscription, "metadata": {}}
            invoice["parent"] = {"type": "subscription_details", "subscription_details": details}
        invoice["lines"] = {"object": "list", "data": [line], "has_more": False}
        return invoice

    def refund_in_dashboard(self, payment_intent: str, amount: int) -> dict[str, Any]:
        return self._refund(payment_intent, amount, {})

    def charge(self, payment_intent: str, *, listed: bool = True) -> dict[str, Any]:
        """The charge of `payment_intent` as a charge.refunded event carries it (newer API versions leave
        out its refunds: `listed=False`)."""
        refunds = [r for r in self.refunds.values() if r["payment_intent"] == payment_intent]
        charge: dict[str, Any] = {
            "id": charge_of(payment_intent),
            "object": "charge",
            "payment_intent": payment_intent,
            "amount_refunded": sum(r["amount"] for r in refunds),
            "refunded": True,
        }
        if listed:
            charge["refunds"] = {"object": "list", "data": refunds, "has_more": False}
        return charge


def charge_of(payment_intent: str) -> str:
    return payment_intent.replace("pi_", "ch_", 1)


def _error(status: int, kind: str, code: str) -> web.Response:
    body = {"error": {"type": kind, "code": code, "message": f"fake stripe: {code}"}}
    return web.json_response(body, status=status)


@pytest.fixture
async def fake_stripe() -> AsyncIterator[FakeStripe]:
    fake = FakeStripe()
    fake.server = TestServer(fake.app())
    await fake.server.start_server()
    yield fake
    await fake.server.close()


def stripe_settings(fake: FakeStripe, **overrides: Any) -> dict[str, Any]:
    """The settings of a sidecar whose Stripe is `fake`."""
    return {
        "stripe_api_key": STRIPE_KEY,
        "stripe_api_base": fake.url,
        "stripe_webhook_secrets": [WEBHOOK_SECRET, OLD_SECRET],
        **overrides,
    }


# ---- webhooks, signed as Stripe signs them --------------------------------------------------------

_events = itertools.count(1)


def event(kind: str, obj: dict[str, Any], event_id: str | None = None) -> bytes:
    body = {
        "id": event_id or f"evt_fake{next(_events):06d}",
        "object": "event",
        "api_version": "2025-03-31.basil",
        "created": int(time.time()),
        "type": kind,
        "livemode": False,
        "data": {"object": obj},
    }
    return msgspec.json.encode(body)


def sign(body: bytes, secret: str = WEBHOOK_SECRET, at: int | None = None) -> str:
    """A Stripe-Signature header for `body` (HMAC-SHA256 of "<t>.<body>")."""
    t = int(time.time()) if at is None else at
    mac = hmac.new(secret.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={t},v1={mac}"


async def post_event(
    client: TestClient[web.Request, web.Application],
    body: bytes,
    *,
    signature: str | None = None,
    path: str = "/webhooks/stripe",
    header: str = "Stripe-Signature",
) -> tuple[int, dict[str, Any]]:
    headers = {"Content-Type": "application/json", header: signature or sign(body)}
    resp = await client.post(path, data=body, headers=headers)
    return resp.status, await resp.json()
