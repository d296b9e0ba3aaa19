"""Billing profiles over real HTTP and Postgres: the client sets and reads its own, the operator any
account's; every change bumps `version` (a PUT of the same profile does not); bad input is a 400 naming
the field and changes nothing; a snapshot taken before an edit stays as it was."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from sidecar.documents.countries import CODES, EU_VAT_PREFIX, tax_id_of
from sidecar.documents.profiles import profile_snapshot
from sidecar.documents.profiles_api import TAX_TABLE

from .conftest import Sidecar

PATH = "/v1/billing-profile"
PROFILE: dict[str, Any] = {
    "legal_name": "Acme SAS",
    "address_lines": ["12 rue de la Paix", "Bâtiment B"],
    "city": "Paris",
    "postal_code": "75002",
    "country": "fr",
    "tax_id": "FR 40 303 265 045",
    "billing_email": "billing@acme.example",
}


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def put(sc: Sidecar, key: str, body: Any) -> tuple[int, dict[str, Any]]:
    resp = await sc.client.put(PATH, json=body, headers=auth(key))
    return resp.status, await resp.json()


async def get(sc: Sidecar, key: str) -> tuple[int, dict[str, Any]]:
    resp = await sc.client.get(PATH, headers=auth(key))
    return resp.status, await resp.json()


async def test_the_client_sets_and_reads_its_own_profile(sidecar: Sidecar) -> None:
    account, key = await sidecar.account(0)
    status, body = await get(sidecar, key)
    assert (status, body["error"]["code"]) == (404, "not_found")  # none yet
    status, saved = await put(sidecar, key, PROFILE)
    assert status == 200, saved
    assert saved["account"] == account
    assert (saved["country"], saved["tax_id"], saved["version"]) == ("FR", "FR40303265045", 1)
    assert saved["region"] is None
    assert saved["address_lines"] == PROFILE["address_lines"]
    assert (await get(sidecar, key)) == (200, saved)

    status, same = await put(sidecar, key, PROFILE)  # no change: no new version
    assert (status, same["version"], same["updated_at"]) == (200, 1, saved["updated_at"])
    status, moved = await put(sidecar, key, {**PROFILE, "city": "Lyon", "postal_code": "69001"})
    assert (status, moved["city"], moved["version"]) == (200, "Lyon", 2)
    assert moved["updated_at"] >= saved["updated_at"]
    status, cleared = await put(
        sidecar, key, {**PROFILE, "city": "Lyon", "postal_code": "69001", "tax_id": None}
    )
    assert (cleared["tax_id"], cleared["version"]) == (None, 3)


async def test_the_operator_reads_and_edits_any_account(sidecar: Sidecar) -> None:
    account, key = await sidecar.account(0)
    other, other_key = await sidecar.account(0)
    path = f"/accounts/{account}/billing-profile"
    made = await sidecar.admin("PUT", path, {**PROFILE, "region": "Île-de-France"})
    assert (made["account"], made["region"], made["version"]) == (account, "Île-de-France", 1)
    assert (await get(sidecar, key))[1] == made  # the client sees what the operator set
    edited = await sidecar.admin("PUT", path, {**PROFILE, "legal_name": "Acme Group SAS"})
    assert (edited["legal_name"], edited["region"], edited["version"]) == ("Acme Group SAS", None, 2)
    assert await sidecar.admin("GET", path) == edited
    # Another account's key reaches only its own profile; its PUT leaves this one alone.
    assert (await get(sidecar, other_key))[0] == 404
    status, theirs = await put(sidecar, other_key, {**PROFILE, "legal_name": "Other Ltd"})
    assert (status, theirs["account"]) == (200, other)
    assert await sidecar.admin("GET", path) == edited


async def test_keys_and_accounts_are_checked(sidecar: Sidecar) -> None:
    assert (await sidecar.client.get(PATH)).status == 401
    assert (await sidecar.client.put(PATH, json=PROFILE)).status == 401
    assert (await sidecar.client.get(PATH, headers=auth("sk-not-a-key"))).status == 401
    resp = await sidecar.client.get("/admin/accounts/nobody/billing-profile")
    assert resp.status == 401  # no admin token
    for method in ("GET", "PUT"):
        resp = await sidecar.client.request(
            method, "/admin/accounts/nobody/billing-profile", json=PROFILE, headers=sidecar.admin_headers()
        )
        assert resp.status == 404
        assert (await resp.json())["error"]["param"] == "account"


@pytest.mark.parametrize(
    ("change", "param"),
    [
        ({"country": "XX"}, "country"),
        ({"country": "FRA"}, "country"),
        ({"country": "DE"}, "tax_id"),  # a French VAT number for a German address
        ({"tax_id": "DE123456789"}, "tax_id"),
        ({"tax_id": "FR1"}, "tax_id"),
        ({"country": "GR", "tax_id": "GR123456789"}, "tax_id"),  # Greece's prefix is EL
        ({"country": "US", "tax_id": "x"}, "tax_id"),
        ({"billing_email": "billing.acme.example"}, "billing_email"),
        ({"billing_email": "a b@acme.example"}, "billing_email"),
        ({"billing_email": "billing@localhost"}, "billing_email"),
        ({"legal_name": "  "}, "legal_name"),
        ({"legal_name": "Acme\nSAS"}, "legal_name"),
        ({"legal_name": 7}, "legal_name"),
        ({"address_lines": []}, "address_lines"),
        ({"address_lines": ["a", "b", "c", "d", "e"]}, "address_lines"),
        ({"address_lines": ["ok", ""]}, "address_lines"),
        ({"city": "x" * 101}, "city"),
        ({"postal_code": "75002!"}, "postal_code"),
        ({"region": "r" * 101}, "region"),
        ({"vat": "FR1"}, "vat"),  # unknown field
        ({"city": None}, "city"),
    ],
)
async def test_bad_input_names_the_field_and_changes_nothing(
    sidecar: Sidecar, change: dict[str, Any], param: str
) -> None:
    _account, key = await sidecar.account(0)
    _status, before = await put(sidecar, key, PROFILE)
    status, body = await put(sidecar, key, {**PROFILE, **change})
    assert status == 400, body
    assert (body["error"]["type"], body["error"]["param"]) == ("invalid_request_error", param)
    assert (await get(sidecar, key)) == (200, before)


async def test_a_missing_field_is_named(sidecar: Sidecar) -> None:
    _account, key = await sidecar.account(0)
    status, body = await put(sidecar, key, {k: v for k, v in PROFILE.items() if k != "city"})
    assert (status, body["error"]["param"]) == (400, "city")
    status, body = await put(sidecar, key, "not an object")
    assert status == 400
    assert (await get(sidecar, key))[0] == 404  # nothing was made


async def test_a_snapshot_is_a_value_and_edits_bump_the_version(sidecar: Sidecar) -> None:
    account, key = await sidecar.account(0)
    await put(sidecar, key, PROFILE)
    pool = sidecar.services.store.pool
    async with pool.acquire() as conn:
        snap = await profile_snapshot(conn, account)
    kept = {**snap, "address_lines": list(snap["address_lines"])}
    await put(sidecar, key, {**PROFILE, "address_lines": ["1 avenue Foch"], "legal_name": "Acme 2"})
    assert snap == kept  # the snapshot taken before the edit is unchanged
    assert (snap["version"], snap["legal_name"]) == (1, "Acme SAS")
    async with pool.acquire() as conn:
        now = await profile_snapshot(conn, account)
    assert (now["version"], now["legal_name"], now["address_lines"]) == (2, "Acme 2", ["1 avenue Foch"])
    # What a document stores: the profile and its tax rule (the default table: no tax).
    rule = sidecar.client.app[TAX_TABLE].rule_for(now)
    assert (rule.name, rule.rate_bp) == ("no-tax", 0)


async def test_concurrent_edits_each_get_a_version(sidecar: Sidecar) -> None:
    _account, key = await sidecar.account(0)
    results = await asyncio.gather(*(put(sidecar, key, {**PROFILE, "city": f"City {i}"}) for i in range(8)))
    assert all(status == 200 for status, _ in results)
    assert sorted(body["version"] for _, body in results) == list(range(1, 9))
    assert (await get(sidecar, key))[1]["version"] == 8


async def test_a_tax_rule_table_of_the_settings_is_used(make_sidecar: Any) -> None:
    rules = [{"name": "none", "rate": 0}, {"name": "fr-vat", "country": "FR", "rate": "20.00"}]
    sc = await make_sidecar(tax_rules=rules, tax_seller_country="FR")
    _account, key = await sc.account(0)
    _status, profile = await put(sc, key, PROFILE)
    assert sc.client.app[TAX_TABLE].rule_for(profile).name == "fr-vat"


def test_country_codes_and_vat_prefixes() -> None:
    assert len(CODES) == 249
    assert len(EU_VAT_PREFIX) == 27
    assert tax_id_of("el-123.456.789", "GR") == "EL123456789"
    assert tax_id_of(" 12-3456789 ", "US") == "12-3456789"
