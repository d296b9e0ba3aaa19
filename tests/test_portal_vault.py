"""The portal's Provider keys page over real HTTP, Redis and Postgres: a customer adds a key to the BYOK
vault (its requests to that provider then go out with it), sees it listed by its last four characters
only (the key itself in no page), replaces and deletes it; another account's record is unreachable, by
URL or by record id; bad input is a message naming the field and stores nothing; a gateway without a
master key says so."""

from __future__ import annotations

import re
from typing import Any

from .conftest import Sidecar, SidecarFactory
from .support_fake_provider import Fake
from .support_portal import csrf_of, post_form, sign_in, text_of
from .support_vault import VAULT_KEY, bearer, chat, sent_key, store_key, vault_sidecar
from .support_vault import east as east  # the fixtures
from .support_vault import fake as fake

C = 1_000_000
OTHER_KEY = "AIzaOtherAccountsKey55555555555555555LMNO"
PAGES = ("", "usage", "history", "keys", "provider-keys", "settings", "buy", "documents")


async def listing(sc: Sidecar, api_key: str) -> list[Any]:
    resp = await sc.client.get("/v1/account/llm-keys", headers=bearer(api_key))
    assert resp.status == 200
    return list((await resp.json())["data"])


async def test_a_provider_key_is_added_listed_by_last_four_replaced_and_deleted(
    make_sidecar: SidecarFactory, fake: Fake, east: Fake
) -> None:
    sc = await vault_sidecar(make_sidecar, fake, east)
    account, key = await sc.account(10 * C)
    client = sc.client
    _, csrf = await sign_in(client, key)
    base = f"/portal/accounts/{account}/provider-keys"
    empty = await (await client.get(base)).text()
    assert "No provider keys stored" in text_of(empty)
    options = re.findall(r'<option value="([^"]+)"', empty)
    assert options == ["acme", "default"]  # the configured upstreams' providers
    status, body, location = await post_form(
        client, base, {"csrf": csrf, "provider": "acme", "key": VAULT_KEY, "label": "prod"}
    )
    assert (status, location) == (303, f"{base}?done=provider-key-added"), text_of(body)
    pages = [body]
    listed = await (await client.get(f"{base}?done=provider-key-added")).text()
    pages.append(listed)
    words = text_of(listed)
    assert "The provider key is stored" in words
    (row,) = re.findall(r'<tr data-id="(lk_[0-9a-f]+)">(.*?)</tr>', listed, re.S)
    record_id, cells = row[0], text_of(row[1])
    assert cells.startswith(f"acme prod …{VAULT_KEY[-4:]} ")
    assert re.search(r"\d{4}-\d\d-\d\d \d{4}-\d\d-\d\d Delete$", cells)  # added and changed: dates only
    (stored,) = await listing(sc, key)
    assert (stored["id"], stored["provider"], stored["label"]) == (record_id, "acme", "prod")
    # the account's requests to that provider now go out with the stored key
    status, headers, _ = await chat(sc, key, "acme-model")
    assert status == 200
    assert sent_key(east) == VAULT_KEY
    assert headers["x-creditgate-key-source"] == "vault"
    # a second key for the provider replaces the first: one record, the same id
    status, _, location = await post_form(
        client, base, {"csrf": csrf, "provider": "acme", "key": OTHER_KEY, "label": ""}
    )
    assert (status, location) == (303, f"{base}?done=provider-key-replaced")
    (replaced,) = await listing(sc, key)
    assert (replaced["id"], replaced["label"], replaced["last4"]) == (record_id, None, OTHER_KEY[-4:])
    pages += [await (await client.get(f"/portal/accounts/{account}/{path}")).text() for path in PAGES]
    for html in pages:
        assert VAULT_KEY not in html
        assert OTHER_KEY not in html
        assert VAULT_KEY[:-4] not in html
    status, _, location = await post_form(client, f"{base}/{record_id}/delete", {"csrf": csrf})
    assert (status, location) == (303, f"{base}?done=provider-key-deleted")
    gone = text_of(await (await client.get(f"{base}?done=provider-key-deleted")).text())
    assert "The provider key is deleted" in gone
    assert "No provider keys stored" in gone
    assert await listing(sc, key) == []
    status, body, _ = await post_form(client, f"{base}/{record_id}/delete", {"csrf": csrf})  # again
    assert status == 404
    assert "No provider key with this id" in text_of(body)


