"""The BYOK vault over real HTTP, with Redis and Postgres: a customer stores, lists, replaces and deletes
its provider keys (sealed in Postgres and in Redis, never in plain text; listings show the last four
characters only); its requests to that provider go out with the stored key at the BYOK multiplier, the
inline header still wins, other accounts and other providers use the pool, a delete brings the pool back;
this process's writes take effect at once through the cache, other processes' within
auth_cache_seconds (a controlled clock); a key that does not open is a 503, never the pooled key; the key
never reaches a log line, a response or the metrics; startup refuses a wrong or missing master key; the
rebuild restores the mirror."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import asyncpg
import msgspec
import pytest

from sidecar.app import create_app
from sidecar.errors import ConfigError
from sidecar.rebuild import rebuild_if_empty
from sidecar.vault.api import VAULT
from sidecar.vault.crypto import KeyRing, associated_data
from sidecar.vault.mirror import mirror_record
from sidecar.vault.settings import key_ring
from sidecar.vault.store import Vault

from .conftest import PROVIDER_KEY, Sidecar, SidecarFactory, make_settings, new_key_prefix, process_env
from .support import creditgate
from .support_fake_provider import Answer, Fake
from .support_vault import (
    BYOK_CHARGE,
    EAST_POOL_KEY,
    INLINE_KEY,
    MASTER,
    NEW_MASTER,
    POOLED_CHARGE,
    START,
    VAULT_KEY,
    bearer,
    chat,
    sent_key,
    store_key,
    vault_sidecar,
)
from .support_vault import east as east  # the fixtures
from .support_vault import fake as fake

KEYS = "/v1/account/llm-keys"
VIEW_FIELDS = {"object", "id", "provider", "label", "last4", "created_at", "updated_at"}


async def listing(sc: Sidecar, api_key: str) -> list[Any]:
    resp = await sc.client.get(KEYS, headers=bearer(api_key))
    assert resp.status == 200
    body = await resp.json()
    assert body["object"] == "list"
    return list(body["data"])


async def rows(sc: Sidecar, account: str) -> list[Any]:
    return list(
        await sc.services.store.pool.fetch(
            "SELECT * FROM llm_keys WHERE account_id = $1 ORDER BY provider", account
        )
    )


async def mirror(sc: Sidecar, account: str) -> dict[Any, Any]:
    return dict(await sc.services.redis.hgetall(sc.services.keys.account(account).llm_keys))


async def test_a_key_is_stored_sealed_listed_replaced_and_deleted(
    make_sidecar: SidecarFactory, fake: Fake, east: Fake
) -> None:
    sc = await vault_sidecar(make_sidecar, fake, east)
    account, api_key = await sc.account(START)
    other, other_key = await sc.account(START)
    resp = await sc.client.post(
        KEYS, json={"provider": "default", "key": VAULT_KEY, "label": "prod"}, headers=bearer(api_key)
    )
    assert resp.status == 201
    raw = await resp.read()
    assert VAULT_KEY.encode() not in raw
    created = msgspec.json.decode(raw)
    assert set(created) == VIEW_FIELDS
    assert (created["provider"], created["label"], created["last4"]) == ("default", "prod", VAULT_KEY[-4:])
    assert created["id"].startswith("lk_")
    assert await listing(sc, api_key) == [created]
    assert await listing(sc, other_key) == []
    # Sealed in Postgres and in Redis: the plain key is in neither.
    (row,) = await rows(sc, account)
    assert row["master_key_id"] == "k1"
    assert len(row["nonce"]) == 12
    assert VAULT_KEY.encode() not in b"".join(
        str(v).encode() if not isinstance(v, bytes) else v for v in row.values()
    )
    stored = await mirror(sc, account)
    assert list(stored) == [b"default"]
    assert VAULT_KEY.encode() not in stored[b"default"]
    record = mirror_record(stored[b"default"])
    assert (record.id, record.kid, record.nonce, record.sealed) == (
        row["id"],
        "k1",
        row["nonce"],
        row["sealed"],
    )
    # A second POST for the provider replaces the key: the same record, a fresh nonce.
    replaced = await store_key(sc, api_key, "default", INLINE_KEY, label="rotated")
    assert replaced["id"] == created["id"]
    assert replaced["created_at"] == created["created_at"]
    assert (replaced["label"], replaced["last4"]) == ("rotated", INLINE_KEY[-4:])
    assert replaced["updated_at"] >= created["updated_at"]
    (again,) = await rows(sc, account)
    assert again["nonce"] != row["nonce"]
    assert again["sealed"] != row["sealed"]
    assert await sc.services.store.pool.fetchval("SELECT count(*) FROM llm_keys") == 1
    # Another account cannot delete it; the owner can, once.
    resp = await sc.client.delete(f"{KEYS}/{created['id']}", headers=bearer(other_key))
    assert resp.status == 404
    assert len(await rows(sc, account)) == 1
    resp = await sc.client.delete(f"{KEYS}/{created['id']}", headers=bearer(api_key))
    assert (resp.status, await resp.json()) == (
        200,
        {"object": "llm_key", "id": created["id"], "deleted": True},
    )
    assert await listing(sc, api_key) == []
    assert await rows(sc, account) == []
    assert await mirror(sc, account) == {}
    resp = await sc.client.delete(f"{KEYS}/{created['id']}", headers=bearer(api_key))
    assert resp.status == 404
    assert other  # (the other account's own listing stayed empty throughout)


async def test_the_operator_manages_any_accounts_keys(
    make_sidecar: SidecarFactory, fake: Fake, east: Fake
) -> None:
    sc = await vault_sidecar(make_sidecar, fake, east)
    account, api_key = await sc.account(START)
    created = await sc.admin("POST", f"/accounts/{account}/llm-keys", {"provider": "acme", "key": VAULT_KEY})
    assert set(created) == VIEW_FIELDS
    assert created["label"] is None
    assert await listing(sc, api_key) == [created]
    assert (await sc.admin("GET", f"/accounts/{account}/llm-keys"))["data"] == [created]
    await sc.admin("DELETE", f"/accounts/{account}/llm-keys/{created['id']}")
    assert await listing(sc, api_key) == []
    resp = await sc.client.post(
        "/admin/accounts/nobody/llm-keys",
        json={"provider": "acme", "key": VAULT_KEY},
        headers=sc.admin_headers(),
    )
    assert resp.status == 404
    assert (await resp.json())["error"]["param"] == "account"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"provider": "east", "key": VAULT_KEY}, "provider"),  # east's provider is acme
        ({"provider": "nobody", "key": VAULT_KEY}, "provider"),
        ({"provider": "default", "key": "short"}, "key"),
        ({"provider": "default", "key": VAULT_KEY + " with a space"}, "key"),
        ({"provider": "default", "key": VAULT_KEY + "\n"}, "key"),
        ({"provider": "default", "key": VAULT_KEY, "label": "a\x00b"}, "label"),
        ({"provider": "default", "key": VAULT_KEY, "label": "x" * 101}, "label"),
        ({"provider": "default"}, "key"),
        ({"provider": "default", "key": 12345678}, "key"),
        ({"provider": "default", "key": VAULT_KEY, "extra": 1}, "extra"),
    ],
    ids=[
        "upstream-name",
        "unknown",
        "short",
        "space",
        "newline",
        "nul-label",
        "long-label",
        "missing",
        "number",
        "unknown-field",
    ],
)
async def test_bad_input_is_named_never_quoted_and_stores_nothing(
    make_sidecar: SidecarFactory, fake: Fake, east: Fake, body: dict[str, Any], param: str
) -> None:
    sc = await vault_sidecar(make_sidecar, fake, east)
    account, api_key = await sc.account(START)
    resp = await sc.client.post(KEYS, json=body, headers=bearer(api_key))
    raw = await resp.read()
    assert resp.status == 400, raw
    assert msgspec.json.decode(raw)["error"]["param"] == param
    assert VAULT_KEY.encode() not in raw
    assert await rows(sc, account) == []


async def test_the_routes_need_a_client_key(make_sidecar: SidecarFactory, fake: Fake, east: Fake) -> None:
    sc = await vault_sidecar(make_sidecar, fake, east)
    for method in ("GET", "POST"):
        resp = await sc.client.request(method, KEYS, json={"provider": "default", "key": VAULT_KEY})
        assert resp.status == 401
    resp = await sc.client.delete(f"{KEYS}/lk_x", headers=bearer("cgk-not-a-key"))
    assert resp.status == 401


@pytest.mark.topologies
async def test_requests_to_that_provider_go_out_with_the_vault_key_at_the_byok_multiplier(
    make_sidecar: SidecarFactory, fake: Fake, east: Fake
) -> None:
    sc = await vault_sidecar(make_sidecar, fake, east)
    account, api_key = await sc.account(START)
    _, other_key = await sc.account(START)
    status, headers, _ = await chat(sc, api_key)
    assert (status, sent_key(fake), headers["x-creditgate-charged"]) == (
        200,
        PROVIDER_KEY,
        str(POOLED_CHARGE),
    )
    stored = await store_key(sc, api_key, "default", VAULT_KEY)
    status, headers, _body = await chat(sc, api_key)
    assert (status, sent_key(fake), headers["x-creditgate-charged"]) == (200, VAULT_KEY, str(BYOK_CHARGE))
    # The inline header wins over the vault.
    status, headers, _ = await chat(sc, api_key, **{"x-creditgate-provider-key": INLINE_KEY})
    assert (status, sent_key(fake), headers["x-creditgate-charged"]) == (200, INLINE_KEY, str(BYOK_CHARGE))
    # Another account uses the pool; so does this one on another provider's upstream, until it stores one.
    status, headers, _ = await chat(sc, other_key)
    assert (status, sent_key(fake), headers["x-creditgate-charged"]) == (
        200,
        PROVIDER_KEY,
        str(POOLED_CHARGE),
    )
    status, headers, _ = await chat(sc, api_key, "acme-model")
    assert (status, sent_key(east), headers["x-creditgate-charged"]) == (
        200,
        EAST_POOL_KEY,
        str(POOLED_CHARGE),
    )
    await store_key(sc, api_key, "acme", INLINE_KEY)
    status, headers, _ = await chat(sc, api_key, "acme-model")
    assert (status, sent_key(east), headers["x-creditgate-charged"]) == (200, INLINE_KEY, str(BYOK_CHARGE))
    # Deleted: the pool again.
    resp = await sc.client.delete(f"{KEYS}/{stored['id']}", headers=bearer(api_key))
    assert resp.status == 200
    status, headers, _ = await chat(sc, api_key)
    assert (status, sent_key(fake), headers["x-creditgate-charged"]) == (
        200,
        PROVIDER_KEY,
        str(POOLED_CHARGE),
    )
    # The usage rows carry where each key came from.
    await sc.services.flusher().drain()
    sources = await sc.services.store.pool.fetch(
        "SELECT key_source, multiplier, provider FROM ledger WHERE kind = 'usage' AND account_id = $1"
        " ORDER BY started_at",
        account,
    )
    assert [(r["key_source"], r["multiplier"], r["provider"]) for r in sources] == [
        ("pool", "5/4", "default"),
        ("vault", "1/1", "default"),
        ("inline", "1/1", "default"),
        ("pool", "5/4", "east"),
        ("vault", "1/1", "east"),
        ("pool", "5/4", "default"),
    ]
    assert (await sc.balance(account))["balance"] == START - 3 * POOLED_CHARGE - 3 * BYOK_CHARGE


async def test_an_estimate_is_figured_with_the_vault_key(
    make_sidecar: SidecarFactory, fake: Fake, east: Fake
) -> None:
    """POST /v1/credits/estimate quotes the hold the request would take: with a stored key for the
    model's provider, at the BYOK multiplier (1), below the pooled one (1.25)."""
    sc = await vault_sidecar(make_sidecar, fake, east)
    _, api_key = await sc.account(START)
    raw = msgspec.json.encode({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]})

    async def hold() -> int:
        resp = await sc.client.post("/v1/credits/estimate", data=raw, headers=bearer(api_key))
        body = await resp.json()
        assert resp.status == 200, body
        return int(body["hold"])

    pooled = await hold()
    await store_key(sc, api_key, "default", VAULT_KEY)
    own = await hold()
    assert own * 5 <= pooled * 4 < own * 5 + 5  # 1.25x, each rounded up once
    assert fake.seen == []  # nothing went upstream


