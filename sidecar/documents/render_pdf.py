"""An issued document as a PDF (A4, fpdf2): pure, the same document gives the same bytes.

The text is set in DejaVu Sans, shipped in the wheel (sidecar/documents/fonts, its license beside it), so
any Latin, Greek or Cyrillic name renders and no system font is looked up. The PDF's creation date is the
document's `issued_at` and its producer a constant: nothing of the clock or the machine gets in. Amounts
come from document_text (integer divmod, never a float)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fpdf import FPDF, FontFace

from . import document_text as text

FONTS = Path(__file__).parent / "fonts"
FONT = "DejaVuSans"
PRODUCER = "creditgate"
INK = (33, 37, 41)
MUTED = (108, 117, 125)
ACCENT = (31, 78, 121)
RULE = (206, 212, 218)
HEAD_FILL = (237, 241, 245)
VOID_RED = (176, 42, 55)
LEFT, RIGHT, TOP = 18.0, 18.0, 16.0
ROW = 5.2  # the height of a line of body text (mm)
# The line table's columns: description, quantity, credits, net, tax, gross (fractions of the width).
COLUMNS = (56, 34, 20, 21, 19, 22)
ALIGN = ("LEFT", "RIGHT", "RIGHT", "RIGHT", "RIGHT", "RIGHT")


class _Pages(FPDF):
    """A4 pages with the document's number and 'Page n of m' at the foot of each."""

    def __init__(self, caption: str) -> None:
        super().__init__(orientation="P", unit="mm", format="A4")
        self.caption = caption
        self.set_margins(LEFT, TOP, RIGHT)
        self.set_auto_page_break(True, margin=20)
        self.add_font(FONT, "", FONTS / "DejaVuSans.ttf")
        self.add_font(FONT, "B", FONTS / "DejaVuSans-Bold.ttf")
        self.set_text_color(*INK)

    def header(self) -> None:
        if self.page_no() > 1:
            self.set_font(FONT, "", 8)
            self.set_text_color(*MUTED)
            self.cell(0, 5, f"{self.caption} (continued)", new_x="LMARGIN", new_y="NEXT")
            self.ln(3)
            self.set_text_color(*INK)

    def footer(self) -> None:
        self.set_y(-14)
        self.set_draw_color(*RULE)
        self.line(LEFT, self.get_y(), self.w - RIGHT, self.get_y())
        self.set_font(FONT, "", 8)
        self.set_text_color(*MUTED)
        # left-aligned: the '{nb}' alias is measured before it is replaced, so it cannot align right
        self.cell(0, 6, f"{self.caption} · Page {self.page_no()} of {{nb}}", align="L")

    def style(self, size: float, bold: bool = False, color: tuple[int, int, int] = INK) -> None:
        self.set_font(FONT, "B" if bold else "", size)
        self.set_text_color(*color)

    def label(self, caption: str) -> None:
        """A small capitalised heading over a block."""
        self.style(7.5, bold=True, color=MUTED)
        self.set_char_spacing(0.6)
        self.cell(0, 5, caption.upper(), new_x="LMARGIN", new_y="NEXT")
        self.set_char_spacing(0)

    def lines_at(self, x: float, width: float, lines: Sequence[str], size: float = 9.0) -> None:
        self.style(size)
        for line in lines:
            self.set_x(x)
            self.multi_cell(width, ROW - 0.6, line, align="L", new_x="LMARGIN", new_y="NEXT")

    def pair(
        self, x: float, width: float, key: str, value: str, bold: bool = False, size: float = 9.0
    ) -> None:
        """A right-aligned 'key   value' row of `width` from `x`."""
        self.set_x(x)
        self.style(size, bold=bold, color=INK if bold else MUTED)
        self.cell(width * 0.45, ROW + 0.4, key, align="L")
        self.style(size, bold=bold)
        self.cell(width * 0.55, ROW + 0.4, value, align="R", new_x="LMARGIN", new_y="NEXT")


