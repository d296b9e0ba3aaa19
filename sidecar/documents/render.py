"""Rendering an issued document (the JSON of GET /v1/invoices/{id}): `pdf(document) -> bytes` and
`csv_text(document) -> str`, pure functions of the document (render_pdf.py, render_csv.py)."""

from __future__ import annotations

from .render_csv import csv_text
from .render_pdf import pdf

__all__ = ["csv_text", "pdf"]
