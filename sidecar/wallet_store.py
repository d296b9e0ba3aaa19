"""Postgres for key management and spend-cap configuration: api_keys' name, expiry and last use, the
spend_caps table and accounts.time_zone (migrations 004 and 005). The admin API, the client's own
/v1/credits endpoints and the CLI call this; nothing on the request path does."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

import asyncpg

_KEY_COLUMNS = (
    "id, account_id, key_hash, name, display_prefix, created_at, revoked_at, expires_at, last_used_at"
)


@dataclass(frozen=True, slots=True)
class KeyRow:
    key_id: str
    account: str
    key_hash: str
    name: str | None
    prefix: str | None
    created_at: dt.datetime
    revoked_at: dt.datetime | None
    expires_at: dt.datetime | None
    last_used_at: dt.datetime | None

    @classmethod
    def of(cls, r: Any) -> KeyRow:
        return cls(
            r["id"],
            r["account_id"],
            r["key_hash"],
            r["name"],
            r["display_prefix"],
            r["created_at"],
            r["revoked_at"],
            r["expires_at"],
            r["last_used_at"],
        )


@dataclass(frozen=True, slots=True)
class CapRow:
    scope: str
    period: str
    limit: int


def at_ms(ms: int) -> dt.datetime | None:
    return None if ms == 0 else dt.datetime.fromtimestamp(ms / 1000, dt.UTC)


class WalletStore:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    # ---- keys --------------------------------------------------------------------------------------

    async def keys_of(self, account: str) -> list[KeyRow]:
        rows = await self.pool.fetch(
            f"SELECT {_KEY_COLUMNS} FROM api_keys WHERE account_id = $1 ORDER BY created_at, id", account
        )
        return [KeyRow.of(r) for r in rows]

    async def key(self, key_id: str) -> KeyRow | None:
        row = await self.pool.fetchrow(f"SELECT {_KEY_COLUMNS} FROM api_keys WHERE id = $1", key_id)
        return KeyRow.of(row) if row else None

    async def update_key(self, key_id: str, changes: dict[str, Any]) -> KeyRow | None:
        """Set `changes` (name, expires_at) on the key; None when there is no such key."""
        sets = ", ".join(f"{column} = ${i}" for i, column in enumerate(changes, start=2))
        if not sets:
            return await self.key(key_id)
        row = await self.pool.fetchrow(
            f"UPDATE api_keys SET {sets} WHERE id = $1 RETURNING {_KEY_COLUMNS}", key_id, *changes.values()
        )
        return KeyRow.of(row) if row else None

    async def note_last_used(self, key_id: str, used_ms: int) -> None:
        """Copy a key's last use from Redis (kept when its Redis record goes, at revocation)."""
        if used_ms:
            await self.pool.execute(
                "UPDATE api_keys SET last_used_at = greatest(coalesce(last_used_at, $2), $2) WHERE id = $1",
                key_id,
                at_ms(used_ms),
            )

    # ---- caps and time zones -----------------------------------------------------------------------

    async def set_cap(self, account: str, scope: str, period: str, limit: int) -> None:
        await self.pool.execute(
            "INSERT INTO spend_caps (account_id, scope, period, limit_micro) VALUES ($1, $2, $3, $4)"
            " ON CONFLICT (account_id, scope, period)"
            " DO UPDATE SET limit_micro = excluded.limit_micro, updated_at = now()",
            account,
            scope,
            period,
            limit,
        )

    async def delete_cap(self, account: str, scope: str, period: str) -> bool:
        status = await self.pool.execute(
            "DELETE FROM spend_caps WHERE account_id = $1 AND scope = $2 AND period = $3",
            account,
            scope,
            period,
        )
        return bool(status == "DELETE 1")

    async def caps(self, account: str) -> list[CapRow]:
        rows = await self.pool.fetch(
            "SELECT scope, period, limit_micro FROM spend_caps WHERE account_id = $1 ORDER BY scope, period",
            account,
        )
        return [CapRow(r["scope"], r["period"], int(r["limit_micro"])) for r in rows]

    async def set_time_zone(self, account: str, zone: str | None) -> bool:
        """False when there is no such account."""
        status = await self.pool.execute("UPDATE accounts SET time_zone = $2 WHERE id = $1", account, zone)
        return bool(status == "UPDATE 1")

    async def time_zone(self, account: str) -> str | None:
        return await self.pool.fetchval("SELECT time_zone FROM accounts WHERE id = $1", account)  # type: ignore[no-any-return]

    async def configured(self, account: str | None) -> dict[str, tuple[list[CapRow], str | None]]:
        """Account -> (its caps, its time zone), for one account or every account that has either."""
        rows = await self.pool.fetch(
            "SELECT a.id, a.time_zone, c.scope, c.period, c.limit_micro FROM accounts a"
            " LEFT JOIN spend_caps c ON c.account_id = a.id"
            " WHERE ($1::text IS NULL OR a.id = $1) AND (c.scope IS NOT NULL OR a.time_zone IS NOT NULL"
            " OR $1::text IS NOT NULL)"
            " ORDER BY a.id",
            account,
        )
        found: dict[str, tuple[list[CapRow], str | None]] = {}
        for r in rows:
            caps, _ = found.setdefault(r["id"], ([], r["time_zone"]))
            if r["scope"] is not None:
                caps.append(CapRow(r["scope"], r["period"], int(r["limit_micro"])))
        return found