@pytest.mark.parametrize("stream", [False, True], ids=["body", "stream"])
async def test_responses_name_the_key_source_and_whether_marked_up(
    make_sidecar: SidecarFactory, fake: Fake, east: Fake, stream: bool
) -> None:
    sc = await vault_sidecar(make_sidecar, fake, east)
    _, api_key = await sc.account(START)
    fake.answer = Answer(stream=stream)  # an event stream is relayed as it comes (forward.py)
    seen = []
    for step in ("pool", "vault", "inline"):
        if step == "vault":
            await store_key(sc, api_key, "default", VAULT_KEY)
        inline = {"x-creditgate-provider-key": INLINE_KEY} if step == "inline" else {}
        status, got, _ = await chat(sc, api_key, **inline)
        assert status == 200
        seen.append((got["x-creditgate-key-source"], got["x-creditgate-markup"]))
    assert seen == [("pool", "true"), ("vault", "false"), ("inline", "false")]


class Counting:
    """A Redis client that counts the HGETALLs sent through it."""

    def __init__(self, redis: Any) -> None:
        self.redis, self.reads = redis, 0

    async def hgetall(self, name: str) -> Any:
        self.reads += 1
        return await self.redis.hgetall(name)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.redis, name)


async def test_the_cache_costs_no_redis_read_per_request_and_this_processes_writes_apply_at_once(
    make_sidecar: SidecarFactory, fake: Fake, east: Fake
) -> None:
    sc = await vault_sidecar(make_sidecar, fake, east, auth_cache_seconds=30)
    vault = sc.client.app[VAULT]
    now = [1000.0]
    vault.clock = lambda: now[0]
    counting = Counting(vault.redis)
    vault.redis = counting  # type: ignore[assignment]
    account, api_key = await sc.account(START)
    for _ in range(3):  # no records: one read, then the cached empty mapping
        assert (await chat(sc, api_key))[0] == 200
    assert (sent_key(fake), counting.reads) == (PROVIDER_KEY, 1)
    stored = await store_key(sc, api_key, "default", VAULT_KEY)  # through this process: at once
    for _ in range(3):
        assert (await chat(sc, api_key))[0] == 200
        assert sent_key(fake) == VAULT_KEY
    assert counting.reads == 2
    # Another process's write (a second Vault on the same stores) shows once the cache entry ends.
    svc = sc.services
    elsewhere = Vault(
        key_ring(sc.settings), svc.store.pool, svc.redis, svc.keys, ["default", "acme"], cache_seconds=30
    )
    await elsewhere.delete(account, stored["id"])
    assert (await chat(sc, api_key))[0] == 200
    assert sent_key(fake) == VAULT_KEY  # within auth_cache_seconds: the cached key
    now[0] += 30
    assert (await chat(sc, api_key))[0] == 200
    assert (sent_key(fake), counting.reads) == (PROVIDER_KEY, 3)


