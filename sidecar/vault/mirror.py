"""The vault's Redis side: each account's sealed keys in one hash of its slot (`AccountKeys.llm_keys`:
provider -> a sealed record, JSON), written from Postgres, never the other way.

Every write of an account's vault rows (a POST, a DELETE, a rotation) commits in Postgres first, then
`sync_accounts` takes the account's advisory lock, reads its committed rows and replaces the hash whole
(one MULTI: DEL, HSET) while holding it; so whichever writes race, Redis ends as the last committed
state, and a reader sees the old hash or the new, never a mix. `restore_vault` does the same for every
account of the partitions a rebuild restores."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

import asyncpg
import msgspec

from ..keys import KeySpace
from ..redis_client import RedisClient
from ..signals.events import Connection

RESTORE_BATCH = 500  # accounts locked, read and written per transaction by restore_vault
COLUMNS = "id, account_id, provider, master_key_id, nonce, sealed"


class MirrorRecord(msgspec.Struct, frozen=True):
    """One provider's entry in the Redis hash: the record id, its master key id, nonce and sealed key
    (bytes as base64 in the JSON)."""

    id: str
    kid: str
    nonce: bytes
    sealed: bytes


@dataclass(frozen=True, slots=True)
class SealedKey:
    id: str
    account: str
    provider: str
    key_id: str  # the master key's id
    nonce: bytes
    sealed: bytes

    @classmethod
    def of(cls, row: asyncpg.Record) -> SealedKey:
        return cls(
            row["id"], row["account_id"], row["provider"], row["master_key_id"], row["nonce"], row["sealed"]
        )

    def mirrored(self) -> bytes:
        return _encode(MirrorRecord(self.id, self.key_id, self.nonce, self.sealed))


_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder(MirrorRecord).decode


def mirror_record(raw: bytes | str) -> MirrorRecord:
    """A hash entry decoded; msgspec.DecodeError (a ValidationError too) for one that is not a record."""
    return _decode(raw)


async def lock_accounts(conn: Connection, accounts: Iterable[str]) -> None:
    """The accounts' vault locks (transaction-scoped advisory locks, scoped to the schema), taken in
    sorted order so two lockers of several accounts never deadlock."""
    await conn.execute(
        "SELECT pg_advisory_xact_lock(hashtextextended(current_schema() || ':vault:' || a, 0))"
        " FROM unnest($1::text[]) AS a",  # in the array's order
        sorted(set(accounts)),
    )


async def sealed_rows(conn: Connection, accounts: list[str]) -> dict[str, list[SealedKey]]:
    rows = await conn.fetch(
        f"SELECT {COLUMNS} FROM llm_keys WHERE account_id = ANY($1::text[]) ORDER BY account_id, provider",
        accounts,
    )
    found: dict[str, list[SealedKey]] = defaultdict(list)
    for row in rows:
        found[row["account_id"]].append(SealedKey.of(row))
    return found


async def write_mirror(redis: RedisClient, keys: KeySpace, account: str, rows: list[SealedKey]) -> None:
    """Replace the account's hash with `rows` (none: delete it), in one MULTI of its slot."""
    name = keys.account(account).llm_keys
    async with redis.pipeline(transaction=True) as pipe:
        pipe.delete(name)
        if rows:
            pipe.hset(name, mapping={row.provider: row.mirrored() for row in rows})
        await pipe.execute()


async def sync_accounts(conn: Connection, redis: RedisClient, keys: KeySpace, accounts: list[str]) -> None:
    """Redis' hashes of `accounts` from their committed rows, written under their locks (module doc).
    Call it after the write's own transaction committed, never inside it."""
    async with conn.transaction():
        await lock_accounts(conn, accounts)
        rows = await sealed_rows(conn, accounts)
        for account in sorted(set(accounts)):
            await write_mirror(redis, keys, account, rows.get(account, []))


async def restore_vault(
    redis: RedisClient, keys: KeySpace, pool: asyncpg.Pool, partitions: set[int] | None = None
) -> int:
    """Write the hash of every account with vault rows (in `partitions`, default all) from Postgres, for
    a rebuilt Redis; idempotent. Returns the number of accounts written."""
    async with pool.acquire() as conn:
        accounts = [
            account
            for (account,) in await conn.fetch("SELECT DISTINCT account_id FROM llm_keys ORDER BY 1")
            if partitions is None or keys.partition_of(account) in partitions
        ]
        for start in range(0, len(accounts), RESTORE_BATCH):
            await sync_accounts(conn, redis, keys, accounts[start : start + RESTORE_BATCH])
    return len(accounts)
