"""Rendering issued documents (sidecar/documents/render.py): the PDF read back as text (pypdf) and as pixels
(pypdfium2), the CSV read back with the csv module, the same document giving the same bytes, a long
invoice over several pages. Pure functions: no Redis, no Postgres."""

from __future__ import annotations

import copy
import csv
import importlib.resources
import io
from typing import Any

import pypdfium2
import pytest
from PIL import Image
from pypdf import PdfReader

from sidecar.documents import document_text
from sidecar.documents.render import csv_text, pdf

SELLER = {
    "name": "Example AI Ltd", "address_lines": ["1 Main St"], "city": "London", "postal_code": "N1 1AA",
    "region": None, "country": "GB", "tax_id": "GB123456789", "email": "billing@example.com",
}  # fmt: skip
ACME = {
    "account": "acme", "legal_name": "Acme GmbH", "address_lines": ["Hauptstr. 1", "Hinterhaus"],
    "city": "Berlin", "postal_code": "10115", "region": None, "country": "DE", "tax_id": "DE123456789",
    "billing_email": "ap@acme.example", "version": 3, "updated_at": "2026-10-02T09:30:00Z",
}  # fmt: skip
REVERSE = {
    "tax_rule": "eu-b2b-reverse", "tax_rate_bp": 0, "tax_rate": "0%", "reverse_charge": True,
    "tax_country": "DE", "tax_region": None, "tax_customer": "b2b",
}  # fmt: skip
UK_VAT = {
    "tax_rule": "gb-vat", "tax_rate_bp": 2000, "tax_rate": "20%", "reverse_charge": False,
    "tax_country": "GB", "tax_region": None, "tax_customer": "b2c",
}  # fmt: skip


def line(description: str, quantity: int, credits: int, net: int, tax: int = 0) -> dict[str, Any]:
    return {
        "description": description, "quantity": quantity, "unit": "requests", "credits": credits,
        "net_minor": net, "tax_minor": tax, "gross_minor": net + tax,
    }  # fmt: skip


def document(kind: str, lines: list[dict[str, Any]], **changes: Any) -> dict[str, Any]:
    totals = {k: sum(x[k] for x in lines) for k in ("net_minor", "tax_minor", "gross_minor")}
    doc: dict[str, Any] = {
        "object": "invoice", "id": "doc_1", "kind": kind, "number": "CG-2026-000123", "issuer": "CG",
        "account": "acme", "currency": "usd", "issued_at": "2026-12-01T00:00:00Z", "due_at": None,
        "period": None, "references": None, "source": "order:ord_1", "seller": SELLER, "customer": ACME,
        "tax": REVERSE, "lines": lines, "totals": totals, "status": "paid", "payments": [], "notes": [],
    }  # fmt: skip
    return doc | changes


def b2b_invoice() -> dict[str, Any]:
    lines = [
        line("gpt-4o-mini (chat)", 1234, 5_000_000, 500),
        line("gpt-4o (chat)", 321, 12_500_000, 1250),
        line("text-embedding-3-small", 99_000, 250_000, 25),
    ]
    return document(
        "invoice", lines, due_at="2026-12-31T00:00:00Z", status="open", source="period:acme:2026-11",
        period={"start": "2026-11-01T00:00:00Z", "end": "2026-12-01T00:00:00Z"},
        payments=[{"id": "pay_1", "amount_minor": 775, "method": "manual", "at": "2026-12-05T10:00:00Z"}],
    )  # fmt: skip


def receipt() -> dict[str, Any]:
    return document(
        "receipt", [line("1,000 credits", 1, 1_000_000_000, 1000, 200)], tax=UK_VAT, notes=["Thank you."],
        payments=[{"id": "pay_9", "amount_minor": 1200, "method": "stripe", "at": "2026-12-01T00:00:00Z"}],
        number="CG-2026-000124",
    )  # fmt: skip


def credit_note() -> dict[str, Any]:
    return document(
        "credit_note", [line("Refund: gpt-4o (chat)", 321, 12_500_000, 1250)], number="CG-2026-000130",
        references={"document": "doc_0", "number": "CG-2026-000100"}, source="reversal:rev_1",
    )  # fmt: skip


