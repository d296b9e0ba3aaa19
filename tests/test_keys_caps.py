"""Key management, spend-cap configuration, the account time zone and estimates, over real HTTP: a client
sees and changes only its own account, the admin any; bad input is a 400 naming the field, changing
nothing; expiry is enforced at authentication, also through the auth cache."""

from __future__ import annotations

import datetime as dt
from typing import Any

import msgspec
import pytest

from sidecar.caps import restore_caps
from sidecar.keys_api import restore_key_expiries

from .conftest import Sidecar, SidecarFactory
from .support import HELLO, MODELS, hold_for, post

pytestmark = pytest.mark.topologies


@pytest.fixture
async def sc(make_sidecar: SidecarFactory) -> Sidecar:
    return await make_sidecar(models=MODELS)


async def client(sc: Sidecar, method: str, path: str, key: str, json: Any = None) -> tuple[int, Any]:
    resp = await sc.client.request(
        method, f"/v1/credits{path}", json=json, headers={"Authorization": f"Bearer {key}"}
    )
    return resp.status, await resp.json()


async def admin(sc: Sidecar, method: str, path: str, json: Any = None) -> tuple[int, Any]:
    resp = await sc.client.request(method, f"/admin{path}", json=json, headers=sc.admin_headers())
    return resp.status, await resp.json()


async def caps_hash(sc: Sidecar, account: str) -> dict[str, str]:
    raw: dict[bytes, bytes] = await sc.services.redis.hgetall(sc.services.keys.account(account).caps)  # type: ignore[assignment]
    return {k.decode(): v.decode() for k, v in raw.items()}


def iso(days: float) -> str:
    return (dt.datetime.now(dt.UTC) + dt.timedelta(days=days)).isoformat()


# ---- keys -----------------------------------------------------------------------------------------


async def test_key_created_with_name_and_expiry_is_listed(sc: Sidecar) -> None:
    account, first = await sc.account(1_000_000)
    status, made = await admin(sc, "POST", f"/accounts/{account}/keys", {"name": "ci", "expires_at": iso(3)})
    assert status == 201, made
    assert made["key"].startswith(made["prefix"])
    assert len(made["prefix"]) == 12
    status, listed = await client(sc, "GET", "/keys", first)
    assert status == 200, listed
    by_id = {k["id"]: k for k in listed["data"]}
    assert by_id[made["id"]]["name"] == "ci"
    assert by_id[made["id"]]["prefix"] == made["prefix"]
    assert by_id[made["id"]]["expires_at"] is not None
    assert by_id[made["id"]]["revoked"] is False
    assert len(by_id) == 2
    # the key that called was used just now: its last use is known; the other's is not
    assert {k["id"]: k["last_used_at"] is not None for k in listed["data"]}[made["id"]] is False
    assert sum(k["last_used_at"] is not None for k in listed["data"]) == 1
    assert all(made["key"] not in str(v) for v in listed["data"])  # never the secret
    status, same = await admin(sc, "GET", f"/accounts/{account}/keys")
    assert status == 200
    assert {k["id"] for k in same["data"]} == set(by_id)


async def test_expired_key_is_refused_even_when_cached(make_sidecar: SidecarFactory) -> None:
    sc = await make_sidecar(models=MODELS, auth_cache_seconds=300)
    account, key = await sc.account(1_000_000)
    status, _ = await client(sc, "GET", "/keys", key)
    assert status == 200  # now cached for 300 s
    key_id = (await admin(sc, "GET", f"/accounts/{account}/keys"))[1]["data"][0]["id"]
    past = (dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1)).isoformat()
    status, body = await admin(sc, "PATCH", f"/keys/{key_id}", {"expires_at": past})
    assert status == 200, body
    assert body["expired"] is True
    status, body = await client(sc, "GET", "/keys", key)
    assert status == 401, body
    resp = await post(sc, "/v1/chat/completions", {"model": "test-model", "messages": HELLO}, key)
    assert resp.status == 401
    status, body = await admin(sc, "PATCH", f"/keys/{key_id}", {"expires_at": None})  # never again
    assert status == 200
    assert (await client(sc, "GET", "/keys", key))[0] == 200