def _seller(pdf: _Pages, doc: Mapping[str, Any], width: float) -> float:
    seller = doc.get("seller") or {}
    pdf.set_xy(LEFT, TOP)
    pdf.style(14, bold=True, color=ACCENT)
    pdf.multi_cell(width, 7, text.party_name(seller), new_x="LMARGIN", new_y="NEXT")
    pdf.ln(1)
    extra = [f"Tax ID {seller['tax_id']}" if seller.get("tax_id") else "", text.party_email(seller)]
    pdf.lines_at(LEFT, width, text.party_lines(seller) + [e for e in extra if e], size=8.5)
    return pdf.get_y()


def _heading(pdf: _Pages, doc: Mapping[str, Any], x: float, width: float) -> float:
    pdf.set_xy(x, TOP - 1)
    pdf.style(24, bold=True, color=ACCENT)
    pdf.cell(width, 11, text.title(doc), align="R", new_x="LMARGIN", new_y="NEXT")
    pdf.set_x(x)
    pdf.style(10.5, bold=True)
    pdf.cell(width, 6, str(doc["number"]), align="R", new_x="LMARGIN", new_y="NEXT")
    pdf.ln(2)
    pdf.pair(x, width, "Issue date", text.day(doc["issued_at"]))
    if doc.get("due_at"):
        pdf.pair(x, width, "Due date", text.day(doc["due_at"]))
    if doc.get("period"):
        pdf.pair(x, width, "Period", text.period_text(doc["period"]))
    status = str(doc.get("status") or "")
    pdf.pair(x, width, "Status", text.STATUSES.get(status, status))
    if status == "void":
        pdf.set_x(x)
        pdf.style(12, bold=True, color=VOID_RED)
        pdf.cell(width, 7, "VOID", align="R", new_x="LMARGIN", new_y="NEXT")
    return pdf.get_y()


def _parties(pdf: _Pages, doc: Mapping[str, Any], y: float) -> None:
    customer = doc.get("customer")
    half = (pdf.epw - 10) / 2
    right = LEFT + half + 10
    pdf.set_xy(LEFT, y)
    pdf.label("Bill to")
    pdf.style(10.5, bold=True)
    name = text.party_name(customer) or f"Account {doc.get('account', '')}"
    pdf.multi_cell(half, ROW + 0.4, name, new_x="LMARGIN", new_y="NEXT")
    lines = text.party_lines(customer)
    if customer and customer.get("tax_id"):
        lines.append(f"Tax ID {customer['tax_id']}")
    if text.party_email(customer):
        lines.append(text.party_email(customer))
    pdf.lines_at(LEFT, half, lines)
    bottom = pdf.get_y()
    pdf.set_xy(right, y)
    pdf.set_left_margin(right)
    pdf.label("Details")
    pdf.set_left_margin(LEFT)
    pdf.pair(right, half, "Account", str(doc.get("account", "")))
    pdf.pair(right, half, "Currency", str(doc["currency"]).upper())
    references = doc.get("references") or {}
    if references.get("number"):
        pdf.set_x(right)
        pdf.style(9.5, bold=True, color=ACCENT)
        pdf.cell(
            half, ROW + 1, f"Credits invoice {references['number']}", align="R", new_x="LMARGIN", new_y="NEXT"
        )
    pdf.set_y(max(bottom, pdf.get_y()) + 7)


def _lines(pdf: _Pages, doc: Mapping[str, Any]) -> None:
    currency = str(doc["currency"])
    code = currency.upper()
    heads = ("Description", "Quantity", "Credits", f"Net {code}", f"Tax {code}", f"Gross {code}")
    pdf.style(8.8)
    pdf.set_draw_color(*RULE)
    pdf.set_line_width(0.2)
    with pdf.table(
        col_widths=COLUMNS,
        text_align=ALIGN,
        borders_layout="HORIZONTAL_LINES",
        headings_style=FontFace(emphasis="BOLD", color=INK, fill_color=HEAD_FILL, size_pt=8.3),
        line_height=4.6,
        padding=(1.8, 1.6, 1.8, 1.6),
        repeat_headings=1,
        first_row_as_headings=True,
    ) as table:
        table.row(heads)
        for line in doc.get("lines") or []:
            table.row(
                (
                    str(line.get("description", "")),
                    text.quantity(line),
                    text.credits(line["credits"]) if line.get("credits") is not None else "",
                    text.amount(line["net_minor"], currency, code=False),
                    text.amount(line["tax_minor"], currency, code=False),
                    text.amount(line["gross_minor"], currency, code=False),
                )
            )
    pdf.set_draw_color(*RULE)
    pdf.line(LEFT, pdf.get_y(), pdf.w - RIGHT, pdf.get_y())
    pdf.ln(4)


