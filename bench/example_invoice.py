"""Render a sample usage invoice to docs/example-invoice.pdf and docs/example-invoice.png (the README's
picture): `python bench/example_invoice.py [--out DIR] [--width PX]`.

The document is the shape GET /v1/invoices/{id} returns (docs DOCUMENT_SHAPE): a reverse-charge B2B usage
invoice of three lines, paid by card. The PNG is page 1 rasterised by pypdfium2 (the test extra)."""

from __future__ import annotations

import argparse
import io
from pathlib import Path
from typing import Any

import pypdfium2

from sidecar.documents.render import csv_text, pdf


def sample_invoice() -> dict[str, Any]:
    lines = [
        ("gpt-4o-mini (chat)", 182_340, "requests", 41_250_000, 4125),
        ("gpt-4o (chat)", 12_904, "requests", 96_780_000, 9678),
        ("text-embedding-3-small", 2_500_000, "tokens", 1_250_000, 125),
    ]
    rows: list[dict[str, Any]] = [
        {"description": d, "quantity": q, "unit": u, "credits": c, "net_minor": n, "tax_minor": 0,
         "gross_minor": n}
        for d, q, u, c, n in lines
    ]  # fmt: skip
    net = sum(n for *_, n in lines)
    return {
        "object": "invoice",
        "id": "doc_3f9c2a17b4e8",
        "kind": "invoice",
        "number": "CG-2026-000123",
        "issuer": "CG",
        "account": "acme",
        "currency": "usd",
        "issued_at": "2026-12-01T00:00:00Z",
        "due_at": "2026-12-31T00:00:00Z",
        "period": {"start": "2026-11-01T00:00:00Z", "end": "2026-12-01T00:00:00Z"},
        "references": None,
        "source": "period:acme:2026-11",
        "seller": {
            "name": "Example AI Ltd", "address_lines": ["1 Main St", "Floor 4"], "city": "London",
            "postal_code": "N1 1AA", "region": None, "country": "GB", "tax_id": "GB123456789",
            "email": "billing@example.com",
        },
        "customer": {
            "account": "acme", "legal_name": "Acme Müller GmbH", "address_lines": ["Hauptstraße 1"],
            "city": "Berlin", "postal_code": "10115", "region": None, "country": "DE",
            "tax_id": "DE123456789", "billing_email": "ap@acme.example", "version": 3,
            "updated_at": "2026-10-02T09:30:00Z",
        },
        "tax": {
            "tax_rule": "eu-b2b-reverse", "tax_rate_bp": 0, "tax_rate": "0%", "reverse_charge": True,
            "tax_country": "DE", "tax_region": None, "tax_customer": "b2b",
        },
        "lines": rows,
        "totals": {"net_minor": net, "tax_minor": 0, "gross_minor": net},
        "status": "paid",
        "payments": [
            {"id": "pay_8d1e44", "amount_minor": net, "method": "stripe", "at": "2026-12-03T14:05:00Z"}
        ],
        "notes": [
            "Reverse charge: VAT to be accounted for by the recipient.", "Thank you for your business."
        ],
    }  # fmt: skip


def png(document_pdf: bytes, width: int) -> bytes:
    """Page 1 as a PNG `width` pixels wide (a 64-colour palette keeps it small)."""
    pages = pypdfium2.PdfDocument(document_pdf)
    try:
        page = pages[0]
        image = page.render(scale=width / page.get_width()).to_pil()
    finally:
        pages.close()
    out = io.BytesIO()
    image.convert("RGB").quantize(colors=64).save(out, format="PNG", optimize=True)
    return out.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "docs")
    parser.add_argument("--width", type=int, default=1200)
    args = parser.parse_args()
    document = sample_invoice()
    data = pdf(document)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "example-invoice.pdf").write_bytes(data)
    image = png(data, args.width)
    (args.out / "example-invoice.png").write_bytes(image)
    print(f"{args.out}/example-invoice.pdf: {len(data)} bytes; example-invoice.png: {len(image)} bytes")
    print(csv_text(document))


if __name__ == "__main__":
    main()