async def test_client_renames_its_own_key_only(sc: Sidecar) -> None:
    _, key = await sc.account(1_000_000)
    _, other_key = await sc.account(1_000_000)
    mine = (await client(sc, "GET", "/keys", key))[1]["data"][0]["id"]
    theirs = (await client(sc, "GET", "/keys", other_key))[1]["data"][0]["id"]
    status, body = await client(sc, "PATCH", f"/keys/{mine}", key, {"name": "prod"})
    assert status == 200, body
    assert body["name"] == "prod"
    status, body = await client(sc, "PATCH", f"/keys/{theirs}", key, {"name": "mine now"})
    assert status == 404
    assert body["error"]["param"] == "key_id"
    assert (await client(sc, "GET", "/keys", other_key))[1]["data"][0]["name"] is None


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"name": ""}, "name"),
        ({"name": "x" * 101}, "name"),
        ({"expires_at": "tomorrow"}, "expires_at"),
        ({"expires_at": "2030-01-01T00:00:00"}, "expires_at"),  # no zone
        ({"colour": "red"}, "colour"),
    ],
)
async def test_bad_key_changes_are_400s_changing_nothing(sc: Sidecar, body: Any, param: str) -> None:
    _, key = await sc.account(1_000_000)
    before = (await client(sc, "GET", "/keys", key))[1]["data"][0]
    status, answer = await client(sc, "PATCH", f"/keys/{before['id']}", key, body)
    assert status == 400, answer
    assert answer["error"]["param"] == param
    after = (await client(sc, "GET", "/keys", key))[1]["data"][0]
    assert (after["name"], after["expires_at"]) == (before["name"], before["expires_at"])


async def test_key_created_with_a_past_expiry_is_refused(sc: Sidecar) -> None:
    account, key = await sc.account(1_000_000)
    status, body = await admin(sc, "POST", f"/accounts/{account}/keys", {"expires_at": iso(-1)})
    assert status == 400
    assert body["error"]["param"] == "expires_at"
    assert len((await client(sc, "GET", "/keys", key))[1]["data"]) == 1


async def test_revoked_key_listed_with_its_last_use(sc: Sidecar) -> None:
    account, key = await sc.account(1_000_000)
    await client(sc, "GET", "/keys", key)
    key_id = (await admin(sc, "GET", f"/accounts/{account}/keys"))[1]["data"][0]["id"]
    assert (await admin(sc, "DELETE", f"/keys/{key_id}"))[0] == 200
    (row,) = (await admin(sc, "GET", f"/accounts/{account}/keys"))[1]["data"]
    assert row["revoked"] is True
    assert row["last_used_at"] is not None


# ---- caps -----------------------------------------------------------------------------------------


async def test_caps_set_listed_and_deleted_postgres_then_redis(sc: Sidecar) -> None:
    account, key = await sc.account(1_000_000)
    key_id = (await client(sc, "GET", "/keys", key))[1]["data"][0]["id"]
    sets = [
        {"scope": "account", "period": "month", "limit_credits": "12.5"},
        {"scope": f"key:{key_id}", "period": "day", "limit": 1000},
        {"scope": "model:tm", "period": "total", "limit": 0},  # an alias: stored as its model
        {"scope": "user:alice", "period": "day", "limit": 5},
        {"scope": "user:*", "period": "day", "limit": 7},
    ]
    for body in sets[:3]:
        status, answer = await admin(sc, "PUT", f"/accounts/{account}/caps", body)
        assert status == 200, answer
    for body in sets[3:]:
        status, answer = await client(sc, "PUT", "/caps", key, body)
        assert status == 200, answer
    assert await caps_hash(sc, account) == {
        "account|month": "12500000",
        f"key:{key_id}|day": "1000",
        "model:test-model|total": "0",
        "user:alice|day": "5",
        "user:*|day": "7",
    }
    status, listed = await client(sc, "GET", "/caps", key)
    assert status == 200
    assert len(listed["caps"]) == 5
    assert {c["scope"] for c in listed["caps"]} >= {"model:test-model", "account"}
    keys = (await client(sc, "GET", "/keys", key))[1]["data"]
    assert keys[0]["caps"] == [{"period": "day", "limit": 1000}]
    resp = await sc.client.delete(
        "/v1/credits/caps",
        params={"scope": "user:alice", "period": "day"},
        headers={"Authorization": f"Bearer {key}"},
    )
    assert (await resp.json())["deleted"] is True
    status, again = await admin(
        sc, "DELETE", f"/accounts/{account}/caps", {"scope": "user:alice", "period": "day"}
    )
    assert (status, again["deleted"]) == (200, False)  # idempotent
    assert "user:alice|day" not in await caps_hash(sc, account)
    assert len((await admin(sc, "GET", f"/accounts/{account}/caps"))[1]["caps"]) == 4


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"scope": "team:x", "period": "day", "limit": 1}, "scope"),
        ({"scope": "model:nope", "period": "day", "limit": 1}, "scope"),
        ({"scope": "user:", "period": "day", "limit": 1}, "scope"),
        ({"scope": "user:" + "u" * 257, "period": "day", "limit": 1}, "scope"),
        ({"scope": "account", "period": "week", "limit": 1}, "period"),
        ({"scope": "account", "period": "day", "limit": -1}, "limit"),
        ({"scope": "account", "period": "day"}, "limit"),
        ({"scope": "account", "period": "day", "limit": 1, "limit_credits": "1"}, "limit"),
        ({"scope": "account", "period": "day", "limit_credits": "0.0000001"}, "limit_credits"),
        ({"scope": "account", "period": "day", "limit_credits": "lots"}, "limit_credits"),
        ({"scope": "account", "period": "day", "limit": "5"}, "limit"),
        ({"scope": "account", "period": "day", "limit": 2**60}, "limit"),
    ],
)
async def test_bad_caps_are_400s_changing_nothing(sc: Sidecar, body: Any, param: str) -> None:
    account, key = await sc.account(1_000_000)
    status, answer = await client(sc, "PUT", "/caps", key, body)
    assert status == 400, answer
    assert answer["error"]["param"] == param
    assert await caps_hash(sc, account) == {}
    assert (await client(sc, "GET", "/caps", key))[1]["caps"] == []