async def test_another_accounts_provider_keys_are_unreachable(
    make_sidecar: SidecarFactory, fake: Fake, east: Fake
) -> None:
    sc = await vault_sidecar(make_sidecar, fake, east)
    mine, my_key = await sc.account(C)
    other, other_key = await sc.account(C)
    theirs = (await store_key(sc, other_key, "acme", OTHER_KEY, "theirs"))["id"]
    client = sc.client
    _, csrf = await sign_in(client, my_key)
    # the other account's page and forms, by URL
    assert (await client.get(f"/portal/accounts/{other}/provider-keys")).status == 404
    for path, data in (
        ("provider-keys", {"provider": "acme", "key": VAULT_KEY}),
        (f"provider-keys/{theirs}/delete", {}),
    ):
        status, body, _ = await post_form(client, f"/portal/accounts/{other}/{path}", {**data, "csrf": csrf})
        assert status == 404, path
        assert theirs not in body
    # their record's id, on my own page: as unknown as an id that does not exist
    for record_id in (theirs, "lk_nosuchrecord", "x" * 65):
        status, body, _ = await post_form(
            client, f"/portal/accounts/{mine}/provider-keys/{record_id}/delete", {"csrf": csrf}
        )
        assert status == 404, record_id
        assert "No provider key with this id" in text_of(body)
    # an `account` field is no way in: the key lands on the session's own account
    status, _, _ = await post_form(
        client,
        f"/portal/accounts/{mine}/provider-keys",
        {"csrf": csrf, "provider": "default", "key": VAULT_KEY, "account": other},
    )
    assert status == 303
    assert [(k["id"], k["label"]) for k in await listing(sc, other_key)] == [(theirs, "theirs")]
    assert [k["provider"] for k in await listing(sc, my_key)] == ["default"]
    assert theirs not in await (await client.get(f"/portal/accounts/{mine}/provider-keys")).text()


BAD: list[tuple[dict[str, str], int, str, str]] = [
    ({"provider": "nope", "key": VAULT_KEY}, 400, "the provider of a configured upstream", "provider"),
    ({"key": VAULT_KEY}, 400, "provider must be", "provider"),
    ({"provider": "acme", "key": ""}, 400, "key must be 8-4096 visible ASCII characters", "key"),
    ({"provider": "acme", "key": "AIza123"}, 400, "key must be 8-4096", "key"),
    ({"provider": "acme", "key": "AIza with spaces 0123456789"}, 400, "key must be 8-4096", "key"),
    ({"provider": "acme", "key": "AIzaCléNonAscii0123456789"}, 400, "key must be 8-4096", "key"),
    ({"provider": "acme", "key": VAULT_KEY, "label": "x" * 101}, 400, "label must be at most 100", "label"),
    ({"provider": "acme", "key": VAULT_KEY, "label": "bad\x01label"}, 400, "no control characters", "label"),
]  # fmt: skip


async def test_bad_input_is_a_message_naming_the_field_and_stores_nothing(
    make_sidecar: SidecarFactory, fake: Fake, east: Fake
) -> None:
    sc = await vault_sidecar(make_sidecar, fake, east)
    account, key = await sc.account(C)
    client = sc.client
    _, csrf = await sign_in(client, key)
    base = f"/portal/accounts/{account}/provider-keys"
    for data, status, words, field in BAD:
        got, body, _ = await post_form(client, base, {"csrf": csrf, **data})
        assert got == status, (data, got, text_of(body)[:300])
        message = re.search(r'<div class="problem" role="alert" id="form-error">(.*?)</div>', body, re.S)
        assert message, data
        assert words in text_of(message.group(1)), (data, text_of(message.group(1)))
        assert re.search(rf'name="{field}"[^>]*aria-invalid="true"', body), (data, field)
        assert csrf_of(body) == csrf  # the page again, ready to correct and send
        assert data["key"] not in body or not data["key"]  # the key typed is not written back
        if data.get("label") is not None and "\x01" not in data["label"]:
            assert data["label"] in body  # the other fields are
    status, body, _ = await post_form(client, base, {"provider": "acme", "key": VAULT_KEY})  # no CSRF
    assert status == 403
    assert VAULT_KEY not in body
    assert await listing(sc, key) == []
    assert (
        await sc.services.store.pool.fetchval("SELECT count(*) FROM llm_keys WHERE account_id = $1", account)
        == 0
    )


async def test_without_a_master_key_the_page_says_so_and_stores_nothing(
    make_sidecar: SidecarFactory, fake: Fake, east: Fake
) -> None:
    sc = await vault_sidecar(make_sidecar, fake, east, vault_master_key=None)
    account, key = await sc.account(C)
    client = sc.client
    _, csrf = await sign_in(client, key)
    base = f"/portal/accounts/{account}/provider-keys"
    page = await (await client.get(base)).text()
    assert "not configured the vault's master key" in text_of(page)
    assert 'name="key"' not in page  # no form to fill in vain
    status, body, _ = await post_form(client, base, {"csrf": csrf, "provider": "acme", "key": VAULT_KEY})
    assert status == 503
    assert "vault is not configured" in text_of(body)
    assert VAULT_KEY not in body
    assert await listing(sc, key) == []
