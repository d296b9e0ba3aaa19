"""Referrals over real HTTP, real Postgres and real Redis: each account's codes (made once, also when
asked for twice at once), accounts created with a code (unknown, used up, self-referral and retries
refused or counted once, atomically), and the referrer's bonus, granted once on the first purchase."""

from __future__ import annotations

import asyncio
import json
import re
import uuid
from pathlib import Path
from typing import Any

import pytest

from sidecar.config import load_settings
from sidecar.errors import ConfigError
from sidecar.payments.landing import PAYMENTS
from sidecar.payments.orders import OrderStore
from sidecar.payments.referral_codes import CODE_ALPHABET
from sidecar.payments.referrals import reward_referrer

from .conftest import Sidecar, SidecarFactory, clean_env, new_key_prefix
from .support import creditgate

C = 1_000_000
CODE = re.compile(rf"STR-[{CODE_ALPHABET}]{{8}}")


async def call(sc: Sidecar, method: str, path: str, body: Any = None, key: str | None = None) -> Any:
    """(status, body) of an /admin request, or, with `key`, of a client request to `path`."""
    if key is None:
        resp = await sc.client.request(method, f"/admin{path}", json=body, headers=sc.admin_headers())
    else:
        resp = await sc.client.request(method, path, json=body, headers={"Authorization": f"Bearer {key}"})
    return resp.status, await resp.json()


async def codes_in_db(sc: Sidecar, account: str) -> list[tuple[str, int, int]]:
    rows = await sc.services.store.pool.fetch(
        "SELECT code, uses, max_uses FROM referral_codes WHERE account_id = $1 ORDER BY code", account
    )
    return [(r[0], r[1], r[2]) for r in rows]


async def account_rows(sc: Sidecar, account: str) -> int:
    return int(await sc.services.store.pool.fetchval("SELECT count(*) FROM accounts WHERE id = $1", account))


async def referrer(sc: Sidecar) -> tuple[str, str]:
    """A new account and the first of its codes."""
    account, _ = await sc.account(0)
    return account, (await codes_in_db(sc, account))[0][0]


async def test_an_account_has_its_codes_from_creation(sidecar: Sidecar) -> None:
    account, key = await sidecar.account(0)
    made = await codes_in_db(sidecar, account)
    assert len(made) == 5
    assert all(CODE.fullmatch(code) and (uses, limit) == (0, 10) for code, uses, limit in made), made
    status, view = await call(sidecar, "GET", "/v1/credits/referrals", key=key)
    assert status == 200, view
    assert sorted(c["code"] for c in view["codes"]) == [c for c, _, _ in made]
    assert {(c["uses"], c["max_uses"]) for c in view["codes"]} == {(0, 10)}
    assert (view["referred_accounts"], view["bonus_earned"], view["bonus_per_referral"]) == (0, 0, 25 * C)
    assert view["referred_by_code"] is None
    assert await call(sidecar, "GET", f"/accounts/{account}/referrals") == (200, view)
    # A retried create (409) makes no more codes.
    assert (await call(sidecar, "POST", "/accounts", {"id": account}))[0] == 409
    assert await codes_in_db(sidecar, account) == made
    status, body = await call(sidecar, "GET", "/accounts/nobody-here/referrals")
    assert (status, body["error"]["param"]) == (404, "account")
    assert (await call(sidecar, "GET", "/v1/credits/referrals", key="cgk-wrong"))[0] == 401


async def test_codes_made_lazily_are_made_once_however_many_ask(sidecar: Sidecar) -> None:
    account = f"old-{uuid.uuid4().hex[:8]}"
    assert await sidecar.services.store.create_account(account)  # as accounts made before referrals
    await sidecar.services.accounts.add_account(account)
    key = (await sidecar.admin("POST", f"/accounts/{account}/keys"))["key"]
    assert await codes_in_db(sidecar, account) == []
    seen = await asyncio.gather(
        *(call(sidecar, "GET", "/v1/credits/referrals", key=key) for _ in range(10)),
        *(call(sidecar, "GET", f"/accounts/{account}/referrals") for _ in range(10)),
    )
    made = await codes_in_db(sidecar, account)
    assert len(made) == 5
    assert all(
        status == 200 and sorted(c["code"] for c in v["codes"]) == [c for c, _, _ in made]
        for status, v in seen
    )


