"""Rotating the vault's master key: records sealed under k1 are sealed again under k2 by `creditgate
vault rotate` while requests flow (each keeps going out with its account's own key, through a sidecar
holding k2 as current and k1 as previous); a run stopped midway (limited) leaves each record whole on
one key or the other and the next run resumes; a POST during the rotation is never undone; every record
ends on k2, Redis' mirror too, and a rerun changes nothing."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any

import msgspec

from sidecar.vault.api import VAULT
from sidecar.vault.mirror import mirror_record
from sidecar.vault.rotate import rotate
from sidecar.vault.settings import key_ring

from .conftest import Sidecar, SidecarFactory, process_env
from .support_fake_provider import Fake
from .support_vault import MASTER, NEW_MASTER, START, chat, store_key, vault_sidecar
from .support_vault import east as east  # the fixtures
from .support_vault import fake as fake

ACCOUNTS = 10  # one record each


def own_key(i: int) -> str:
    return f"AIzaRotationKey{i:02d}abcdefghijklmnopqrstuv"


async def kids(sc: Sidecar) -> dict[str, str]:
    """Each record's master key id, by record id."""
    rows = await sc.services.store.pool.fetch("SELECT id, master_key_id FROM llm_keys")
    return {r["id"]: r["master_key_id"] for r in rows}


async def sealed(sc: Sidecar) -> dict[str, tuple[bytes, bytes]]:
    rows = await sc.services.store.pool.fetch("SELECT id, nonce, sealed FROM llm_keys")
    return {r["id"]: (r["nonce"], r["sealed"]) for r in rows}


class Watching:
    """The sidecar's Redis reads of the vault mirror, and the master key ids of the records they saw."""

    def __init__(self, redis: Any) -> None:
        self.redis, self.seen = redis, set[str]()

    async def hgetall(self, name: str) -> Any:
        found = await self.redis.hgetall(name)
        self.seen |= {mirror_record(v).kid for v in found.values()}
        return found

    def __getattr__(self, name: str) -> Any:
        return getattr(self.redis, name)


async def kids_of(sc: Sidecar, account: str) -> set[str]:
    rows = await sc.services.store.pool.fetch(
        "SELECT master_key_id FROM llm_keys WHERE account_id = $1", account
    )
    return {r["master_key_id"] for r in rows}


async def mirrored_kids(sc: Sidecar, account: str) -> set[str]:
    svc = sc.services
    return {
        mirror_record(v).kid for v in (await svc.redis.hgetall(svc.keys.account(account).llm_keys)).values()
    }


class Paused:
    """A Redis client whose `at`-th MULTI (a mirror write) waits for `release` once `reached` is set;
    `accounts` are those whose mirror it wrote (or holds), in order."""

    def __init__(self, redis: Any, at: int) -> None:
        self.redis, self.at = redis, at
        self.reached, self.release = asyncio.Event(), asyncio.Event()
        self.accounts: list[str] = []

    def pipeline(self, transaction: bool = True) -> Any:
        return _PausedPipeline(self, self.redis.pipeline(transaction=transaction))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.redis, name)


class _PausedPipeline:
    def __init__(self, owner: Paused, pipe: Any) -> None:
        self.owner, self.pipe = owner, pipe

    async def __aenter__(self) -> _PausedPipeline:
        await self.pipe.__aenter__()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.pipe.__aexit__(*exc)

    def delete(self, name: str) -> None:
        self.owner.accounts.append(name.rsplit(":", 1)[-1])
        self.pipe.delete(name)

    def hset(self, name: str, mapping: Any) -> None:
        self.pipe.hset(name, mapping=mapping)

    async def execute(self) -> Any:
        if len(self.owner.accounts) == self.owner.at:
            self.owner.reached.set()
            await self.owner.release.wait()
        return await self.pipe.execute()


async def calls_with_own_keys(sc: Sidecar, accounts: list[tuple[str, str]], keys: dict[str, str]) -> int:
    """One request per account; each must go out with the account's own key (the fake's answer quotes
    the Authorization it got)."""
    for account, api_key in accounts:
        status, _, body = await chat(sc, api_key)
        assert status == 200, body
        assert msgspec.json.decode(body)["choices"][0]["message"]["content"] == f"Bearer {keys[account]}"
    return len(accounts)


