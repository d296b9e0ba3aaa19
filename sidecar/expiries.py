"""The money scripts that release what time ended: holds whose lease ran out (the reaper's) and grants
whose date or idle expiry came (the wallet sweeper's). A mixin of `Balances`, which runs the scripts."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from redis.commands.core import AsyncScript

from .keys import AccountKeys, KeySpace, as_text
from .redis_client import RedisClient
from .wallet import WalletPolicy

log = logging.getLogger("creditgate.expiries")


class Expiries:
    redis: RedisClient
    keys: KeySpace
    wallet: WalletPolicy
    _expire: AsyncScript
    _expire_grants: AsyncScript

    async def renew(self, holds: Sequence[tuple[str, str]], lease_end_ms: int) -> None:
        """Extend the leases of live holds, given as (account, request id), in one pipelined round trip
        (each only if it is still held, and only forward: ZADD XX GT, so running it twice is harmless)."""
        if not holds:
            return
        async with self.redis.pipeline(transaction=False) as pipe:
            for account, request_id in holds:
                k = self.keys.account(account)
                pipe.zadd(k.hold_expiry, {k.expiry_member(request_id): lease_end_ms}, xx=True, gt=True)
            await pipe.execute()

    async def _call(self, name: str, script: AsyncScript, keys: list[Any], args: list[Any]) -> Any:
        raise NotImplementedError

    async def expire_hold(self, account: str, request_id: str, now_ms: int, *, orphan: bool = False) -> int:
        """Release one hold whose lease ended before `now_ms` (the reaper's script); returns the amount
        released (0: renewed, or gone already). With `orphan` (a hold with no hold-expiry member, which
        no reaper would ever find), an expiry member ending at 0 is added first, unless one exists (ZADD
        NX): a live hold that got a member meanwhile keeps its lease. Both steps are idempotent."""
        k = self.keys.account(account)
        member = k.expiry_member(request_id)
        if orphan:
            await self.redis.zadd(k.hold_expiry, {member: 0}, nx=True)
        released = await self._call(
            "expire_hold", self._expire, self._reap_keys(k), [request_id, member, now_ms]
        )
        return int(released)

    @staticmethod
    def _reap_keys(k: AccountKeys) -> list[str]:
        return [k.balance, k.holds, k.hold_expiry, k.cap_held, k.hold_scopes]

    async def _due(self, zset_of: Callable[[int], str], now_ms: int, limit: int) -> AsyncIterator[str]:
        """The members of each partition's zset `zset_of(partition)` scored up to `now_ms` (at most `limit`
        a partition), read a partition at a time; the scripts run on them check again."""
        for partition in range(self.keys.partitions):
            members = await self.redis.zrangebyscore(zset_of(partition), "-inf", now_ms, start=0, num=limit)
            for member in members:
                assert isinstance(member, bytes | str)
                yield as_text(member)

    async def expire_holds(self, now_ms: int, limit: int = 500) -> int:
        """Release holds whose lease ended before `now_ms`; returns how many micro-credits were released."""
        released = 0
        async for member in self._due(self.keys.hold_expiry, now_ms, limit):
            account, _, request_id = member.partition(" ")
            keys = self._reap_keys(self.keys.account(account))
            released += int(await self._call("expire_hold", self._expire, keys, [request_id, member, now_ms]))
        return released

    async def expire_grants(self, now_ms: int | None = None, limit: int = 500) -> int:
        """Expire the grants that ended by `now_ms` (default the wallet's clock) on every account due in
        the wallet-due zsets; returns the micro-credits expired. Idempotent: an expired grant is gone."""
        now = self.wallet.clock() if now_ms is None else now_ms
        expired = 0
        async for account in self._due(self.keys.wallet_due, now, limit):
            k = self.keys.account(account)
            keys = [k.balance, k.grants, k.wallet_due, k.outbox]
            args = [k.account, now, self.wallet.idle_expiry_ms]
            expired += int(await self._call("expire_grants", self._expire_grants, keys, args))
        return expired

    async def sweep(self) -> None:
        """The wallet sweeper's step (a background task): expire what ended, and say how much."""
        expired = await self.expire_grants()
        if expired:
            log.info("expired %d micro-credits of grants", expired)