async def test_an_account_created_with_a_code_is_linked_to_its_owner(sidecar: Sidecar) -> None:
    owner, code = await referrer(sidecar)
    new = f"ref-{uuid.uuid4().hex[:8]}"
    assert await call(sidecar, "POST", "/accounts", {"id": new, "referral_code": code}) == (201, {"id": new})
    link = await sidecar.services.admin.referrals.referral_of(new)
    assert link is not None
    assert (link.referrer, link.code, link.rewarded_at) == (owner, code, None)
    view = (await call(sidecar, "GET", f"/accounts/{owner}/referrals"))[1]
    assert (view["referred_accounts"], view["rewarded_accounts"]) == (1, 0)
    assert [c["uses"] for c in view["codes"] if c["code"] == code] == [1]
    assert (await call(sidecar, "GET", f"/accounts/{new}/referrals"))[1]["referred_by_code"] == code
    assert len(await codes_in_db(sidecar, new)) == 5  # the new account has codes of its own
    # Retried, also many at once: the account exists (409) and the code's use is counted once.
    retries = await asyncio.gather(
        *(call(sidecar, "POST", "/accounts", {"id": new, "referral_code": code}) for _ in range(10))
    )
    assert {(s, b["error"]["param"]) for s, b in retries} == {(409, "id")}
    assert [u for c, u, _ in await codes_in_db(sidecar, owner) if c == code] == [1]


async def test_concurrent_creates_of_one_new_account_count_one_use(sidecar: Sidecar) -> None:
    owner, code = await referrer(sidecar)
    new = f"ref-{uuid.uuid4().hex[:8]}"
    done = await asyncio.gather(
        *(call(sidecar, "POST", "/accounts", {"id": new, "referral_code": code}) for _ in range(10))
    )
    assert sorted(s for s, _ in done) == [201] + [409] * 9
    assert [u for c, u, _ in await codes_in_db(sidecar, owner) if c == code] == [1]


@pytest.mark.parametrize("bad", ["STR-NOPE0000", "", "x" * 101, "nul\x00", "ünï"])
async def test_an_unknown_code_creates_nothing(sidecar: Sidecar, bad: str) -> None:
    new = f"ref-{uuid.uuid4().hex[:8]}"
    status, body = await call(sidecar, "POST", "/accounts", {"id": new, "referral_code": bad})
    assert (status, body["error"]["type"], body["error"]["param"]) == (
        400,
        "invalid_request_error",
        "referral_code",
    )
    assert await account_rows(sidecar, new) == 0
    assert (await call(sidecar, "GET", f"/accounts/{new}"))[0] == 404
    assert not await sidecar.services.accounts.exists(new)


async def test_a_used_up_code_is_refused_atomically(make_sidecar: SidecarFactory) -> None:
    sc = await make_sidecar(referral_code_max_uses=3)
    owner, code = await referrer(sc)
    assert {limit for _, _, limit in await codes_in_db(sc, owner)} == {3}
    names = [f"ref-{i}-{uuid.uuid4().hex[:6]}" for i in range(12)]
    done = await asyncio.gather(
        *(call(sc, "POST", "/accounts", {"id": n, "referral_code": code}) for n in names)
    )
    made = [n for n, (status, _) in zip(names, done, strict=True) if status == 201]
    refused = [(s, b["error"]["param"], b["error"]["code"]) for s, b in done if s != 201]
    assert len(made) == 3
    assert set(refused) == {(409, "referral_code", "referral_code_used_up")}
    assert len(refused) == 9
    assert [u for c, u, _ in await codes_in_db(sc, owner) if c == code] == [3]
    for name in names:  # a refused create left nothing behind: no account, no codes, no link
        assert await account_rows(sc, name) == (1 if name in made else 0)
    linked = await sc.services.store.pool.fetch("SELECT account_id FROM referrals WHERE code = $1", code)
    assert sorted(r[0] for r in linked) == sorted(made)
    assert (await call(sc, "GET", f"/accounts/{owner}/referrals"))[1]["referred_accounts"] == 3


