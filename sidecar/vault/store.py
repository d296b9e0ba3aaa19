"""The vault: a customer's provider keys, one per (account, provider), sealed in Postgres (`llm_keys`,
migration 018) and mirrored, sealed, into Redis (mirror.py); the request path's `keys_of` reads only the
mirror, through a short in-process cache, and opens the keys in process.

A POST for a provider the account has a key for replaces it (same id, a fresh nonce). Writes through
this process drop its cache entry at once; other processes see them within `auth_cache_seconds`. A key
this process cannot open (sealed under a master key id it lacks, altered, moved) never falls back to the
pooled key: the account's requests to that provider get a 503 `vault_key_unavailable`."""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

import asyncpg
import msgspec

from ..config import ACCOUNT_ID
from ..errors import ConfigError, NotFound, ServiceUnavailable, UnknownAccount
from ..keys import KeySpace, as_text
from ..redis_client import RedisClient
from .crypto import CannotOpen, KeyRing, associated_data
from .mirror import COLUMNS, SealedKey, lock_accounts, mirror_record, sync_accounts
from .records import NO_KEYS, KeyBody, StoredKeys, checked, view
from .settings import key_ring

if TYPE_CHECKING:
    from ..config import Settings
    from ..services import Services

log = logging.getLogger("creditgate.vault")

CACHE_LIMIT = 50_000  # accounts cached; past it the cache starts again


_VIEW = "id, provider, label, last4, created_at, updated_at"


