"""Issued documents over real HTTP, Redis and Postgres: a receipt for every top-up (manual settlement and
Stripe's webhook), a credit note for a refund referring to its receipt, gap-free numbers per issuer under
50 concurrent issues, immutable rows, the profile and tax rule as they were at issue, the client's own
documents only, and an invoice's payments recorded once (its credits granted back once)."""

from __future__ import annotations

import asyncio
import csv
import datetime as dt
import io
import itertools
import re
from typing import Any

import asyncpg
import msgspec
import pypdf
import pytest

from sidecar.documents.invoices_api import INVOICES
from sidecar.documents.issuing import Draft, Line
from sidecar.documents.tax import included_tax

from .conftest import ADMIN_TOKEN, Sidecar, SidecarFactory
from .support_stripe import FakeStripe, event, post_event, sign, stripe_settings
from .support_stripe import fake_stripe as fake_stripe  # the fixture

pytestmark = pytest.mark.topologies
C = 1_000_000
RULES = [
    {"name": "no-tax", "country": "*", "rate": 0},
    {"name": "fr-vat", "country": "FR", "rate": "20.00"},
    {"name": "eu-reverse", "country": "DE", "customer": "b2b", "rate": 0, "reverse_charge": True},
]
SELLER = {"name": "Example AI SAS", "address_lines": ["1 rue Haute"], "city": "Paris", "postal_code": "75001",
          "tax_id": "FR40303265045", "email": "billing@example.ai"}  # fmt: skip
PROFILE: dict[str, Any] = {
    "legal_name": "Acme SAS", "address_lines": ["12 rue de la Paix"], "city": "Paris",
    "postal_code": "75002", "country": "FR", "billing_email": "ap@acme.example",
}  # fmt: skip


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


ACME_SECRET = "acme-signing-secret-for-tests"


@pytest.fixture
async def shop(make_sidecar: SidecarFactory, fake_stripe: FakeStripe) -> Sidecar:
    acme = {"acme": {"secrets": [ACME_SECRET], "header": "x-acme-signature"}}
    return await make_sidecar(
        **stripe_settings(fake_stripe, payment_webhooks=acme),
        tax_rules=RULES,
        tax_seller_country="FR",
        seller=SELLER,
    )


async def documents(sc: Sidecar, key: str, query: str = "") -> list[dict[str, Any]]:
    resp = await sc.client.get(f"/v1/invoices{query}", headers=auth(key))
    body = await resp.json()
    assert resp.status == 200, body
    return list(body["data"])


async def manual_top_up(sc: Sidecar, account: str, reference: str) -> dict[str, Any]:
    body = {"credits": "120", "amount_minor": 12_000, "reference": reference}
    order = await sc.admin("POST", f"/accounts/{account}/orders", body)
    return dict(await sc.admin("POST", f"/orders/{order['id']}/paid", {"payment_ref": f"wire-{reference}"}))


async def test_a_manual_top_up_gets_one_receipt_with_the_profile_and_tax_of_its_time(shop: Sidecar) -> None:
    account, key = await shop.account(0)
    await shop.admin("PUT", f"/accounts/{account}/billing-profile", PROFILE)
    paid = await manual_top_up(shop, account, "INV-1")
    order_id = paid["order"]["id"]
    await shop.admin("POST", f"/orders/{order_id}/paid", {"payment_ref": "wire-INV-1"})  # a retry
    (receipt,) = await documents(shop, key)
    assert (receipt["kind"], receipt["status"], receipt["source"]) == ("receipt", "paid", f"order:{order_id}")
    year = dt.datetime.fromisoformat(receipt["issued_at"]).year
    assert re.fullmatch(rf"CG-{year}-\d{{6}}", receipt["number"]), receipt["number"]
    tax = included_tax(12_000, 2000)
    assert tax == 2000  # 12000 × 2000 / 12000: 20% inside a gross of 120.00
    assert receipt["totals"] == {"net_minor": 10_000, "tax_minor": 2000, "gross_minor": 12_000}
    assert (receipt["tax"]["tax_rule"], receipt["tax"]["tax_rate"]) == ("fr-vat", "20.00")
    assert receipt["customer"]["legal_name"] == "Acme SAS"
    assert (receipt["seller"]["name"], receipt["seller"]["country"]) == ("Example AI SAS", "FR")
    assert [p["amount_minor"] for p in receipt["payments"]] == [12_000]
    assert receipt["lines"][0]["credits"] == 120 * C
    # a later edit of the profile, or of the tax table, changes no issued document
    await shop.admin("PUT", f"/accounts/{account}/billing-profile", {**PROFILE, "legal_name": "Acme Group"})
    resp = await shop.client.get(f"/v1/invoices/{receipt['id']}", headers=auth(key))
    assert (resp.status, await resp.json()) == (200, receipt)
    resp = await shop.client.get(f"/v1/invoices/{receipt['id']}.pdf", headers=auth(key))
    assert (resp.status, resp.content_type) == (200, "application/pdf")
    text = "".join(page.extract_text() for page in pypdf.PdfReader(io.BytesIO(await resp.read())).pages)
    for shown in (receipt["number"], "Receipt", "Acme SAS", "120.00", "20.00", "fr-vat"):
        assert shown in text, shown
    resp = await shop.client.get(f"/v1/invoices/{receipt['id']}.csv", headers=auth(key))
    assert (resp.status, resp.content_type) == (200, "text/csv")
    rows = list(csv.reader(io.StringIO(await resp.text())))
    assert ["document", receipt["number"]] in rows
    assert (rows[-1][0], "120.00" in rows[-1]) == ("total", True)
    second = await manual_top_up(shop, account, "INV-2")
    newest, first = await documents(shop, key)
    assert (newest["source"], newest["customer"]["legal_name"]) == (
        f"order:{second['order']['id']}",
        "Acme Group",
    )
    assert first == receipt
    assert int(newest["number"][-6:]) > int(first["number"][-6:])