def _totals(pdf: _Pages, doc: Mapping[str, Any]) -> None:
    currency, totals, tax = str(doc["currency"]), doc["totals"], doc.get("tax") or {}
    payments = doc.get("payments") or []
    rows: list[tuple[str, int, bool]] = [
        ("Net", totals["net_minor"], False),
        (f"Tax {tax.get('tax_rate', '')}".strip(), totals["tax_minor"], False),
        ("Total credited" if doc["kind"] == "credit_note" else "Total", totals["gross_minor"], True),
    ]
    if doc["kind"] == "invoice" and doc.get("status") != "void":  # nothing is due on a void invoice
        paid = text.paid_minor(payments)
        rows += [("Paid", paid, False), ("Amount due", text.integer(totals["gross_minor"]) - paid, True)]
    height = ROW * (len(rows) + 3) + 8
    if pdf.will_page_break(height):
        pdf.add_page()
    width, y = 78.0, pdf.get_y()
    x = pdf.w - RIGHT - width
    pdf.set_xy(LEFT, y)
    pdf.style(8.5, color=MUTED)
    pdf.multi_cell(
        pdf.epw - width - 4, ROW - 0.6, text.tax_text(tax), align="L", new_x="LMARGIN", new_y="NEXT"
    )
    pdf.set_y(y)
    for key, value, strong in rows:
        if strong:
            pdf.set_draw_color(*RULE)
            pdf.line(x, pdf.get_y() + 0.5, x + width, pdf.get_y() + 0.5)
            pdf.ln(1)
        pdf.pair(x, width, key, text.amount(value, currency), bold=strong, size=10 if strong else 9)
    pdf.ln(5)


def _payments(pdf: _Pages, doc: Mapping[str, Any]) -> None:
    payments: list[Mapping[str, Any]] = list(doc.get("payments") or [])
    if not payments:
        return
    if pdf.will_page_break(ROW * (len(payments) + 2)):
        pdf.add_page()
    pdf.label("Payments")
    for p in payments:
        pdf.style(8.8)
        pdf.cell(30, ROW, text.day(p.get("at")))
        pdf.cell(30, ROW, str(p.get("method", "")).capitalize())
        pdf.style(8.8, color=MUTED)
        pdf.cell(pdf.epw - 100, ROW, str(p.get("id", "")))
        pdf.style(8.8)
        pdf.cell(40, ROW, text.amount(p["amount_minor"], str(doc["currency"])), align="R")
        pdf.ln(ROW)
    pdf.ln(4)


def _notes(pdf: _Pages, doc: Mapping[str, Any]) -> None:
    notes = text.notes(doc)
    if not notes:
        return
    if pdf.will_page_break(ROW * (len(notes) + 2)):
        pdf.add_page()
    pdf.label("Notes")
    pdf.lines_at(LEFT, pdf.epw, notes, size=8.8)


def pdf(document: Mapping[str, Any]) -> bytes:
    """The document as PDF bytes; the same document gives the same bytes."""
    caption = f"{text.title(document)} {document['number']}"
    doc = _Pages(caption)
    doc.set_creation_date(text.instant(document["issued_at"]))
    doc.set_producer(PRODUCER)
    doc.set_creator(PRODUCER)
    doc.set_title(caption)
    doc.set_author(text.party_name(document.get("seller")))
    doc.set_lang("en")
    doc.add_page()
    right_width = 74.0
    left_end = _seller(doc, document, doc.epw - right_width - 10)
    right_end = _heading(doc, document, doc.w - RIGHT - right_width, right_width)
    y = max(left_end, right_end) + 5
    doc.set_draw_color(*RULE)
    doc.line(LEFT, y, doc.w - RIGHT, y)
    _parties(doc, document, y + 5)
    _lines(doc, document)
    _totals(doc, document)
    _payments(doc, document)
    _notes(doc, document)
    return bytes(doc.output())