async def test_rotation_under_requests_resumes_and_ends_on_the_new_key(
    make_sidecar: SidecarFactory,
    fake: Fake,
    east: Fake,
    redis_url: str,
    database_url: str,
    tmp_path: Path,
) -> None:
    old = await vault_sidecar(make_sidecar, fake, east)
    accounts = [await old.account(START) for _ in range(ACCOUNTS)]
    keys = {account: own_key(i) for i, (account, _) in enumerate(accounts)}
    for account, api_key in accounts:
        await store_key(old, api_key, "default", keys[account])
    assert set((await kids(old)).values()) == {"k1"}
    total = ACCOUNTS
    # The serving side moves first: k2 current, k1 still opening the records not rotated yet.
    sc = await vault_sidecar(
        make_sidecar,
        fake,
        east,
        key_prefix=old.settings.key_prefix,
        vault_master_key=NEW_MASTER,
        vault_master_key_id="k2",
        vault_previous_keys={"k1": MASTER},
    )
    watching = Watching(sc.client.app[VAULT].redis)
    sc.client.app[VAULT].redis = watching  # type: ignore[assignment]
    svc = sc.services
    ring = key_ring(sc.settings)
    assert ring is not None
    # A run stopped midway (here: limited to 3 records): each record is on one key or the other.
    first = await rotate(svc.store.pool, svc.redis, svc.keys, ring, batch=2, limit=3)
    assert (first.rotated, first.remaining, first.master_key_id) == (3, total - 3, "k2")
    assert sorted((await kids(sc)).values()) == ["k1"] * (total - 3) + ["k2"] * 3
    await calls_with_own_keys(sc, accounts, keys)
    assert watching.seen == {"k1", "k2"}  # requests opened records of both keys
    # A second run (batches of 3 records), held at its second account's Redis write: that account is
    # on k2 in Postgres and still k1 in Redis. Requests go on meanwhile, and a POST replaces the key of the
    # batch's third account, not rotated yet: the run does not undo it.
    batch = [
        r["account_id"]
        for r in await svc.store.pool.fetch(
            "SELECT account_id, min(id) FROM (SELECT account_id, id FROM llm_keys WHERE master_key_id <> 'k2'"
            " ORDER BY id LIMIT 3) AS due GROUP BY account_id ORDER BY 2"
        )
    ]
    assert len(batch) == 3
    paused = Paused(svc.redis, at=2)
    second = asyncio.ensure_future(rotate(svc.store.pool, paused, svc.keys, ring, batch=3, limit=4))  # type: ignore[arg-type]
    await paused.reached.wait()
    assert paused.accounts == batch[:2]
    assert (await kids_of(sc, batch[1]), await mirrored_kids(sc, batch[1])) == ({"k2"}, {"k1"})
    await calls_with_own_keys(sc, accounts, keys)
    replaced = batch[2]
    assert await kids_of(sc, replaced) == {"k1"}
    keys[replaced] = "AIzaReplacedDuringRotation0123456789"
    await store_key(sc, dict(accounts)[replaced], "default", keys[replaced])
    paused.release.set()
    assert (await second).rotated == 4
    assert await kids_of(sc, replaced) == {"k2"}
    await calls_with_own_keys(sc, accounts, keys)  # the replaced key stands
    # The rest by the CLI, in a process of its own, while requests flow.
    env = process_env(
        redis_url,
        database_url,
        sc.settings.key_prefix,
        fake.url,
        CREDITGATE_VAULT_MASTER_KEY=NEW_MASTER,
        CREDITGATE_VAULT_MASTER_KEY_ID="k2",
        CREDITGATE_VAULT_PREVIOUS_KEYS=msgspec.json.encode({"k1": MASTER}).decode(),
        CREDITGATE_LOG_LEVEL="WARNING",
    )
    left = sum(kid == "k1" for kid in (await kids(sc)).values())
    assert left > 0
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "sidecar",
        "vault",
        "rotate",
        "--batch-size",
        "2",
        env=env,
        cwd=tmp_path,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    done = asyncio.ensure_future(proc.communicate())
    served = 0
    while not done.done():
        served += await calls_with_own_keys(sc, accounts, keys)
    out, err = await done
    assert proc.returncode == 0, err.decode()
    assert msgspec.json.decode(out) == {"rotated": left, "remaining": 0, "master_key_id": "k2"}
    assert served >= ACCOUNTS
    # Every record on k2, Postgres and Redis alike; the replaced key stands; requests go on.
    assert set((await kids(sc)).values()) == {"k2"}
    for account, _ in accounts:
        mirrored = await svc.redis.hgetall(svc.keys.account(account).llm_keys)
        assert {mirror_record(v).kid for v in mirrored.values()} == {"k2"}
    await calls_with_own_keys(sc, accounts, keys)
    # A rerun changes nothing.
    before = await sealed(sc)
    again = await rotate(svc.store.pool, svc.redis, svc.keys, ring, batch=2)
    assert (again.rotated, again.remaining) == (0, 0)
    assert await sealed(sc) == before
    # Once done, k1 can go: a sidecar with k2 alone starts and serves every key.
    alone = await vault_sidecar(
        make_sidecar,
        fake,
        east,
        key_prefix=sc.settings.key_prefix,
        vault_master_key=NEW_MASTER,
        vault_master_key_id="k2",
    )
    await calls_with_own_keys(alone, accounts, keys)