async def test_a_stripe_top_up_and_its_refund_give_a_receipt_and_one_credit_note(
    shop: Sidecar, fake_stripe: FakeStripe
) -> None:
    account, key = await shop.account(0)
    await shop.admin("PUT", f"/accounts/{account}/billing-profile", {**PROFILE, "country": "DE",
                     "city": "Berlin", "postal_code": "10115", "tax_id": "DE123456789"})  # fmt: skip
    resp = await shop.client.post("/v1/credits/checkout", json={"package": "starter"}, headers=auth(key))
    started = await resp.json()
    session = fake_stripe.pay(started["session_id"])
    for _ in range(2):  # Stripe delivers at least once
        status, done = await post_event(shop.client, event("checkout.session.completed", session))
        assert status == 200, done
    (receipt,) = await documents(shop, key)
    assert (receipt["tax"]["reverse_charge"], receipt["totals"]["tax_minor"]) == (True, 0)
    assert any("Reverse charge" in n for n in receipt["notes"])
    headers = {"Authorization": f"Bearer {ADMIN_TOKEN}", "Idempotency-Key": "r1"}
    for _ in range(2):
        resp = await shop.client.post(f"/admin/orders/{started['order_id']}/refund", json={"credits": "300"},
                                      headers=headers)  # fmt: skip
        refunded = await resp.json()
        assert resp.status == 200, refunded
    # the charge.refunded webhook that follows is the same refund: no second credit note
    _, done = await post_event(
        shop.client, event("charge.refunded", fake_stripe.charge(session["payment_intent"]))
    )
    note, again = await documents(shop, key)
    assert again == receipt
    assert (note["kind"], note["references"]) == (
        "credit_note",
        {"document": receipt["id"], "number": receipt["number"]},
    )
    assert note["totals"]["gross_minor"] == refunded["amount_minor"] > 0
    assert note["lines"][0]["credits"] == 300 * C
    assert note["tax"] == receipt["tax"]  # the receipt's rule, whatever the table says now
    assert [d["kind"] for d in await documents(shop, key, "?kind=credit_note")] == ["credit_note"]


async def test_fifty_concurrent_issues_number_gap_free_in_order(shop: Sidecar) -> None:
    invoices = shop.client.app[INVOICES]
    account, _ = await shop.account(0)

    def draft(i: int, who: str = account) -> Draft:
        return Draft("invoice", who, f"test:{i}", "usd", (Line(f"line {i}", 1, "unit", C, 100 + i),), C,
                     due_days=30)  # fmt: skip

    async def failing(i: int) -> None:  # takes a number, then fails: the number goes back
        with pytest.raises(asyncpg.ForeignKeyViolationError):
            await invoices.issue(draft(1000 + i, who="no-such-account"))

    issued = await asyncio.gather(
        *(invoices.issue(draft(i)) for i in range(50)),
        *(invoices.issue(draft(i)) for i in range(0, 50, 5)),  # the same sources again: the same documents
        *(failing(i) for i in range(5)),
    )
    docs = [d for d in issued if d is not None]
    by_source = {d["source"]: d["id"] for d in docs}
    assert len(by_source) == 50
    assert all(by_source[d["source"]] == d["id"] for d in docs)
    rows = await invoices.pool.fetch("SELECT seq, number, issued_at FROM documents ORDER BY seq")
    assert [r["seq"] for r in rows] == list(range(1, 51))  # no gap, no repeat
    assert all(r["number"].endswith(f"-{r['seq']:06d}") for r in rows)
    assert all(a["issued_at"] <= b["issued_at"] for a, b in itertools.pairwise(rows))
    assert await invoices.pool.fetchval("SELECT last_seq FROM document_series WHERE issuer = 'CG'") == 50