def unicode_invoice() -> dict[str, Any]:
    customer = ACME | {
        "legal_name": "Łódź Sp. z o.o.", "address_lines": ["ul. Piotrkowska 104"], "city": "Łódź",
        "postal_code": "90-926", "country": "PL", "tax_id": "PL1234567890",
        "billing_email": "faktury@lodz.example",
    }  # fmt: skip
    lines = [line("Müller-Übersetzung (Ελληνικά, русский)", 7, 3_000_000, 300)]
    return document("invoice", lines, customer=customer, status="paid", number="CG-2026-000125")


def pages_text(data: bytes) -> list[str]:
    """Each page's text, its whitespace folded to single spaces (a wrapped line reads as one)."""
    return [" ".join(page.extract_text().split()) for page in PdfReader(io.BytesIO(data)).pages]


def text_of(data: bytes) -> str:
    return " ".join(pages_text(data))


def test_invoice_reverse_charge_b2b_shows_its_numbers_tax_and_profile_snapshot() -> None:
    doc = b2b_invoice()
    text = text_of(pdf(doc))
    for expected in (
        "Invoice", "CG-2026-000123", "2026-12-01", "Due date", "2026-12-31", "2026-11-01 – 2026-11-30",
        # the seller block and the customer's snapshot, every field
        "Example AI Ltd", "N1 1AA London", "Tax ID GB123456789", "billing@example.com",
        "Acme GmbH", "Hauptstr. 1", "Hinterhaus", "10115 Berlin", "DE", "Tax ID DE123456789",
        "ap@acme.example",
        # lines: description, quantity and unit, credits, amounts (the table's currency in its headings)
        "gpt-4o-mini (chat)", "1,234 requests", "Net USD", "12.5", "12.50", "0.25", "99,000 requests",
        # tax summary, totals, payments, the reverse-charge note
        "Tax: rule eu-b2b-reverse at 0%, reverse charge (DE, b2b)", "Net", "17.75 USD", "Total",
        "Paid", "7.75 USD", "Amount due", "10.00 USD", "Manual", "pay_1", "Status", "Open",
        document_text.REVERSE_CHARGE_NOTE, "Page 1 of 1",
    ):  # fmt: skip
        assert expected in text, (expected, text)
    assert text.count(document_text.REVERSE_CHARGE_NOTE) == 1


def test_receipt_and_credit_note_have_their_titles_and_the_credited_invoice() -> None:
    text = text_of(pdf(receipt()))
    for expected in ("Receipt", "CG-2026-000124", "Tax: rule gb-vat at 20% (GB, b2c)", "Tax 20%", "2.00 USD",
                     "12.00 USD", "Stripe", "Thank you.", "Paid"):  # fmt: skip
        assert expected in text, (expected, text)
    assert "Amount due" not in text
    assert "Reverse charge" not in text
    text = text_of(pdf(credit_note()))
    for expected in ("Credit note", "CG-2026-000130", "Credits invoice CG-2026-000100", "Total credited",
                     "12.50 USD", "Refund: gpt-4o (chat)"):  # fmt: skip
        assert expected in text, (expected, text)


def test_unicode_names_render_in_the_shipped_font() -> None:
    data = pdf(unicode_invoice())
    text = text_of(data)
    for expected in ("Łódź Sp. z o.o.", "ul. Piotrkowska 104", "90-926 Łódź", "PL1234567890",
                     "Müller-Übersetzung (Ελληνικά, русский)"):  # fmt: skip
        assert expected in text, (expected, text)
    assert b"DejaVuSans" in data
    assert b"/Helvetica" not in data  # no core (latin-1) font
    fonts = importlib.resources.files("sidecar.documents.fonts")
    assert fonts.joinpath("DejaVuSans.ttf").is_file()
    assert fonts.joinpath("LICENSE").is_file()


def test_a_document_without_profile_names_the_account_and_a_void_one_says_so() -> None:
    doc = b2b_invoice() | {"customer": None, "status": "void"}
    text = text_of(pdf(doc))
    assert "Account acme" in text
    assert "VOID" in text
    assert "Status Void" in text
    assert "Amount due" not in text  # nothing is due on a void invoice
    assert "amount_due" not in csv_text(doc)