class Vault:
    """The writes (routes), the request path's `keys_of` (the OwnKeys protocol) and the startup check."""

    def __init__(
        self,
        ring: KeyRing | None,
        pool: asyncpg.Pool,
        redis: RedisClient,
        keys: KeySpace,
        providers: Iterable[str],
        *,
        cache_seconds: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ring, self.pool, self.redis, self.keys = ring, pool, redis, keys
        self.providers = frozenset(providers)
        self.cache_seconds, self.clock = cache_seconds, clock
        self._cache: dict[str, tuple[StoredKeys, float]] = {}
        self._epoch = 0  # bumped by every write: a read that began before one is not cached

    @classmethod
    async def opened(cls, settings: Settings, svc: Services, providers: Iterable[str]) -> Vault:
        """The sidecar's vault, verified: a master key that does not open its records stops startup
        (ConfigError naming the setting)."""
        vault = cls(
            key_ring(settings),
            svc.store.pool,
            svc.redis,
            svc.keys,
            providers,
            cache_seconds=settings.auth_cache_seconds,
        )
        await vault.verify()
        return vault

    # ---- the request path -------------------------------------------------------------------------

    async def keys_of(self, account: str) -> Mapping[str, str]:
        """The account's provider keys by provider, from the Redis mirror (one HGETALL) or the cache;
        an account with none is cached too (an empty mapping), so it costs no Redis call per request."""
        now = self.clock()
        hit = self._cache.get(account)
        if hit is not None and hit[1] > now:
            return hit[0]
        epoch = self._epoch
        raw = await self.redis.hgetall(self.keys.account(account).llm_keys)
        found = self._opened(account, raw) if raw else NO_KEYS
        if self.cache_seconds > 0 and epoch == self._epoch:
            if len(self._cache) >= CACHE_LIMIT:
                self._cache.clear()
            self._cache[account] = (found, now + self.cache_seconds)
        return found

    def forget(self, account: str) -> None:
        """This process reads the account's keys from Redis again on its next request."""
        self._epoch += 1
        self._cache.pop(account, None)

    def _opened(self, account: str, raw: Mapping[Any, Any]) -> StoredKeys:
        opened: dict[str, str] = {}
        broken: dict[str, str] = {}
        for field, value in raw.items():
            provider = as_text(field)
            try:
                record = mirror_record(value)
                if self.ring is None:
                    raise CannotOpen("no master key is configured here: vault_master_key")
                aad = associated_data(account, provider, record.id)
                opened[provider] = self.ring.open(record.kid, record.nonce, record.sealed, aad)
            except (CannotOpen, msgspec.DecodeError) as exc:
                reason = str(exc) if isinstance(exc, CannotOpen) else "the Redis record is not readable"
                broken[provider] = reason
                log.error(
                    "vault key of account %s for provider %s cannot be opened: %s", account, provider, reason
                )
        return StoredKeys(opened, broken)

    # ---- startup ----------------------------------------------------------------------------------

    async def verify(self) -> int:
        """Open one record of every master key id the vault holds: a ConfigError naming the setting when
        one does not open (a wrong key) or its key is not configured, or when records exist and no master
        key is configured. Returns how many key ids were checked. Postgres unreachable: logged, and the
        request path's own refusal (a 503, never the pooled key) stands in for the check."""
        try:
            async with self.pool.acquire() as conn:
                rows = await conn.fetch(
                    f"SELECT DISTINCT ON (master_key_id) {COLUMNS} FROM llm_keys ORDER BY master_key_id, id"
                )
        except asyncpg.UndefinedTableError:
            log.warning("the vault's table is missing (migration 018): run `creditgate migrate`")
            return 0
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            log.error("cannot check the vault's master keys at startup (%r); they are checked per use", exc)
            return 0
        if rows and self.ring is None:
            raise ConfigError(
                "The vault holds customers' provider keys but no master key is configured: set "
                "vault_master_key (or vault_master_key_file) and vault_master_key_id.",
                param="vault_master_key",
            )
        for row in rows:
            sealed = SealedKey.of(row)
            assert self.ring is not None
            try:
                self.ring.open(
                    sealed.key_id,
                    sealed.nonce,
                    sealed.sealed,
                    associated_data(sealed.account, sealed.provider, sealed.id),
                )
            except CannotOpen:
                raise self._wrong_key(sealed) from None
        return len(rows)

    def _wrong_key(self, sealed: SealedKey) -> ConfigError:
        assert self.ring is not None
        kid = sealed.key_id
        if kid not in self.ring.keys:
            return ConfigError(
                f"The vault holds provider keys sealed under master key id {kid!r}, which is neither "
                f"vault_master_key_id ({self.ring.current_id!r}) nor in vault_previous_keys: configure "
                "that key.",
                param="vault_previous_keys",
            )
        where = self.ring.current_setting if kid == self.ring.current_id else f"vault_previous_keys.{kid}"
        return ConfigError(
            f"{where} (master key id {kid!r}) does not open the vault's record {sealed.id}: it is not the "
            "key the records were sealed with (or the record was altered). Refusing to start rather than "
            "serve without the customers' keys.",
            param=where,
        )

    # ---- writes -----------------------------------------------------------------------------------

    def _sealing_ring(self) -> KeyRing:
        if self.ring is None:
            raise ServiceUnavailable(
                "The provider key vault is not configured on this gateway: the operator sets "
                "vault_master_key (or vault_master_key_file).",
                param="vault_master_key",
                code="vault_not_configured",
            )
        return self.ring

    async def _known(self, conn: Any, account: str) -> None:
        if not ACCOUNT_ID.match(account) or not await conn.fetchval(
            "SELECT 1 FROM accounts WHERE id = $1", account
        ):
            raise UnknownAccount(account)

    async def put(self, account: str, body: KeyBody) -> tuple[dict[str, Any], bool]:
        """Store (or replace) the account's key for the provider: (its view, whether it is new). Postgres
        first, then the Redis mirror."""
        provider, key, label = checked(body, self.providers)
        ring = self._sealing_ring()
        try:
            async with self.pool.acquire() as conn:
                async with conn.transaction():
                    await self._known(conn, account)
                    await lock_accounts(conn, [account])
                    existing = await conn.fetchval(
                        "SELECT id FROM llm_keys WHERE account_id = $1 AND provider = $2", account, provider
                    )
                    record_id = existing or "lk_" + secrets.token_hex(12)
                    kid, nonce, sealed = ring.seal(key, associated_data(account, provider, record_id))
                    if existing is None:
                        row = await conn.fetchrow(
                            "INSERT INTO llm_keys (id, account_id, provider, label, last4, master_key_id,"
                            f" nonce, sealed) VALUES ($1, $2, $3, $4, $5, $6, $7, $8) RETURNING {_VIEW}",
                            record_id,
                            account,
                            provider,
                            label,
                            key[-4:],
                            kid,
                            nonce,
                            sealed,
                        )
                    else:
                        row = await conn.fetchrow(
                            "UPDATE llm_keys SET label = $2, last4 = $3, master_key_id = $4, nonce = $5,"
                            f" sealed = $6, updated_at = now() WHERE id = $1 RETURNING {_VIEW}",
                            record_id,
                            label,
                            key[-4:],
                            kid,
                            nonce,
                            sealed,
                        )
                await sync_accounts(conn, self.redis, self.keys, [account])
        finally:
            self.forget(account)
        return view(row), existing is None

    async def list(self, account: str) -> list[dict[str, Any]]:
        async with self.pool.acquire() as conn:
            await self._known(conn, account)
            rows = await conn.fetch(
                f"SELECT {_VIEW} FROM llm_keys WHERE account_id = $1 ORDER BY provider", account
            )
        return [view(row) for row in rows]

    async def delete(self, account: str, record_id: str) -> dict[str, Any]:
        """Remove the record; Postgres first, then Redis. A DELETE of a record already gone (say, one
        whose Redis write failed) still writes the account's mirror again, then answers 404."""
        try:
            async with self.pool.acquire() as conn:
                async with conn.transaction():
                    await self._known(conn, account)
                    await lock_accounts(conn, [account])
                    gone = await conn.fetchval(
                        "DELETE FROM llm_keys WHERE account_id = $1 AND id = $2 RETURNING id",
                        account,
                        record_id,
                    )
                await sync_accounts(conn, self.redis, self.keys, [account])
        finally:
            self.forget(account)
        if gone is None:
            raise NotFound(f"No provider key with this id on account {account!r}.", param="id")
        return {"object": "llm_key", "id": record_id, "deleted": True}