async def test_issued_documents_are_immutable(shop: Sidecar) -> None:
    account, _ = await shop.account(0)
    await manual_top_up(shop, account, "X")
    pool = shop.client.app[INVOICES].pool
    doc_id = await pool.fetchval("SELECT id FROM documents")
    for sql in (
        "UPDATE documents SET gross_minor = 1 WHERE id = $1",
        "UPDATE documents SET body = '{}'::jsonb WHERE id = $1",
        "DELETE FROM documents WHERE id = $1",
        "UPDATE document_payments SET amount_minor = 1 WHERE document_id = $1",
        "DELETE FROM document_payments WHERE document_id = $1",
    ):
        with pytest.raises(asyncpg.RestrictViolationError, match="immutable"):
            await pool.execute(sql, doc_id)
    assert await pool.fetchval("SELECT gross_minor FROM documents WHERE id = $1", doc_id) == 12_000


async def test_a_client_reads_only_its_own_documents(shop: Sidecar) -> None:
    mine, key = await shop.account(0)
    other, other_key = await shop.account(0)
    await manual_top_up(shop, mine, "A")
    for i in range(3):
        await manual_top_up(shop, other, f"B{i}")
    (doc,) = await documents(shop, key)
    for suffix in ("", ".pdf", ".csv"):
        resp = await shop.client.get(f"/v1/invoices/{doc['id']}{suffix}", headers=auth(other_key))
        body = await resp.json()
        assert (resp.status, body["error"]["code"], body["error"]["param"]) == (404, "not_found", "id")
    resp = await shop.client.get(f"/v1/invoices/{doc['id']}")
    assert resp.status == 401
    # the operator reads any account's, page by page
    page = await shop.admin("GET", f"/invoices?account={other}&limit=2")
    assert (len(page["data"]), page["has_more"]) == (2, True)
    rest = await shop.admin(
        "GET", f"/invoices?account={other}&limit=2&starting_after={page['data'][-1]['id']}"
    )
    assert (len(rest["data"]), rest["has_more"]) == (1, False)
    assert doc["id"] not in {d["id"] for d in page["data"] + rest["data"]}
    assert (await shop.admin("GET", f"/invoices/{doc['id']}"))["id"] == doc["id"]
    for query, param in (("?limit=0", "limit"), ("?limit=x", "limit"), ("?kind=bill", "kind"),
                         ("?starting_after=doc_00", "starting_after")):  # fmt: skip
        resp = await shop.client.get(f"/v1/invoices{query}", headers=auth(key))
        body = await resp.json()
        assert (resp.status, body["error"]["param"]) == (400, param), body


async def test_an_invoice_is_paid_once_and_grants_its_credits_back_once(shop: Sidecar) -> None:
    invoices = shop.client.app[INVOICES]
    account, key = await shop.account(0)
    doc = await invoices.issue(
        Draft(
            "invoice",
            account,
            "period:test",
            "usd",
            (Line("chat", 10, "requests", 50 * C, 5000),),
            50 * C,
            due_days=30,
        )
    )
    assert (doc["status"], doc["amount_due_minor"], doc["due_at"] is not None) == ("open", 5000, True)
    path = f"/invoices/{doc['id']}/payments"
    half = await shop.admin("POST", path, {"payment_id": "wire-1", "amount_minor": 2000})
    assert (half["status"], half["amount_due_minor"]) == ("open", 3000)
    assert (await shop.balance(account))["balance"] == 0  # nothing back until it is paid in full
    resp = await shop.client.post(f"/admin{path}", json={"payment_id": "wire-2", "amount_minor": 3001},
                                  headers=shop.admin_headers())  # fmt: skip
    assert (resp.status, (await resp.json())["error"]["param"]) == (400, "amount_minor")
    for _ in range(3):  # the rest, retried: recorded once, granted once
        paid = await shop.admin("POST", path, {"payment_id": "wire-2"})
        assert (paid["status"], paid["amount_paid_minor"], len(paid["payments"])) == ("paid", 5000, 2)
    assert (await shop.balance(account))["balance"] == 50 * C
    resp = await shop.client.post(f"/admin{path}", json={"payment_id": "wire-3", "amount_minor": 1},
                                  headers=shop.admin_headers())  # fmt: skip
    assert resp.status == 409
    assert await invoices.finish_paid() == 0  # nothing left half-way
    receipt = await manual_top_up(shop, account, "R")
    (doc_r,) = [
        d for d in await documents(shop, key, "?kind=receipt") if d["source"].endswith(receipt["order"]["id"])
    ]
    resp = await shop.client.post(f"/admin/invoices/{doc_r['id']}/payments", json={"payment_id": "p"},
                                  headers=shop.admin_headers())  # fmt: skip
    assert resp.status == 409
    assert (await shop.balance(account))["balance"] == 170 * C


