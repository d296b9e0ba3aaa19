"""Documents: the account's invoices, receipts and credit notes (`Invoices.page`, as GET /v1/invoices),
each as PDF and CSV (the same pure renderers as /v1/invoices/{id}.pdf and .csv), and the billing profile
they are addressed to (`Profiles`, as PUT /v1/billing-profile: the same checks, field by field)."""

from __future__ import annotations

import asyncio
from typing import Any

import msgspec
from aiohttp import web

from ..documents.render import csv_text, pdf
from ..errors import BadRequest, CreditgateError, NotFound
from ..responses import status_of
from . import forms
from .edge import desk, viewer
from .pages import done, form_data, form_error, page

PAGE_SIZE = 20
DOCUMENT_KINDS = {"invoice": "Invoices", "receipt": "Receipts", "credit_note": "Credit notes"}
PROFILE_TEXT = ("legal_name", "city", "postal_code", "country", "billing_email")


async def documents_view(request: web.Request, *, status: int = 200, **extra: Any) -> web.Response:
    d = desk(request)
    account = viewer(request).of()
    kind = request.query.get("kind") or None
    after = request.query.get("after") or None
    listed: dict[str, Any] = {"data": [], "has_more": False}
    problem: dict[str, Any] = {}
    try:
        listed = await d.invoices.page(account, kind, PAGE_SIZE, after)
    except BadRequest as err:
        problem, status = form_error(err), 400
    try:
        profile: dict[str, Any] | None = await d.profiles.get(account)
    except NotFound:
        profile = None
    context: dict[str, Any] = {"form": {}, **problem, **extra}
    return await page(
        request,
        "documents.html",
        active="documents",
        title="Documents",
        status=status,
        docs=listed["data"],
        more=listed["has_more"],
        kind=kind,
        kinds=DOCUMENT_KINDS,
        profile=profile,
        **context,
    )


async def documents(request: web.Request) -> web.StreamResponse:
    return await documents_view(request)


async def _document(request: web.Request) -> dict[str, Any]:
    doc_id = request.match_info["id"]
    found: dict[str, Any] = await desk(request).invoices.view(doc_id, viewer(request).of())
    return found


async def document_pdf(request: web.Request) -> web.StreamResponse:
    doc = await _document(request)
    rendered = await asyncio.to_thread(pdf, doc)  # 0.2-0.3 s of CPU: off the event loop
    disposition = f'attachment; filename="{doc["number"]}.pdf"'
    return web.Response(
        body=rendered, content_type="application/pdf", headers={"Content-Disposition": disposition}
    )


async def document_csv(request: web.Request) -> web.StreamResponse:
    doc = await _document(request)
    disposition = f'attachment; filename="{doc["number"]}.csv"'
    return web.Response(
        text=csv_text(doc), content_type="text/csv", headers={"Content-Disposition": disposition}
    )


def profile_body(form: dict[str, str]) -> bytes:
    """The form as the JSON body of PUT /v1/billing-profile (its checks then name any bad field)."""
    body: dict[str, Any] = {name: (form.get(name) or "").strip() for name in PROFILE_TEXT}
    lines = [line.strip() for line in (form.get("address_lines") or "").splitlines() if line.strip()]
    body["address_lines"] = lines
    for optional in ("region", "tax_id"):
        body[optional] = forms.text(form, optional, longest=100)
    return msgspec.json.encode(body)


async def set_profile(request: web.Request) -> web.StreamResponse:
    d = desk(request)
    account = viewer(request).of()
    form = await form_data(request)
    try:
        await d.profiles.put(account, profile_body(form))
    except CreditgateError as err:
        return await documents_view(request, status=status_of(err), form=form, **form_error(err))
    raise done(account, "documents", "profile-set")
