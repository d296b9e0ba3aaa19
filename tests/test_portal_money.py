"""Buying credits and reading documents in the portal, against a fake Stripe through the real `stripe`
library: a package's checkout sends the browser to the hosted page, nothing lands until the signed
webhook, then the order shows paid, the credits are there, and its receipt downloads as PDF and CSV;
the billing profile saved through the form."""

from __future__ import annotations

import csv
import io
import re

import pytest

from sidecar.payments.landing import PAYMENTS

from .conftest import Sidecar, SidecarFactory
from .support_portal import post_form, sign_in, text_of
from .support_stripe import FakeStripe, event, post_event, stripe_settings
from .support_stripe import fake_stripe as fake_stripe  # the fixture

C = 1_000_000


@pytest.fixture
async def shop(make_sidecar: SidecarFactory, fake_stripe: FakeStripe) -> Sidecar:
    return await make_sidecar(**stripe_settings(fake_stripe))


async def test_a_package_bought_in_the_portal_lands_by_its_webhook(
    shop: Sidecar, fake_stripe: FakeStripe
) -> None:
    account, key = await shop.account(0)
    client = shop.client
    _, csrf = await sign_in(client, key)
    base = f"/portal/accounts/{account}"
    page = text_of(await (await client.get(f"{base}/buy")).text())
    assert "Starter 1,000 credits 10.00 USD" in page
    assert "Pro 5,000 credits 50.00 USD" in page
    status, _, location = await post_form(
        client, f"{base}/buy", {"csrf": csrf, "package": "pro", "save": "on"}
    )
    assert status == 303
    (session_id,) = fake_stripe.sessions
    assert location == fake_stripe.sessions[session_id]["url"]
    assert fake_stripe.sessions[session_id]["setup_future_usage"] == "off_session"
    back = await client.get("/portal/?checkout=success", allow_redirects=False)  # (/portal 301s here)
    assert back.headers["Location"] == f"{base}/buy?done=checkout-success"
    pending = text_of(await (await client.get(back.headers["Location"])).text())
    assert "Payment received by the provider" in pending
    assert "pending" in pending
    assert (await shop.balance(account))["balance"] == 0  # the way back credits nothing
    status, done = await post_event(client, event("checkout.session.completed", fake_stripe.pay(session_id)))
    assert (status, done["outcome"]) == (200, "landed")
    assert (await shop.balance(account))["balance"] == 5000 * C
    paid = await (await client.get(f"{base}/buy")).text()
    assert re.search(r'<td class="status-paid">paid</td>', paid)
    overview = await (await client.get(f"{base}/")).text()
    assert 'id="balance" data-micro="5000000000"' in overview
    documents = await (await client.get(f"{base}/documents")).text()
    (doc_id,) = re.findall(r'<tr data-doc="(doc_[0-9a-f]+)">', documents)
    assert "receipt" in text_of(documents)
    pdf = await client.get(f"{base}/documents/{doc_id}.pdf")
    assert (pdf.status, pdf.content_type) == (200, "application/pdf")
    assert (await pdf.read()).startswith(b"%PDF")
    sheet = await client.get(f"{base}/documents/{doc_id}.csv")
    rows = list(csv.reader(io.StringIO(await sheet.text())))
    assert ["total", "", "", "5000", "50.00", "0.00", "50.00"] in rows or any(
        r and r[0] == "total" for r in rows
    )
    receipts = text_of(await (await client.get(f"{base}/documents?kind=credit_note")).text())
    assert "No documents yet" in receipts


async def test_a_custom_amount_and_its_bad_values(shop: Sidecar, fake_stripe: FakeStripe) -> None:
    account, key = await shop.account(0)
    client = shop.client
    _, csrf = await sign_in(client, key)
    base = f"/portal/accounts/{account}"
    for amount, words in (
        ("4.99", "amount must be between"),
        ("12.345", "at most 2 decimals"),
        ("ten", "amount"),
    ):
        status, body, _ = await post_form(client, f"{base}/buy", {"csrf": csrf, "amount": amount})
        assert status == 400, amount
        assert words in text_of(body)
    assert fake_stripe.sessions == {}
    status, _, location = await post_form(client, f"{base}/buy", {"csrf": csrf, "amount": "12.34"})
    assert status == 303
    (order,) = await client.app[PAYMENTS].orders.orders_of(account)
    assert (order.amount_minor, order.credits, order.status) == (1234, 1234 * C, "pending")
    assert location == next(iter(fake_stripe.sessions.values()))["url"]
    status, body, _ = await post_form(client, f"{base}/buy", {"csrf": csrf, "package": "gold"})
    assert status == 400
    assert "No package 'gold'" in text_of(body)


async def test_the_billing_profile_is_saved_from_its_form(shop: Sidecar) -> None:
    account, key = await shop.account(0)
    client = shop.client
    _, csrf = await sign_in(client, key)
    base = f"/portal/accounts/{account}"
    form = {"csrf": csrf, "legal_name": "Müller GmbH", "address_lines": "Hauptstr. 1\r\nHinterhaus",
            "postal_code": "10115", "city": "Berlin", "region": "", "country": "de",
            "tax_id": "DE 123 456 789", "billing_email": "billing@mueller.example"}  # fmt: skip
    status, _, location = await post_form(client, f"{base}/billing-profile", form)
    assert (status, location) == (303, f"{base}/documents?done=profile-set")
    profile = await (
        await client.get("/v1/billing-profile", headers={"Authorization": f"Bearer {key}"})
    ).json()
    assert profile["address_lines"] == ["Hauptstr. 1", "Hinterhaus"]
    assert (profile["country"], profile["tax_id"], profile["region"]) == ("DE", "DE123456789", None)
    html = await (await client.get(f"{base}/documents?done=profile-set")).text()
    assert "The billing profile is saved." in text_of(html)
    assert "Version 1" in text_of(html)
    assert 'value="Müller GmbH"' in html