async def test_a_signed_payment_webhook_pays_an_invoice_once(shop: Sidecar) -> None:
    invoices = shop.client.app[INVOICES]
    account, _ = await shop.account(0)
    doc = await invoices.issue(
        Draft(
            "invoice",
            account,
            "period:hook",
            "usd",
            (Line("chat", 1, "requests", 8 * C, 800),),
            8 * C,
            due_days=30,
        )
    )

    async def send(body: dict[str, Any], secret: str = ACME_SECRET) -> tuple[int, Any]:
        raw = msgspec.json.encode(body)
        return await post_event(
            shop.client, raw, signature=sign(raw, secret), path="/webhooks/acme", header="x-acme-signature"
        )

    paid = {"type": "invoice.paid", "invoice": doc["id"], "currency": "usd", "payment_ref": "acme-7"}
    assert (await send({"id": "e0", **paid, "amount_minor": 800}, "wrong"))[0] == 400
    assert (await send({"id": "e1", **paid, "amount_minor": 801}))[1]["outcome"] == "amount_mismatch"
    assert (await send({"id": "e2", **paid, "amount_minor": 800, "currency": "eur"}))[1]["outcome"] == (
        "amount_mismatch"
    )
    assert (await send({"id": "e3", **paid, "invoice": "doc_00", "amount_minor": 800}))[1]["outcome"] == (
        "unknown_invoice"
    )
    assert (await shop.admin("GET", f"/invoices/{doc['id']}"))["payments"] == []  # none of those recorded
    outcomes = [
        (await send({"id": f"e{4 + i}", **paid, "amount_minor": 800}))[1]["outcome"] for i in range(3)
    ]
    assert outcomes == ["paid", "already_paid", "already_paid"]  # redelivered under new event ids too
    seen = await shop.admin("GET", f"/invoices/{doc['id']}")
    assert (seen["status"], [p["id"] for p in seen["payments"]]) == ("paid", ["acme:acme-7"])
    assert (await shop.balance(account))["balance"] == 8 * C


async def test_a_client_pays_its_invoice_through_stripe_checkout_once(
    shop: Sidecar, fake_stripe: FakeStripe
) -> None:
    invoices = shop.client.app[INVOICES]
    account, key = await shop.account(0)
    _, other_key = await shop.account(0)
    line = Line("chat", 3, "requests", 25 * C, 2500)
    doc = await invoices.issue(
        Draft("invoice", account, "period:stripe", "usd", (line,), 25 * C, due_days=30)
    )
    path = f"/v1/invoices/{doc['id']}/checkout"
    resp = await shop.client.post(path, headers=auth(other_key))
    assert resp.status == 404  # another account's invoice
    resp = await shop.client.post(path, headers=auth(key))
    started = await resp.json()
    assert resp.status == 201, started
    assert (started["amount_minor"], started["currency"]) == (2500, "usd")
    (call,) = [c for c in fake_stripe.calls if c.path == "/v1/checkout/sessions"]
    assert call.form["metadata"]["document"] == doc["id"]
    assert (await shop.admin("GET", f"/invoices/{doc['id']}"))["status"] == "open"  # not before the webhook
    session = fake_stripe.pay(started["session_id"])
    outcomes = []
    for _ in range(2):
        status, done = await post_event(shop.client, event("checkout.session.completed", session))
        assert status == 200, done
        outcomes.append(done["outcome"])
    assert outcomes == ["paid", "already_paid"]
    seen = await shop.admin("GET", f"/invoices/{doc['id']}")
    assert (seen["status"], [p["method"] for p in seen["payments"]]) == ("paid", ["stripe"])
    assert (await shop.balance(account))["balance"] == 25 * C
    resp = await shop.client.post(path, headers=auth(key))
    assert (resp.status, (await resp.json())["error"]["param"]) == (409, "id")  # nothing is due
