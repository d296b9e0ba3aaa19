"""The HTTP side of issued documents: the caller's own (/v1/invoices, /v1/invoices/{id}[.pdf|.csv]), the
operator's any (/admin/invoices...), an invoice's payments (POST /admin/invoices/{id}/payments), and the
feature that hangs receipts and credit notes on money in and money back (features.py)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
from aiohttp import web

from ..admin import ADMIN_OPS, storable
from ..config import Settings
from ..errors import BadRequest, Conflict
from ..features import Feature, Running
from ..payments.context import PAYMENT_CONTEXT
from ..payments.packages import credit_price_of
from ..wallet_api import WALLET_OPS, _decode, _json
from .billing_modes_api import BILLING_MODES
from .invoices import Invoices
from .invoicing import Invoicing
from .issuing import Issuer, Payment
from .render import csv_text, pdf
from .tax import TaxTable

INVOICES = web.AppKey("invoices", Invoices)
INVOICING = web.AppKey("invoicing", Invoicing)
DOC_ID = r"{id:doc_[0-9a-f]{1,40}}"


class PaymentBody(msgspec.Struct, forbid_unknown_fields=True):
    payment_id: str  # the payment's own id: a second call with it records nothing more
    amount_minor: int | None = None  # default: all that is due
    method: str = "manual"


def issuer_of(settings: Settings, clock: Callable[[], int]) -> Issuer:
    seller = settings.seller
    return Issuer(
        prefix=settings.document_issuer,
        seller={
            "name": seller.name,
            "address_lines": list(seller.address_lines),
            "city": seller.city,
            "postal_code": seller.postal_code,
            "region": seller.region,
            "country": settings.tax_seller_country,
            "tax_id": seller.tax_id,
            "email": seller.email,
        },
        table=TaxTable.of(settings),
        clock=clock,
    )


async def start(app: web.Application, running: Running) -> None:
    wallet = running.services.balances.wallet
    invoices = app[INVOICES] = Invoices(
        running.services.store.pool, issuer_of(running.settings, wallet.clock), app[ADMIN_OPS].grant
    )
    running.payments.on_purchase.append(invoices.on_purchase)
    running.payments.on_refund.append(invoices.credit_note)
    running.payments.pay_document = invoices.pay_by_webhook
    s = running.settings
    invoicing = app[INVOICING] = Invoicing(
        invoices,
        credit_price=credit_price_of(s),
        currency=s.currency,
        block_after_days=s.invoice_block_after_days,
        blocker=app[BILLING_MODES].set_blocked,
        plans=s.plans,
    )

    async def invoicing_pass() -> None:
        await invoicing.run_pass()

    if running.node_tasks:
        running.tasks.every("invoicing", s.invoice_interval_seconds, invoicing_pass)


def _limit(request: web.Request) -> int:
    raw = request.query.get("limit", "10")
    if not raw.isdigit() or len(raw) > 4:
        raise BadRequest("limit must be a whole number between 1 and 100.", param="limit")
    return int(raw)


def _kind(request: web.Request) -> str | None:
    return request.query.get("kind")


def _starting_after(request: web.Request) -> str | None:
    raw = request.query.get("starting_after")
    if raw is not None and (len(raw) > 64 or not storable(raw)):
        raise BadRequest("starting_after must be a document id.", param="starting_after")
    return raw


def _files(
    router: web.UrlDispatcher, prefix: str, account_of: Callable[[web.Request], Awaitable[str | None]]
) -> None:
    """GET <prefix>/{id}, .pdf and .csv; `account_of(request)` is the account whose documents may be read
    (None: the operator's, any)."""

    async def body(request: web.Request) -> dict[str, Any]:
        account = await account_of(request)
        return await request.config_dict[INVOICES].view(request.match_info["id"], account)

    async def one(request: web.Request) -> web.Response:
        return _json(await body(request))

    async def as_pdf(request: web.Request) -> web.Response:
        doc = await body(request)
        # fpdf2 reads and subsets the fonts for each document: 0.2-0.3 s of CPU, off the event loop
        rendered = await asyncio.to_thread(pdf, doc)
        return web.Response(
            body=rendered,
            content_type="application/pdf",
            headers={"Content-Disposition": f'inline; filename="{doc["number"]}.pdf"'},
        )

    async def as_csv(request: web.Request) -> web.Response:
        doc = await body(request)
        return web.Response(
            text=csv_text(doc),
            content_type="text/csv",
            headers={"Content-Disposition": f'attachment; filename="{doc["number"]}.csv"'},
        )

    router.add_get(f"{prefix}/{DOC_ID}.pdf", as_pdf)
    router.add_get(f"{prefix}/{DOC_ID}.csv", as_csv)
    router.add_get(f"{prefix}/{DOC_ID}", one)


def routes(app: web.Application, settings: Settings) -> None:
    async def own(request: web.Request) -> str:
        return (await request.config_dict[WALLET_OPS].caller(request)).account

    async def listing(request: web.Request) -> web.Response:
        account = await own(request)
        page = await request.config_dict[INVOICES].page(
            account, _kind(request), _limit(request), _starting_after(request)
        )
        return _json(page)

    async def checkout(request: web.Request) -> web.Response:
        """Pay what is due on one's own invoice through Stripe Checkout; the signed
        checkout.session.completed webhook records the payment (nothing is recorded here)."""
        account = await own(request)
        stripe = request.config_dict[PAYMENT_CONTEXT].stripe_on()
        doc = await request.config_dict[INVOICES].view(request.match_info["id"], account)
        if doc["kind"] != "invoice" or doc["amount_due_minor"] <= 0:
            raise Conflict(f"Nothing is due on {doc['number']}.", param="id")
        ps = request.config_dict[PAYMENT_CONTEXT].settings
        due = doc["amount_due_minor"]
        session = await stripe.document_session(doc, due, ps.checkout_success_url, ps.checkout_cancel_url)
        body = {"document": doc["id"], "url": session.url, "session_id": session.session_id,
                "amount_minor": due, "currency": doc["currency"]}  # fmt: skip
        return _json(body, status=201)

    app.router.add_get("/v1/invoices", listing)
    app.router.add_post(f"/v1/invoices/{DOC_ID}/checkout", checkout)
    _files(app.router, "/v1/invoices", own)


def admin_routes(admin: web.Application, settings: Settings) -> None:
    async def anyone(request: web.Request) -> None:
        return None

    async def listing(request: web.Request) -> web.Response:
        account = request.query.get("account")
        if account is not None and (len(account) > 200 or not storable(account)):
            raise BadRequest("account must be an account id.", param="account")
        page = await request.config_dict[INVOICES].page(
            account, _kind(request), _limit(request), _starting_after(request)
        )
        return _json(page)

    async def pay(request: web.Request) -> web.Response:
        body = _decode(await request.read(), PaymentBody)
        if not body.payment_id or len(body.payment_id) > 200 or not storable(body.payment_id):
            raise BadRequest("payment_id must be 1-200 characters.", param="payment_id")
        if not body.method or len(body.method) > 32 or not storable(body.method):
            raise BadRequest("method must be 1-32 characters.", param="method")
        invoices = request.config_dict[INVOICES]
        doc_id = request.match_info["id"]
        due = (await invoices.view(doc_id))["amount_due_minor"]
        amount = due if body.amount_minor is None else body.amount_minor
        if amount <= 0 and body.amount_minor is not None:
            raise BadRequest("amount_minor must be a positive whole number.", param="amount_minor")
        at = invoices.issuer.clock()
        paid = await invoices.pay(doc_id, Payment(body.payment_id, max(amount, 1), body.method, at))
        await request.config_dict[INVOICING].enforce_overdue(
            at, paid["account"]
        )  # a paid one lifts its block
        return _json(paid)

    async def run(request: web.Request) -> web.Response:
        """One pass of the invoicing worker now (the operator's, or a test's)."""
        issued = await request.config_dict[INVOICING].run_pass()
        return _json({"issued": issued})

    admin.router.add_get("/invoices", listing)
    admin.router.add_post(f"/invoices/{DOC_ID}/payments", pay)
    admin.router.add_post("/invoicing/run", run)
    _files(admin.router, "/invoices", anyone)


FEATURE = Feature("invoices", routes=routes, admin_routes=admin_routes, start=start)