def test_an_invoice_without_lines_and_a_line_of_zero_quantity_render() -> None:
    empty = document("invoice", [], status="open")
    assert "Total 0.00 USD" in text_of(pdf(empty))
    zero = document("invoice", [line("setup", 0, 0, 0)])
    assert "0 requests" in text_of(pdf(zero))
    assert ["setup", "0", "requests", "0", "0.00", "0.00", "0.00"] in rows_of(csv_text(zero))


def test_page_one_rasterises_to_a_real_picture() -> None:
    pages = pypdfium2.PdfDocument(pdf(b2b_invoice()))
    try:
        page = pages[0]
        image: Image.Image = page.render(scale=1200 / page.get_width()).to_pil()
    finally:
        pages.close()
    out = io.BytesIO()
    image.save(out, format="PNG")
    data = out.getvalue()
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    assert 10_000 < len(data) < 2_000_000
    assert image.width == 1200
    assert 1.40 < image.height / image.width < 1.42
    gray = image.convert("L")
    histogram = gray.histogram()
    dark, total = sum(histogram[:100]), image.width * image.height
    assert 0.002 * total < dark < 0.2 * total, dark  # text on a white page: neither blank nor black
    top = gray.crop((0, 0, image.width, image.height // 4)).histogram()
    assert sum(top[:100]) > 0.002 * total / 4  # the header is drawn, not only the table


def rows_of(text: str) -> list[list[str]]:
    return list(csv.reader(io.StringIO(text)))


def minor(decimal: str, digits: int = 2) -> int:
    whole, _, frac = decimal.partition(".")
    assert len(frac) == digits
    return int(whole + frac)


@pytest.mark.parametrize("make", [b2b_invoice, receipt, credit_note, unicode_invoice])
def test_csv_reads_back_with_its_lines_and_totals(make: Any) -> None:
    doc = make()
    text = csv_text(doc)
    assert text.endswith("\r\n")
    rows = rows_of(text)
    blank = rows.index([])
    header = dict(rows[:blank])
    assert header["document"] == doc["number"]
    assert header["kind"] == doc["kind"]
    assert header["customer_legal_name"] == doc["customer"]["legal_name"]
    assert header["customer_tax_id"] == doc["customer"]["tax_id"]
    assert header["tax_rule"] == doc["tax"]["tax_rule"]
    assert header["tax_rate"] == doc["tax"]["tax_rate"]
    assert header["issued_at"] == doc["issued_at"]
    assert header["currency"] == "USD"
    assert header["credits_invoice"] == ((doc["references"] or {}).get("number") or "")
    assert rows[blank + 1] == ["description", "quantity", "unit", "credits", "net", "tax", "gross"]
    body = rows[blank + 2 : blank + 2 + len(doc["lines"])]
    for row, want in zip(body, doc["lines"], strict=True):
        assert row[0] == want["description"]
        assert int(row[1]) == want["quantity"]
        assert [minor(v) for v in row[4:7]] == [want["net_minor"], want["tax_minor"], want["gross_minor"]]
    total = rows[blank + 2 + len(doc["lines"])]
    assert total[0] == "total"
    keys = ("net_minor", "tax_minor", "gross_minor")
    assert [minor(v) for v in total[4:7]] == [doc["totals"][k] for k in keys]
    assert [minor(v) for v in total[4:7]] == [sum(minor(r[i]) for r in body) for i in (4, 5, 6)]


def test_csv_amounts_credits_and_formula_like_text() -> None:
    doc = b2b_invoice()
    doc["lines"][0] = doc["lines"][0] | {"description": "=HYPERLINK(1)", "net_minor": 123_456_789}
    doc["customer"] = ACME | {"legal_name": "@evil"}
    rows = rows_of(csv_text(doc))
    assert ["customer_legal_name", "'@evil"] in rows
    body = next(r for r in rows if r and r[0] == "'=HYPERLINK(1)")
    assert body[3] == "5"
    assert body[4] == "1234567.89"
    assert ["amount_due", "", "", "", "", "", "10.00"] in rows
    assert ["paid", "", "", "", "", "", "7.75"] in rows


def test_the_same_document_gives_the_same_bytes_dated_at_its_issue() -> None:
    doc = b2b_invoice()
    first = pdf(doc)
    assert pdf(copy.deepcopy(doc)) == first
    assert csv_text(copy.deepcopy(doc)) == csv_text(doc)
    reader = PdfReader(io.BytesIO(first))
    assert reader.metadata is not None
    assert reader.metadata.creation_date is not None
    assert reader.metadata.creation_date.isoformat().startswith("2026-12-01T00:00:00")
    assert reader.metadata.title == "Invoice CG-2026-000123"
    assert pdf(doc | {"issued_at": "2026-12-02T00:00:00Z"}) != first


def test_a_long_invoice_paginates_with_its_totals_on_the_last_page() -> None:
    lines = [line(f"model-{i:02d} (chat)", 10 + i, 1_000_000 * (i + 1), 100 * (i + 1)) for i in range(60)]
    doc = document("invoice", lines, payments=[], status="open")
    texts = pages_text(pdf(doc))
    assert len(texts) >= 2
    total = document_text.amount(doc["totals"]["gross_minor"], "usd")
    assert total == "1,830.00 USD"
    assert total in texts[-1]
    assert "Amount due" in texts[-1]
    assert all(total not in t and "Amount due" not in t for t in texts[:-1])
    assert all(f"Page {n} of {len(texts)}" in t for n, t in enumerate(texts, 1))
    assert all("Description" in t for t in texts if "model-" in t)  # the table's headings repeat
    found = [f"model-{i:02d} (chat)" for i in range(60) if any(f"model-{i:02d} (chat)" in t for t in texts)]
    assert len(found) == 60


@pytest.mark.parametrize(
    ("minor_units", "currency", "text"),
    [
        (1234, "usd", "12.34 USD"),
        (5, "eur", "0.05 EUR"),
        (-1250, "usd", "-12.50 USD"),
        (123_456_789, "usd", "1,234,567.89 USD"),
        (1500, "jpy", "1,500 JPY"),
        (1500, "KRW", "1,500 KRW"),
        (1234, "kwd", "1.234 KWD"),
        (2_500_000, "usdc", "2.500000 USDC"),
        (2**62 + 1, "usd", "46,116,860,184,273,879.05 USD"),  # exact beyond a double's 53 bits
    ],
)
def test_amounts_are_exact_decimals_of_the_currency(minor_units: int, currency: str, text: str) -> None:
    assert document_text.amount(minor_units, currency) == text


@pytest.mark.parametrize("bad", [12.34, "1234", True, None])
def test_an_amount_that_is_not_an_integer_is_refused(bad: Any) -> None:
    with pytest.raises(TypeError):
        document_text.amount(bad, "usd")
    doc = b2b_invoice()
    doc["totals"] = doc["totals"] | {"gross_minor": bad}
    with pytest.raises(TypeError):
        pdf(doc)


def test_a_period_off_midnight_shows_its_instants() -> None:
    period = {"start": "2026-11-15T09:30:00Z", "end": "2026-12-15T09:30:00Z"}
    assert document_text.period_text(period) == "2026-11-15 09:30 – 2026-12-15 09:30 UTC"
    assert document_text.period_text(None) == ""


def test_the_totals_block_is_never_split_across_pages() -> None:
    """Around the line count where the table ends at the foot of page 1, the totals (net to amount due)
    move to the next page whole."""
    for n in range(14, 22):
        lines = [line(f"model-{i:02d} (chat)", 10 + i, 1_000_000, 100 * (i + 1)) for i in range(n)]
        doc = document("invoice", lines, status="open")
        texts = pages_text(pdf(doc))
        net = document_text.amount(doc["totals"]["net_minor"], "usd")
        last = texts[-1]
        assert f"Net {net}" in last, (n, texts)
        assert "Amount due" in last, (n, texts)
        assert "Amount due" not in " ".join(texts[:-1])