@pytest.mark.parametrize("fault", ["altered", "unknown-key-id", "moved"])
async def test_a_stored_key_that_does_not_open_is_a_503_never_the_pooled_key(
    make_sidecar: SidecarFactory, fake: Fake, east: Fake, fault: str
) -> None:
    sc = await vault_sidecar(make_sidecar, fake, east)
    account, api_key = await sc.account(START)
    other, other_key = await sc.account(START)
    await store_key(sc, api_key, "default", VAULT_KEY)
    svc = sc.services
    name = svc.keys.account(account).llm_keys
    record = mirror_record((await mirror(sc, account))[b"default"])
    if fault == "altered":
        record = msgspec.structs.replace(record, sealed=bytes([record.sealed[0] ^ 1]) + record.sealed[1:])
    elif fault == "unknown-key-id":
        record = msgspec.structs.replace(record, kid="k0")
    target = svc.keys.account(other).llm_keys if fault == "moved" else name
    await svc.redis.hset(target, "default", msgspec.json.encode(record))
    seen = len(fake.seen)
    status, _, body = await chat(sc, other_key if fault == "moved" else api_key)
    error = msgspec.json.decode(body)["error"]
    assert (status, error["code"], error["param"]) == (503, "vault_key_unavailable", "provider")
    assert len(fake.seen) == seen  # nothing went upstream, with no key at all
    assert (await sc.balance(other if fault == "moved" else account))["balance"] == START
    # Its other providers still work.
    status, _, _ = await chat(sc, api_key if fault != "moved" else other_key, "acme-model")
    assert (status, sent_key(east)) == (200, EAST_POOL_KEY)


