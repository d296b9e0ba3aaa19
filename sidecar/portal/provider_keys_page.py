"""Provider keys: the account's own keys for the model providers, in the BYOK vault (README "The BYOK
vault"). Add one (or replace the provider's key), list them (provider, label, last four characters and
dates: never the key) and delete one, through the `Vault` itself, with the checks of
/v1/account/llm-keys. A key posted here is never written back into a page, not even beside the message
about a bad field; a record id from a URL is deleted only within the page's account."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from ..errors import CreditgateError, NotFound
from ..responses import status_of
from ..vault.records import KeyBody
from .edge import desk, viewer
from .pages import done, form_data, form_error, page

MAX_RECORD_ID_CHARS = 64


async def provider_keys_view(request: web.Request, *, status: int = 200, **extra: Any) -> web.Response:
    d = desk(request)
    account = viewer(request).of()
    records = await d.vault.list(account)
    context: dict[str, Any] = {"form": {}, **extra}
    return await page(
        request,
        "provider_keys.html",
        active="provider-keys",
        title="Provider keys",
        status=status,
        records=records,
        providers=[(p, p) for p in sorted(d.vault.providers)],
        vault_on=d.vault.ring is not None,
        **context,
    )


async def provider_keys(request: web.Request) -> web.StreamResponse:
    return await provider_keys_view(request)


async def add_key(request: web.Request) -> web.StreamResponse:
    """provider, key, label: stored (sealed) for the page's account; 303 back to the list."""
    d = desk(request)
    account = viewer(request).of()
    form = await form_data(request)
    shown = {name: value for name, value in form.items() if name != "key"}  # the key never goes back
    try:
        body = KeyBody(
            provider=form.get("provider", ""),
            key=form.get("key", "").strip(),
            label=form.get("label") or None,
        )
        _, created = await d.vault.put(account, body)
    except CreditgateError as err:
        return await provider_keys_view(request, status=status_of(err), form=shown, **form_error(err))
    raise done(account, "provider-keys", "provider-key-added" if created else "provider-key-replaced")


async def delete_key(request: web.Request) -> web.StreamResponse:
    d = desk(request)
    account = viewer(request).of()
    record_id = request.match_info["record_id"]
    try:
        if len(record_id) > MAX_RECORD_ID_CHARS:
            raise NotFound("No provider key with this id on this account.", param="id")
        await d.vault.delete(account, record_id)
    except CreditgateError as err:
        return await provider_keys_view(request, status=status_of(err), **form_error(err))
    raise done(account, "provider-keys", "provider-key-deleted")