async def test_a_key_scope_must_be_the_accounts_own(sc: Sidecar) -> None:
    account, key = await sc.account(1_000_000)
    _, other_key = await sc.account(1_000_000)
    theirs = (await client(sc, "GET", "/keys", other_key))[1]["data"][0]["id"]
    body = {"scope": f"key:{theirs}", "period": "day", "limit": 1}
    status, answer = await client(sc, "PUT", "/caps", key, body)
    assert status == 404
    assert answer["error"]["param"] == "scope"
    assert (await admin(sc, "PUT", f"/accounts/{account}/caps", body))[0] == 404
    assert await caps_hash(sc, account) == {}


async def test_time_zone_set_validated_and_cleared(sc: Sidecar) -> None:
    account, key = await sc.account(1_000_000)
    status, body = await client(sc, "PUT", "/time-zone", key, {"time_zone": "Europe/Berlin"})
    assert (status, body["time_zone"]) == (200, "Europe/Berlin")
    assert (await caps_hash(sc, account))["tz"] == "Europe/Berlin"
    for bad in ("Mars/Olympus", "../etc/passwd", "", "/usr/share/zoneinfo/UTC"):
        status, body = await admin(sc, "PUT", f"/accounts/{account}/time-zone", {"time_zone": bad})
        assert (status, body["error"]["param"]) == (400, "time_zone")
    assert (await admin(sc, "GET", f"/accounts/{account}/time-zone"))[1]["time_zone"] == "Europe/Berlin"
    status, body = await admin(sc, "PUT", f"/accounts/{account}/time-zone", {"time_zone": "UTC"})
    assert (status, body["time_zone"]) == (200, "UTC")
    assert "tz" not in await caps_hash(sc, account)
    assert (await admin(sc, "PUT", "/accounts/nobody/time-zone", {"time_zone": "UTC"}))[0] == 404


async def test_restore_caps_writes_redis_from_postgres(sc: Sidecar) -> None:
    account, key = await sc.account(1_000_000)
    await client(sc, "PUT", "/caps", key, {"scope": "account", "period": "day", "limit": 9})
    await client(sc, "PUT", "/time-zone", key, {"time_zone": "Asia/Tokyo"})
    svc = sc.services
    caps_key = svc.keys.account(account).caps
    await svc.redis.delete(caps_key)
    await svc.redis.hset(caps_key, "model:gone|day", "1")  # not in Postgres: removed
    assert await restore_caps(svc.redis, svc.keys, svc.store, None) >= 1
    assert await caps_hash(sc, account) == {"account|day": "9", "tz": "Asia/Tokyo"}
    await svc.redis.delete(caps_key)
    assert await restore_caps(svc.redis, svc.keys, svc.store, account) == 1
    assert await caps_hash(sc, account) == {"account|day": "9", "tz": "Asia/Tokyo"}