async def test_an_account_cannot_refer_itself(sidecar: Sidecar) -> None:
    owner, code = await referrer(sidecar)
    status, body = await call(sidecar, "POST", "/accounts", {"id": owner, "referral_code": code})
    assert (status, body["error"]["param"], body["error"]["code"]) == (400, "referral_code", "self_referral")
    assert await sidecar.services.admin.referrals.referral_of(owner) is None
    assert {u for _, u, _ in await codes_in_db(sidecar, owner)} == {0}
    # An existing account is never linked afterwards, whoever's code a create names.
    other, other_code = await referrer(sidecar)
    status, _ = await call(sidecar, "POST", "/accounts", {"id": owner, "referral_code": other_code})
    assert status == 409
    assert await sidecar.services.admin.referrals.referral_of(owner) is None
    assert {u for _, u, _ in await codes_in_db(sidecar, other)} == {0}


async def bonus_grants(sc: Sidecar, account: str) -> list[tuple[str, int]]:
    rows = await sc.services.store.pool.fetch(
        "SELECT grant_id, amount FROM grants WHERE account_id = $1 AND kind = 'bonus'", account
    )
    return [(r[0], r[1]) for r in rows]


async def purchase(sc: Sidecar, account: str, credits: int) -> dict[str, Any]:
    order = await OrderStore(sc.services.store.pool).create(
        account, "manual", credits=credits, amount_minor=credits // 10_000, currency="usd"
    )
    landed: dict[str, Any] = await sc.client.app[PAYMENTS].land(order, f"ref-{order.order_id}")
    return landed


@pytest.mark.topologies
async def test_the_first_purchase_earns_the_referrer_one_bonus(sidecar: Sidecar) -> None:
    owner, code = await referrer(sidecar)
    new = f"ref-{uuid.uuid4().hex[:8]}"
    await sidecar.admin("POST", "/accounts", {"id": new, "referral_code": code})
    await purchase(sidecar, new, 100 * C)
    assert await bonus_grants(sidecar, owner) == [(f"referral:{new}", 25 * C)]
    assert (await sidecar.balance(owner))["balance"] == 25 * C
    assert (await sidecar.balance(new))["balance"] == 100 * C  # the referred account gets no bonus
    link = await sidecar.services.admin.referrals.referral_of(new)
    assert link is not None
    assert link.rewarded_at is not None
    # A second purchase earns nothing more; neither does the hook run again, 20 times at once.
    await purchase(sidecar, new, 50 * C)
    ops = sidecar.client.app[PAYMENTS].ops
    assert not any(await asyncio.gather(*(reward_referrer(ops, new) for _ in range(20))))
    assert await bonus_grants(sidecar, owner) == [(f"referral:{new}", 25 * C)]
    assert (await sidecar.balance(owner))["balance"] == 25 * C
    view = (await call(sidecar, "GET", f"/accounts/{owner}/referrals"))[1]
    assert (view["referred_accounts"], view["rewarded_accounts"]) == (1, 1)
    assert (view["bonus_earned"], view["bonus_earned_credits"]) == (25 * C, "25")


