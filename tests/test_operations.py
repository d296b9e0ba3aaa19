"""Operations beyond tokens over real HTTP, on one Redis and on the cluster, with the ledger in Postgres:
a hold of the worst case through the request path's reserve (its 402s and spend caps), once per
idempotency key; a settle of the actual units charged once, the rest released, one ledger row; a release;
the reaper releasing a lease that ran out on a controlled clock; estimates; bad input named."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from sidecar.app import SERVICES
from sidecar.config import load_settings
from sidecar.errors import ConfigError
from sidecar.metering.operation_api import OPERATIONS
from sidecar.metering.operation_holds import hold_id_of

from .conftest import Sidecar, SidecarFactory, clean_env
from .support_wallet import T0, Clock

pytestmark = pytest.mark.topologies

JUDGE = {"unit_price": 1_000, "per_run": 500, "unit": "evaluation", "max_units": 100}
OPTIMISE = {"unit_price": 7, "unit": "iteration", "lease_seconds": 60}
OPERATIONS_TABLE = {"judge": JUDGE, "optimise": OPTIMISE}
LEASE_MS = 60_000


@pytest.fixture
async def sc(make_sidecar: SidecarFactory) -> Sidecar:
    return await make_sidecar(operations=OPERATIONS_TABLE, flusher_enabled=False)


async def call(sc: Sidecar, path: str, key: str, body: Any = None, method: str = "POST") -> tuple[int, Any]:
    resp = await sc.client.request(method, path, json=body, headers={"Authorization": f"Bearer {key}"})
    return resp.status, await resp.json()


async def hold(sc: Sidecar, key: str, units: int, idem: str = "k1", operation: str = "judge") -> Any:
    status, body = await call(
        sc, "/v1/holds", key, {"operation": operation, "units": units, "idempotency_key": idem}
    )
    assert status == 200, body
    return body


async def ledger_rows(sc: Sidecar, account: str) -> list[Any]:
    await sc.client.app[SERVICES].flusher().drain()
    return list(
        await sc.services.store.pool.fetch(
            "SELECT idempotency_id, amount, route, model, hold, tags FROM ledger"
            " WHERE account_id = $1 AND kind = 'usage'",
            account,
        )
    )


async def test_a_settle_below_the_hold_charges_the_units_once_and_releases_the_rest(sc: Sidecar) -> None:
    account, key = await sc.account(100_000)
    held = await hold(sc, key, 10)
    assert (held["state"], held["amount"], held["units"], held["unit"]) == ("held", 10_500, 10, "evaluation")
    assert held["lease_end_ms"] is not None
    assert (await sc.balance(account))["held"] == 10_500
    path = f"/v1/holds/{held['id']}/settle"
    status, settled = await call(sc, path, key, {"units": 4})
    assert status == 200, settled
    assert (settled["state"], settled["settled_units"], settled["charged"]) == ("settled", 4, 4_500)
    assert settled["released"] == 10_500
    balance = await sc.balance(account)
    assert (balance["balance"], balance["held"]) == (95_500, 0)
    again = await asyncio.gather(*(call(sc, path, key, {"units": 4}) for _ in range(3)))
    assert list(again) == [(200, settled)] * 3  # the first result, nothing charged again
    status, other = await call(sc, path, key, {"units": 5})
    assert (status, other["error"]["param"]) == (409, "units")
    assert (await sc.balance(account))["balance"] == 95_500
    rows = await ledger_rows(sc, account)
    assert [(r["idempotency_id"], r["amount"], r["route"], r["model"], r["hold"]) for r in rows] == [
        (held["id"], -4_500, "operation", "judge", 10_500)
    ]
    assert set(rows[0]["tags"]) == {"operation=judge", "units=4", "unit=evaluation"}
    status, row = await call(
        sc, f"/v1/credits/requests/{held['id']}", key, method="GET"
    )  # as statements show it
    assert (status, row["route"], row["model"], row["charge"]) == (200, "operation", "judge", 4_500), row
    assert "units=4" in row["tags"]


async def test_a_retried_post_is_the_same_hold_and_another_body_is_a_409(sc: Sidecar) -> None:
    account, key = await sc.account(100_000)
    body = {"operation": "judge", "units": 3, "idempotency_key": "same"}
    answers = await asyncio.gather(*(call(sc, "/v1/holds", key, body) for _ in range(8)))
    assert {status for status, _ in answers} == {200}
    assert len({a["id"] for _, a in answers}) == 1
    assert (await sc.balance(account))["held"] == 3_500  # held once
    status, conflict = await call(sc, "/v1/holds", key, {**body, "units": 4})
    assert (status, conflict["error"]["param"], conflict["error"]["code"]) == (
        409,
        "idempotency_key",
        "conflict",
    )
    status, conflict = await call(sc, "/v1/holds", key, {**body, "operation": "optimise"})
    assert status == 409
    other = await hold(sc, key, 3, idem="other")
    assert other["id"] != answers[0][1]["id"]
    assert (await sc.balance(account))["held"] == 7_000
    # settled, the same POST still answers the same hold, and holds nothing more
    await call(sc, f"/v1/holds/{other['id']}/settle", key, {"units": 3})
    again = await hold(sc, key, 3, idem="other")
    assert (again["id"], again["state"]) == (other["id"], "settled")
    assert (await sc.balance(account))["held"] == 3_500


async def test_402_when_the_balance_cannot_cover_the_worst_case(sc: Sidecar) -> None:
    account, key = await sc.account(10_000)
    resp = await sc.client.post(
        "/v1/holds",
        json={"operation": "judge", "units": 10, "idempotency_key": "big"},
        headers={"Authorization": f"Bearer {key}"},
    )
    error = (await resp.json())["error"]
    assert resp.status == 402
    assert (error["type"], error["code"]) == ("insufficient_quota", "insufficient_credits")
    assert (error["required"], error["available"]) == (10_500, 10_000)
    assert resp.headers["x-should-retry"] == "false"
    assert (await sc.balance(account))["held"] == 0
    status, view = await call(sc, "/v1/holds/" + _hold_id(account, "big"), key, method="GET")
    assert (status, view["state"]) == (200, "not_held")
    status, refused = await call(sc, "/v1/holds/" + _hold_id(account, "big") + "/settle", key, {"units": 1})
    assert (status, refused["error"]["code"]) == (409, "conflict")  # never taken: nothing to charge
    assert (await sc.balance(account))["balance"] == 10_000
    fits = await hold(sc, key, 9, idem="fits")  # 9_500 fits
    assert fits["amount"] == 9_500


def _hold_id(account: str, idempotency_key: str) -> str:
    return hold_id_of(account, idempotency_key)


async def test_spend_caps_apply_to_operation_holds(sc: Sidecar) -> None:
    account, key = await sc.account(1_000_000)
    k = sc.balances.keys.account(account)
    await sc.balances.redis.hset(k.caps, "model:judge|total", "6000")
    await hold(sc, key, 5, idem="a")  # 5_500 of 6_000
    status, body = await call(
        sc, "/v1/holds", key, {"operation": "judge", "units": 1, "idempotency_key": "b"}
    )
    assert status == 402
    assert body["error"]["code"] == "spend_cap_exceeded"
    assert body["error"]["cap"]["scope"] == "model:judge"
    assert (await sc.balance(account))["held"] == 5_500
    await hold(sc, key, 10, idem="c", operation="optimise")  # another operation: not that cap
    await sc.balances.redis.hset(k.caps, "account|day", "5000")  # 5_570 held already
    status, body = await call(
        sc, "/v1/holds", key, {"operation": "optimise", "units": 1, "idempotency_key": "d"}
    )
    assert (status, body["error"]["cap"]["period"]) == (402, "day")
    assert body["error"]["cap"]["resets_at"].endswith("T00:00:00Z")  # as a request's refusal says it


async def test_release_charges_nothing_once_and_a_settle_after_it_is_refused(sc: Sidecar) -> None:
    account, key = await sc.account(100_000)
    held = await hold(sc, key, 10)
    path = f"/v1/holds/{held['id']}"
    status, released = await call(sc, path + "/release", key)
    assert (status, released["state"], released["charged"], released["released"]) == (
        200,
        "released",
        0,
        10_500,
    )
    assert await call(sc, path + "/release", key) == (200, released)
    status, refused = await call(sc, path + "/settle", key, {"units": 1})
    assert (status, refused["error"]["code"]) == (409, "conflict")
    balance = await sc.balance(account)
    assert (balance["balance"], balance["held"]) == (100_000, 0)
    assert await call(sc, path, key, method="GET") == (200, released)
    assert await ledger_rows(sc, account) == []


async def test_the_reaper_releases_an_expired_lease_and_a_late_settle_still_charges_once(sc: Sidecar) -> None:
    clock = Clock()
    sc.client.app[OPERATIONS].ops.clock = clock  # the leases' clock; the reaper is given its `now`
    account, key = await sc.account(100_000)
    held = await hold(sc, key, 100, operation="optimise")
    assert held["lease_end_ms"] == T0 + LEASE_MS
    clock.now += 30_000
    status, extended = await call(sc, f"/v1/holds/{held['id']}/extend", key)
    assert (status, extended["lease_end_ms"]) == (200, T0 + 30_000 + LEASE_MS)
    assert await sc.balances.expire_holds(T0 + LEASE_MS + 1) == 0  # renewed
    assert await sc.balances.expire_holds(T0 + 30_000 + LEASE_MS) == 700
    status, view = await call(sc, f"/v1/holds/{held['id']}", key, method="GET")
    assert (status, view["state"], view["lease_end_ms"]) == (200, "expired", None)
    assert (await sc.balance(account))["held"] == 0
    status, _ = await call(sc, f"/v1/holds/{held['id']}/extend", key)
    assert status == 409
    again = await hold(sc, key, 100, operation="optimise")  # a retried POST does not hold it anew
    assert (again["id"], again["state"]) == (held["id"], "expired")
    assert (await sc.balance(account))["held"] == 0
    # documented: a settle after the reaper still charges, once (released: nothing was left to release)
    for _ in range(2):
        status, settled = await call(sc, f"/v1/holds/{held['id']}/settle", key, {"units": 60})
        assert (status, settled["charged"], settled["released"]) == (200, 420, 0)
    assert (await sc.balance(account))["balance"] == 100_000 - 420
    assert [r["amount"] for r in await ledger_rows(sc, account)] == [-420]


async def test_another_accounts_hold_is_not_found(sc: Sidecar) -> None:
    _, key = await sc.account(100_000)
    _, intruder = await sc.account(100_000)
    held = await hold(sc, key, 2)
    for path, method, body in (
        ("", "GET", None),
        ("/settle", "POST", {"units": 1}),
        ("/release", "POST", None),
        ("/extend", "POST", None),
    ):
        status, error = await call(sc, f"/v1/holds/{held['id']}{path}", intruder, body, method)
        assert (status, error["error"]["code"]) == (404, "not_found"), path
    status, view = await call(sc, f"/v1/holds/{held['id']}", key, method="GET")
    assert view["state"] == "held"
    status, _ = await call(sc, "/v1/holds/op_nothing", key, method="GET")
    assert status == 404
    status, _ = await call(sc, f"/v1/holds/{held['id']}", "sk-not-a-key", method="GET")
    assert status == 401


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"operation": "nope", "units": 1, "idempotency_key": "x"}, "operation"),
        ({"operation": "judge", "units": 0, "idempotency_key": "x"}, "units"),
        ({"operation": "judge", "units": -3, "idempotency_key": "x"}, "units"),
        ({"operation": "judge", "units": 101, "idempotency_key": "x"}, "units"),
        ({"operation": "judge", "units": 1.5, "idempotency_key": "x"}, "units"),
        ({"operation": "judge", "units": "2", "idempotency_key": "x"}, "units"),
        ({"operation": "judge", "units": True, "idempotency_key": "x"}, "units"),
        ({"operation": "judge", "units": 1}, "idempotency_key"),
        ({"operation": "judge", "units": 1, "idempotency_key": ""}, "idempotency_key"),
        ({"units": 1, "idempotency_key": "x"}, "operation"),
        ({"operation": "judge", "units": 1, "idempotency_key": "x", "extra": 1}, "extra"),
    ],
)
async def test_bad_input_is_a_400_naming_the_field_and_holds_nothing(
    sc: Sidecar, body: dict[str, Any], param: str
) -> None:
    account, key = await sc.account(100_000)
    status, error = await call(sc, "/v1/holds", key, body)
    assert (status, error["error"]["param"], error["error"]["type"]) == (400, param, "invalid_request_error")
    assert (await sc.balance(account))["held"] == 0


async def test_a_settle_above_the_units_held_is_a_400(sc: Sidecar) -> None:
    account, key = await sc.account(100_000)
    held = await hold(sc, key, 3)
    for body in ({"units": 4}, {"units": -1}, {"units": 1.0}, {}):
        status, error = await call(sc, f"/v1/holds/{held['id']}/settle", key, body)
        assert (status, error["error"]["param"]) == (400, "units"), body
    assert (await sc.balance(account))["held"] == 3_500  # still held, nothing charged
    status, settled = await call(sc, f"/v1/holds/{held['id']}/settle", key, {"units": 3})
    assert (status, settled["charged"]) == (200, 3_500)  # a settle of every unit held


async def test_estimate_prices_an_operation_without_holding(sc: Sidecar) -> None:
    account, key = await sc.account(10_000)
    status, est = await call(sc, "/v1/credits/estimate", key, {"operation": "judge", "units": 9})
    assert status == 200, est
    assert (est["operation"], est["units"], est["hold"], est["available"], est["fits"]) == (
        "judge",
        9,
        9_500,
        10_000,
        True,
    )
    status, est = await call(sc, "/v1/credits/estimate", key, {"operation": "judge", "units": 10})
    assert (est["hold"], est["fits"]) == (10_500, False)
    status, error = await call(sc, "/v1/credits/estimate", key, {"operation": "nope", "units": 1})
    assert (status, error["error"]["param"]) == (400, "operation")
    status, error = await call(sc, "/v1/credits/estimate", key, {"operation": "judge", "units": 0})
    assert (status, error["error"]["param"]) == (400, "units")
    assert (await sc.balance(account))["held"] == 0


@pytest.mark.parametrize(
    ("table", "setting"),
    [
        ({"judge": {"unit_price": "ten"}}, "operations.judge.unit_price"),
        ({"judge": {"unit_price": 1.5}}, "operations.judge.unit_price"),
        ({"judge": {"unit_price": -1}}, "operations.judge.unit_price"),
        ({"judge": {"unit_price": 1, "per_run": -1}}, "operations.judge.per_run"),
        ({"judge": {"unit_price": 1, "max_units": 0}}, "operations.judge.max_units"),
        ({"judge": {"per_run": 1}}, "operations.judge.unit_price"),
        ({"judge": {"unit_price": 1, "colour": "red"}}, "operations.judge.colour"),
        ({"judge": {"unit_price": 10**12, "max_units": 10**6}}, "operations.judge.max_units"),
        ({"judge": {"unit_price": 1, "unit": "two words"}}, "operations.judge.unit"),
        ({"a b": {"unit_price": 1}}, "operations.a b"),
    ],
)
def test_operation_settings_are_checked_naming_the_setting(table: dict[str, Any], setting: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_settings(environ=clean_env(), overrides={"operations": table})
    assert err.value.param == setting, err.value.message


def test_operation_settings_load_from_the_environment() -> None:
    env = clean_env(CREDITGATE_OPERATIONS='{"judge": {"unit_price": 1000, "per_run": 5, "unit": "run"}}')
    settings = load_settings(environ=env)
    judge = settings.operations["judge"]
    assert (judge.unit_price, judge.per_run, judge.unit, judge.max_units, judge.cost(3)) == (
        1000,
        5,
        "run",
        1000,
        3005,
    )