async def test_no_key_material_in_logs_responses_or_metrics(
    make_sidecar: SidecarFactory, fake: Fake, east: Fake, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    sc = await vault_sidecar(make_sidecar, fake, east, log_requests=True)
    account, api_key = await sc.account(START)
    answers: list[bytes] = []

    async def keep(resp: Any) -> None:
        answers.append(
            str(resp.status).encode() + repr(list(resp.headers.items())).encode() + await resp.read()
        )

    quoting = msgspec.json.encode(
        {
            "error": {
                "message": f"Incorrect API key provided: {VAULT_KEY} ({VAULT_KEY[:4]}***{VAULT_KEY[-4:]})",
                "code": "invalid_api_key",
            }
        }
    )
    await keep(
        await sc.client.post(KEYS, json={"provider": "default", "key": VAULT_KEY}, headers=bearer(api_key))
    )
    await keep(
        await sc.client.post(KEYS, json={"provider": "nobody", "key": VAULT_KEY}, headers=bearer(api_key))
    )
    await keep(
        await sc.client.post(
            KEYS, json={"provider": "default", "key": VAULT_KEY + " x"}, headers=bearer(api_key)
        )
    )
    await keep(await sc.client.get(KEYS, headers=bearer(api_key)))
    fake.answer = Answer(body=b'{"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 2}}')
    status, headers, body = await chat(sc, api_key)
    assert (status, sent_key(fake)) == (200, VAULT_KEY)
    answers.append(repr(list(headers.items())).encode() + body)
    for code in (401, 403, 429, 500):
        fake.answer = Answer(status=code, body=quoting)
        status, headers, body = await chat(sc, api_key)
        assert (status, sent_key(fake)) == (code, VAULT_KEY)  # the provider's own status, about its key
        answers.append(repr(list(headers.items())).encode() + body)
        assert b"Incorrect API key provided: [redacted]" in body
    fake.answer = Answer(stream=True)
    status, headers, body = await chat(sc, api_key, stream="1")
    answers.append(repr(list(headers.items())).encode() + body)
    await sc.services.flusher().drain()
    metrics = await sc.client.get("/metrics")
    answers.append(await metrics.read())
    (row,) = await rows(sc, account)
    await keep(await sc.client.delete(f"{KEYS}/{row['id']}", headers=bearer(api_key)))
    ledger = await sc.services.store.pool.fetch("SELECT * FROM ledger WHERE account_id = $1", account)
    assert [r["key_source"] for r in ledger if r["kind"] == "usage"] == ["vault", "vault"]
    logged = "\n".join(repr(vars(r)) for r in caplog.records)  # every record whole: message, args, extras
    for text in (
        logged,
        *(a.decode("utf-8", "replace") for a in answers),
        repr([dict(r) for r in ledger]),
    ):
        assert VAULT_KEY not in text
        assert VAULT_KEY[8:-4] not in text  # nor its middle
    assert sum(r.name == "creditgate.request" for r in caplog.records) >= 6  # request lines, checked


async def test_without_a_master_key_the_vault_refuses_writes_naming_the_setting(
    make_sidecar: SidecarFactory, fake: Fake, east: Fake
) -> None:
    sc = await vault_sidecar(make_sidecar, fake, east, vault_master_key=None)
    _, api_key = await sc.account(START)
    resp = await sc.client.post(KEYS, json={"provider": "default", "key": VAULT_KEY}, headers=bearer(api_key))
    error = (await resp.json())["error"]
    assert (resp.status, error["code"], error["param"]) == (503, "vault_not_configured", "vault_master_key")
    assert "vault_master_key" in error["message"]
    assert await listing(sc, api_key) == []
    assert (await chat(sc, api_key))[0] == 200
    assert sent_key(fake) == PROVIDER_KEY


async def test_startup_refuses_a_master_key_that_does_not_open_the_vault(
    make_sidecar: SidecarFactory, fake: Fake, east: Fake, aiohttp_client: Any
) -> None:
    sc = await vault_sidecar(make_sidecar, fake, east)
    _, api_key = await sc.account(START)
    await store_key(sc, api_key, "default", VAULT_KEY)
    base = sc.settings
    cases: list[tuple[dict[str, Any], str]] = [
        ({"vault_master_key": NEW_MASTER}, "vault_master_key"),  # wrong key under the same id
        ({"vault_master_key": None}, "vault_master_key"),  # records, no key at all
        ({"vault_master_key": NEW_MASTER, "vault_master_key_id": "k2"}, "vault_previous_keys"),  # k1 missing
        (
            {
                "vault_master_key": NEW_MASTER,
                "vault_master_key_id": "k2",
                "vault_previous_keys": {"k1": NEW_MASTER},
            },
            "vault_previous_keys.k1",
        ),
    ]
    for changes, param in cases:
        settings = msgspec.structs.replace(base, key_prefix=new_key_prefix(), **changes)
        with pytest.raises(ConfigError) as raised:
            await aiohttp_client(create_app(settings))
        assert raised.value.param == param
        assert param in raised.value.message
        assert MASTER not in raised.value.message
        assert NEW_MASTER not in raised.value.message
    # The right key under a new id, the old one as previous: it starts.
    right = msgspec.structs.replace(
        base,
        key_prefix=new_key_prefix(),
        vault_master_key=NEW_MASTER,
        vault_master_key_id="k2",
        vault_previous_keys={"k1": MASTER},
    )
    await aiohttp_client(create_app(right))


def test_serve_with_a_wrong_master_key_exits_2_naming_the_setting(
    redis_url: str, database_url: str, tmp_path: Path
) -> None:
    env = process_env(
        redis_url, database_url, new_key_prefix(), "http://127.0.0.1:9/v1", CREDITGATE_LOG_LEVEL="ERROR"
    )
    migrated = creditgate(env, "migrate", cwd=tmp_path)
    assert migrated.returncode == 0, migrated.stderr
    created = creditgate(env, "account", "create", "acct-w", cwd=tmp_path)
    assert created.returncode == 0, created.stderr

    async def seal_one() -> None:
        ring = key_ring(make_settings(redis_url, database_url, vault_master_key=MASTER))
        assert ring is not None
        kid, nonce, sealed = ring.seal(VAULT_KEY, associated_data("acct-w", "default", "lk_w"))
        conn = await asyncpg.connect(database_url)
        try:
            await conn.execute(
                "INSERT INTO llm_keys (id, account_id, provider, last4, master_key_id, nonce, sealed)"
                " VALUES ('lk_w', 'acct-w', 'default', 'WXYZ', $1, $2, $3)",
                kid,
                nonce,
                sealed,
            )
        finally:
            await conn.close()

    asyncio.run(seal_one())
    run = creditgate({**env, "CREDITGATE_VAULT_MASTER_KEY": NEW_MASTER}, "serve", cwd=tmp_path)
    assert run.returncode == 2, run.stderr
    lines = run.stderr.splitlines()
    assert len(lines) == 1, run.stderr
    assert lines[0].startswith("creditgate: vault_master_key (master key id 'k1') does not open"), lines[0]
    assert NEW_MASTER not in run.stderr
    assert MASTER not in run.stderr
    run = creditgate(env, "serve", cwd=tmp_path)  # no master key, a record: refused too
    assert run.returncode == 2, run.stderr
    assert "vault_master_key" in run.stderr


@pytest.mark.topologies
async def test_the_rebuild_restores_the_mirror(make_sidecar: SidecarFactory, fake: Fake, east: Fake) -> None:
    sc = await vault_sidecar(make_sidecar, fake, east)
    account, api_key = await sc.account(START)
    await store_key(sc, api_key, "default", VAULT_KEY)
    await store_key(sc, api_key, "acme", INLINE_KEY)
    before = await mirror(sc, account)
    svc = sc.services
    await svc.flusher().drain()
    names = [n async for n in svc.redis.scan_iter(match=f"{svc.keys.prefix}*")]
    await svc.redis.delete(*names)
    assert await mirror(sc, account) == {}
    assert await rebuild_if_empty(
        svc.redis, svc.keys, svc.store, settled_marker_ms=svc.balances.settled_marker_ms
    )
    assert await mirror(sc, account) == before
    status, _, _ = await chat(sc, api_key)
    assert (status, sent_key(fake)) == (200, VAULT_KEY)
    status, _, _ = await chat(sc, api_key, "acme-model")
    assert (status, sent_key(east)) == (200, INLINE_KEY)


def test_a_key_ring_is_never_printed() -> None:
    ring = KeyRing("k1", {"k1": b"\x01" * 32})
    assert "\\x01" not in repr(ring)