@pytest.mark.topologies
async def test_the_hook_run_at_once_many_times_grants_one_bonus(sidecar: Sidecar) -> None:
    owner, code = await referrer(sidecar)
    new = f"ref-{uuid.uuid4().hex[:8]}"
    await sidecar.admin("POST", "/accounts", {"id": new, "referral_code": code})
    ops = sidecar.client.app[PAYMENTS].ops
    credited = await asyncio.gather(*(reward_referrer(ops, new) for _ in range(20)))
    assert sum(credited) == 1
    assert await bonus_grants(sidecar, owner) == [(f"referral:{new}", 25 * C)]
    assert (await sidecar.balance(owner))["balance"] == 25 * C
    # A crash between the grant and the mark: the next run marks it and credits nothing.
    await sidecar.services.store.pool.execute(
        "UPDATE referrals SET rewarded_at = NULL WHERE account_id = $1", new
    )
    assert await reward_referrer(ops, new) is False
    assert (await sidecar.balance(owner))["balance"] == 25 * C


async def test_a_purchase_without_a_referrer_earns_nobody_anything(sidecar: Sidecar) -> None:
    owner, _ = await referrer(sidecar)
    alone, _ = await sidecar.account(0)
    await purchase(sidecar, alone, 10 * C)
    assert await bonus_grants(sidecar, owner) == []
    assert await bonus_grants(sidecar, alone) == []
    assert await sidecar.services.store.pool.fetchval("SELECT count(*) FROM grants WHERE kind = 'bonus'") == 0


async def test_no_bonus_setting_marks_the_referral_without_a_grant(make_sidecar: SidecarFactory) -> None:
    sc = await make_sidecar(referral_bonus_credits="0", referral_codes_per_account=1)
    owner, code = await referrer(sc)
    assert len(await codes_in_db(sc, owner)) == 1
    new = f"ref-{uuid.uuid4().hex[:8]}"
    await sc.admin("POST", "/accounts", {"id": new, "referral_code": code})
    await purchase(sc, new, 10 * C)
    assert await bonus_grants(sc, owner) == []
    link = await sc.services.admin.referrals.referral_of(new)
    assert link is not None
    assert link.rewarded_at is not None


@pytest.mark.parametrize(
    ("variable", "value", "named"),
    [
        ("CREDITGATE_REFERRAL_BONUS_CREDITS", "lots", "referral_bonus_credits"),
        ("CREDITGATE_REFERRAL_BONUS_CREDITS", "0.0000001", "referral_bonus_credits"),
        ("CREDITGATE_REFERRAL_BONUS_CREDITS", "-1", "referral_bonus_credits"),
        ("CREDITGATE_REFERRAL_CODE_PREFIX", "has space", "referral_code_prefix"),
    ],
)
def test_a_bad_referral_setting_is_named(variable: str, value: str, named: str) -> None:
    with pytest.raises(ConfigError) as refused:
        load_settings(environ={variable: value})
    assert refused.value.param == named


async def test_the_cli_creates_an_account_with_a_code(
    redis_url: str, database_url: str, make_sidecar: SidecarFactory, tmp_path: Path
) -> None:
    prefix = new_key_prefix()
    env = clean_env(
        CREDITGATE_REDIS_URL=redis_url, CREDITGATE_DATABASE_URL=database_url, CREDITGATE_KEY_PREFIX=prefix
    )

    async def cli(*args: str) -> tuple[int, Any]:
        done = await asyncio.to_thread(creditgate, env, *args, cwd=tmp_path)
        return done.returncode, json.loads(done.stdout if done.returncode == 0 else done.stderr)

    owner = f"cli-{uuid.uuid4().hex[:8]}"
    assert await cli("account", "create", owner) == (0, {"id": owner})
    sc = await make_sidecar(key_prefix=prefix)
    code = (await codes_in_db(sc, owner))[0][0]
    new = f"cli-{uuid.uuid4().hex[:8]}"
    assert await cli("account", "create", new, "--referral-code", code) == (0, {"id": new})
    link = await sc.services.admin.referrals.referral_of(new)
    assert link is not None
    assert link.referrer == owner
    status, refused = await cli("account", "create", "cli-nobody", "--referral-code", "STR-NOPE0000")
    assert (status, refused["error"]["param"]) == (1, "referral_code")
    assert await account_rows(sc, "cli-nobody") == 0
