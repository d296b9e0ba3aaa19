"""`creditgate vault rotate`: every record sealed under an earlier master key opened with it and sealed
again under the current one (vault_master_key_id), in batches.

Resumable and idempotent: a record carries its master key's id, and a run takes only the records not on
the current id, so a run stopped midway (or limited) leaves each record whole on one key or the other,
and the next run goes on from there; a run with nothing left changes nothing. Each account's records
are rewritten under its vault lock (the same as a POST's), committed, then its Redis mirror is written
from the committed rows (mirror.py), so a concurrent POST or DELETE is never undone, and requests keep
opening the keys throughout: the serving processes hold both keys (the new one current, the old one in
vault_previous_keys) while the rotation runs."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import asyncpg

from ..errors import ConfigError
from ..keys import KeySpace
from ..redis_client import RedisClient
from ..signals.events import Connection
from .crypto import CannotOpen, KeyRing, associated_data
from .mirror import COLUMNS, SealedKey, lock_accounts, sync_accounts

log = logging.getLogger("creditgate.vault")
BATCH = 200  # records per batch


@dataclass(frozen=True, slots=True)
class Rotation:
    rotated: int  # records sealed again by this run
    remaining: int  # records still on another key id (a limited run's rest; 0 when done)
    master_key_id: str

    def view(self) -> dict[str, object]:
        return {"rotated": self.rotated, "remaining": self.remaining, "master_key_id": self.master_key_id}


async def rotate(
    pool: asyncpg.Pool,
    redis: RedisClient,
    keys: KeySpace,
    ring: KeyRing,
    *,
    batch: int = BATCH,
    limit: int | None = None,
) -> Rotation:
    """Seal every record not on `ring.current_id` again under it (at most `limit` this run)."""
    current = ring.current_id
    rotated = 0
    async with pool.acquire() as conn:
        while limit is None or rotated < limit:
            size = batch if limit is None else min(batch, limit - rotated)
            accounts = [
                r["account_id"]
                for r in await conn.fetch(
                    "SELECT account_id, min(id) FROM (SELECT account_id, id FROM llm_keys"
                    " WHERE master_key_id <> $1 ORDER BY id LIMIT $2) AS due GROUP BY account_id ORDER BY 2",
                    current,
                    size,
                )
            ]
            if not accounts:
                break
            for account in accounts:
                if limit is not None and rotated >= limit:
                    break
                most = None if limit is None else limit - rotated
                rotated += await _rotate_account(conn, ring, account, most)
                await sync_accounts(conn, redis, keys, [account])
            log.info("vault rotation: %d records sealed under master key id %s so far", rotated, current)
        remaining = await conn.fetchval("SELECT count(*) FROM llm_keys WHERE master_key_id <> $1", current)
    return Rotation(rotated, remaining, current)


async def _rotate_account(conn: Connection, ring: KeyRing, account: str, most: int | None) -> int:
    """The account's records not on the current key, sealed again in one transaction under its lock."""
    async with conn.transaction():
        await lock_accounts(conn, [account])
        rows = await conn.fetch(
            f"SELECT {COLUMNS} FROM llm_keys WHERE account_id = $1 AND master_key_id <> $2 ORDER BY id"
            " LIMIT $3",
            account,
            ring.current_id,
            most,
        )
        for row in rows:
            old = SealedKey.of(row)
            aad = associated_data(old.account, old.provider, old.id)
            try:
                plaintext = ring.open(old.key_id, old.nonce, old.sealed, aad)
            except CannotOpen as exc:
                raise ConfigError(
                    f"vault record {old.id} does not open ({exc}): configure its master key in "
                    "vault_previous_keys (or delete the record), then run the rotation again.",
                    param="vault_previous_keys",
                ) from None
            kid, nonce, sealed = ring.seal(plaintext, aad)
            await conn.execute(
                "UPDATE llm_keys SET master_key_id = $2, nonce = $3, sealed = $4 WHERE id = $1",
                old.id,
                kid,
                nonce,
                sealed,
            )
        return len(rows)