# ---- estimate -------------------------------------------------------------------------------------


async def test_estimate_gives_the_hold_and_whether_it_fits(sc: Sidecar, upstream: Any) -> None:
    request = {"model": "test-model", "messages": HELLO, "max_tokens": 10}

    raw = msgspec.json.encode(request)
    hold = hold_for(raw, limit=10)
    account, key = await sc.account(hold)
    resp = await sc.client.post("/v1/credits/estimate", data=raw, headers={"Authorization": f"Bearer {key}"})
    body = await resp.json()
    assert resp.status == 200, body
    assert (body["hold"], body["available"], body["fits"]) == (hold, hold, True)
    assert body["hold_credits"]
    bigger = msgspec.json.encode({**request, "max_tokens": 11})
    resp = await sc.client.post(
        "/v1/credits/estimate", data=bigger, headers={"Authorization": f"Bearer {key}"}
    )
    assert (await resp.json())["fits"] is False
    assert upstream.calls() == 0
    state = await sc.balance(account)
    assert (state["balance"], state["held"]) == (hold, 0)


@pytest.mark.parametrize(
    ("query", "body", "param"),
    [
        ("", b'{"messages": []}', "model"),
        ("", b'{"model": "nope", "messages": []}', "model"),
        ("?route=images", b'{"model": "test-model"}', "route"),
        ("", b'{"model": "test-model", "messages": [], "max_tokens": 101}', "max_tokens"),
    ],
)
async def test_bad_estimates_are_400s(sc: Sidecar, query: str, body: bytes, param: str) -> None:
    account, key = await sc.account(1_000)
    resp = await sc.client.post(
        f"/v1/credits/estimate{query}", data=body, headers={"Authorization": f"Bearer {key}"}
    )
    answer = await resp.json()
    assert resp.status == 400, answer
    assert answer["error"]["param"] == param
    assert (await sc.balance(account))["held"] == 0


async def test_credit_endpoints_need_a_key(sc: Sidecar) -> None:
    for method, path in (("GET", "/keys"), ("GET", "/caps"), ("POST", "/estimate"), ("PUT", "/time-zone")):
        resp = await sc.client.request(method, f"/v1/credits{path}")
        assert resp.status == 401, path


async def test_last_use_is_written_at_most_once_a_minute(sc: Sidecar) -> None:
    account, key = await sc.account(1_000_000)
    svc = sc.services
    (row,) = await svc.store.pool.fetch("SELECT key_hash FROM api_keys WHERE account_id = $1", account)
    record = svc.keys.api_key(row["key_hash"])
    assert await svc.redis.hget(record, "used_ms") is None
    assert (await client(sc, "GET", "/keys", key))[0] == 200
    first = int(await svc.redis.hget(record, "used_ms") or 0)
    assert first > 0
    recent = first - 30_000  # used half a minute ago: not written again
    await svc.redis.hset(record, "used_ms", recent)
    await client(sc, "GET", "/keys", key)
    assert int(await svc.redis.hget(record, "used_ms") or 0) == recent
    await svc.redis.hset(record, "used_ms", first - 61_000)  # over a minute ago: written
    await client(sc, "GET", "/keys", key)
    assert int(await svc.redis.hget(record, "used_ms") or 0) >= first


async def test_key_expiries_restored_from_postgres(sc: Sidecar) -> None:
    """After Redis lost a key's record's expiry (a rebuild writes records without it), the restore puts it
    back and the expired key is refused again."""
    account, key = await sc.account(1_000_000)
    svc = sc.services
    (row,) = await svc.store.pool.fetch("SELECT id, key_hash FROM api_keys WHERE account_id = $1", account)
    past = (dt.datetime.now(dt.UTC) - dt.timedelta(minutes=1)).isoformat()
    assert (await admin(sc, "PATCH", f"/keys/{row['id']}", {"expires_at": past}))[0] == 200
    assert (await client(sc, "GET", "/keys", key))[0] == 401
    await svc.redis.hdel(svc.keys.api_key(row["key_hash"]), "expires_ms")
    assert (await client(sc, "GET", "/keys", key))[0] == 200  # what a rebuild without it would do
    assert await restore_key_expiries(svc.redis, svc.keys, svc.store) == 1
    assert (await client(sc, "GET", "/keys", key))[0] == 401
