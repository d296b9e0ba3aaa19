"""The Redis side of money: reserve, settle, credit and expire holds, each one Lua script, in ``lua/*.lua``
(shipped in the package), registered once, idempotent by an id: a retried call never moves money twice."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import msgspec
from redis.commands.core import AsyncScript

from .autopipeline import AutoPipeline
from .balance_views import AccountBalance as AccountBalance
from .balance_views import HoldView as HoldView
from .cluster_pipeline import ClusterAutoPipeline
from .credit_lines import AVAILABLE, available
from .debits import Debits
from .errors import IdempotencyConflict, NotInitialized, UnknownAccount, WindowClosed
from .expiries import Expiries
from .keys import AccountKeys, KeySpace, as_text
from .money import MAX_CHARGE
from .outbox import UsageEvent, encode_event
from .redis_client import RedisClient
from .replicas import ReplicaWait
from .scripts import CapRefusal, Reservation, ReserveStatus, Settlement, entry_keys, load_lua
from .wallet import GrantTerms, Periods, WalletPolicy, cap_scopes, periods

__all__ = ["Balances", "CapRefusal", "Reservation", "ReserveStatus", "Settlement", "load_lua"]


class Balances(Expiries, Debits):
    def __init__(
        self,
        redis: RedisClient,
        keys: KeySpace,
        *,
        settled_marker_ms: int,
        pipeline: AutoPipeline | ClusterAutoPipeline | None = None,
        replicas: ReplicaWait | None = None,
        wallet: WalletPolicy | None = None,
    ) -> None:
        """`pipeline`, when given, carries the script calls (the request path's); `redis` the rest.
        `settled_marker_ms`: the window of a reserve (from its request's start) and of a settle (from
        its first try), the most a settled marker lives; see `window_end`. `replicas`: WAIT after each
        settle on the pipeline (replicas.py)."""
        self.redis = redis
        self.pipeline = pipeline
        self.replicas = replicas
        self.keys = keys
        self.settled_marker_ms = settled_marker_ms
        self.wallet = wallet or WalletPolicy(idle_expiry_ms=30 * 86_400_000)
        self._zones: dict[str, str] = {}  # account -> the time zone its caps follow, learnt from Redis
        self._reserve = redis.register_script(load_lua("reserve"))
        self._settle = redis.register_script(load_lua("settle"))
        self._credit = redis.register_script(load_lua("credit"))
        self._expire = redis.register_script(load_lua("expire_hold"))
        self._fix_held = redis.register_script(load_lua("fix_held"))
        self._expire_grants = redis.register_script(load_lua("expire_grants"))
        self._debit = redis.register_script(load_lua("debit"))
        # (script name, integer nanoseconds) after every script call: the app's metrics.
        self.on_script: Callable[[str, int], None] = lambda script, nanoseconds: None

    async def _call(
        self,
        name: str,
        script: AsyncScript,
        keys: list[Any],
        args: list[Any],
        *,
        retried: bool = False,
        wait: ReplicaWait | None = None,
        account: str = "",
    ) -> Any:
        """Run a script: on the request path's pipeline when there is one (then WAIT, with `wait`), or with
        `retried` on redis-py, which resends it when its reply is lost (the admin's money in has no retry)."""
        started = time.perf_counter_ns()
        try:
            if self.pipeline is not None and not retried:
                text = script.script
                text = text if isinstance(text, str | bytes) else bytes(text)
                if wait is None:
                    return await self.pipeline.evalsha(script.sha, text, keys, args)
                reply, acked = await self.pipeline.evalsha_replicated(
                    script.sha, text, keys, args, wait.replicas, wait.timeout_ms
                )
                wait.check(acked, str(args[0]), account)
                return reply
            return await script(keys=keys, args=args)
        finally:
            self.on_script(name, time.perf_counter_ns() - started)

    def window_end(self, since_ms: int | None = None) -> int:
        """The window end from `since_ms` (default now): Redis refuses what carries it from then on."""
        return (time.time_ns() // 1_000_000 if since_ms is None else since_ms) + self.settled_marker_ms

    async def scripts_loaded(self) -> bool:
        """Whether the server still has every script cached (it forgets them when restarted or flushed)."""
        shas = [s.sha for s in self._scripts]
        return all(shas) and all(await self.redis.script_exists(*shas))

    async def load_scripts(self) -> None:
        """Load every script into the server's cache (also proves Redis is reachable)."""
        for script in self._scripts:
            script.sha = await self.redis.script_load(script.script)

    @property
    def _scripts(self) -> tuple[AsyncScript, ...]:
        return (self._reserve, self._settle, self._credit, self._expire, self._fix_held, self._expire_grants,
                self._debit)  # fmt: skip

    def _periods(self, account: str, now_ms: int) -> Periods:
        return periods(now_ms, self._zones.get(account, ""))

    @staticmethod
    def _wallet_keys(k: AccountKeys, per: Periods) -> list[str]:
        spend = [k.spend("total"), k.spend(per.day_id), k.spend(per.month_id)]
        return [k.caps, k.cap_held, k.hold_scopes, *spend]

    async def reserve(
        self,
        account: str,
        request_id: str,
        amount: int,
        lease_end_ms: int,
        *,
        cache_key: str | None = None,
        window_end_ms: int | None = None,
        scopes: Sequence[str] = (),
        idempotency_key: str | None = None,
    ) -> Reservation:
        """Hold `amount` for the request, within the balance and the spend caps of `scopes` (wallet.
        cap_scopes). With `cache_key` (and `idempotency_key`, first, which the hold claims when absent),
        that entry in the account's slot is looked up first in the same script: when it exists it is
        returned and nothing is held. Caps in a time zone this process had not learnt cost a call, once."""
        k = self.keys.account(account)
        end = str(window_end_ms or self.window_end())
        name = "lookup_reserve" if cache_key or idempotency_key else "reserve"
        now = self.wallet.clock()
        for _ in range(3):
            per = self._periods(account, now)
            keys = [k.balance, k.holds, k.hold_expiry, k.settled(request_id)]
            keys += [k.grants, k.wallet_due, k.outbox, *self._wallet_keys(k, per)]
            keys += entry_keys(cache_key, idempotency_key)
            args = [request_id, amount, lease_end_ms, k.expiry_member(request_id), end, account, now]
            args += [self.wallet.idle_expiry_ms, per.tz, *scopes]
            reply = await self._call(name, self._reserve, keys, args)
            if reply[0] != -6:
                break
            self._learn_zone(account, as_text(reply[3]))
        if reply[0] == ReserveStatus.CACHED:
            return Reservation(ReserveStatus.CACHED, int(reply[4]), 0, cached=reply[1], replay=reply[3] == 15)
        if reply[0] == ReserveStatus.CAPPED:
            scope, period, limit, used = (as_text(v) for v in reply[3:7])
            cap = CapRefusal(scope, period, int(limit), int(used), per.ends_ms(period))
            return Reservation(ReserveStatus.CAPPED, int(reply[1]), int(reply[2]), cap=cap)
        status, balance, held = reply[:3]
        credit = int(reply[3]) if status == ReserveStatus.INSUFFICIENT else 0  # its credit limit
        return Reservation(ReserveStatus(status), int(balance), int(held), credit=credit)

    def _learn_zone(self, account: str, tz: str) -> None:
        self._zones = {} if len(self._zones) > 100_000 else self._zones
        self._zones[account] = tz

    async def settle(
        self,
        account: str,
        request_id: str,
        charge: int,
        event: UsageEvent | None = None,
        *,
        record: bool = False,
        cache_entry: tuple[str, bytes, int] | None = None,
        window_end_ms: int | None = None,
        scopes: Sequence[str] | None = None,
        idempotency: tuple[str, bytes, int] | None = None,
    ) -> Settlement:
        """Release the request's hold and debit `charge` (0 to just release), exactly once. A debit (or,
        with `record`, a zero charge) is appended with its `event` to the outbox in the same step.
        `cache_entry` (key in the account's slot, value, TTL in ms) is stored in that step too, and so is
        `idempotency` (the same; an empty value releases the request's claim on it).

        A charge outside 0..MAX_CHARGE raises ValueError before Redis is called: it is refused, not capped
        here (the request path caps what it prices at MAX_CHARGE and logs it). The script checks its
        arguments again and refuses them before its first write, leaving hold, balance and marker as they
        were. Its marker expires at `window_end_ms` (the same on every retry); Redis then refuses it."""
        if not 0 <= charge <= MAX_CHARGE:
            raise ValueError(f"charge must be between 0 and {MAX_CHARGE} micro-credits, got {charge}")
        entry = msgspec.structs.replace(
            event or UsageEvent(), request_id=request_id, account=account, charge=charge
        )
        if scopes is None:  # the spend counts in the scopes the event names (the request's own)
            scopes = cap_scopes(entry.key_id, entry.model, entry.user)
        call = (account, request_id, charge, encode_event(entry), record, cache_entry, window_end_ms, scopes)
        keys, args = self.settle_call(*call, idempotency)
        reply = await self._call("settle", self._settle, keys, args, wait=self.replicas, account=account)
        status, balance, released, charged = reply
        if status == -1:
            raise UnknownAccount(account)
        if status == -3:
            raise WindowClosed(request_id)
        return Settlement(status == 1, int(balance), int(released), int(charged))

    def settle_call(
        self,
        account: str,
        request_id: str,
        charge: int,
        encoded: bytes,
        record: bool = False,
        cache_entry: tuple[str, bytes, int] | None = None,
        window_end_ms: int | None = None,
        scopes: Sequence[str] = ("account",),
        idempotency: tuple[str, bytes, int] | None = None,
    ) -> tuple[list[str], list[str | int | bytes]]:
        """The settle script's KEYS and ARGV for a settle whose outbox entry is `encoded` (see `settle`)."""
        k = self.keys.account(account)
        now = self.wallet.clock()
        per = self._periods(account, now)
        keys = [k.balance, k.holds, k.hold_expiry, k.settled(request_id), k.outbox, k.grants, k.wallet_due]
        keys += self._wallet_keys(k, per)
        keys += entry_keys(cache_entry and cache_entry[0], idempotency and idempotency[0])
        cached = (cache_entry[1], cache_entry[2]) if cache_entry is not None else ("", 0)
        args: list[str | int | bytes] = [request_id, str(charge), str(window_end_ms or self.window_end())]
        args += [k.expiry_member(request_id), "1" if record else "0", encoded, *cached, account, now]
        args += [self.wallet.idle_expiry_ms, per.day_keep_until_ms, per.month_keep_until_ms]
        args += [idempotency[1], idempotency[2]] if idempotency is not None else []
        return keys, args + list(scopes)

    async def credit(
        self,
        account: str,
        idempotency_key: str,
        amount: int,
        terms: GrantTerms | None = None,
        *,
        grant_id: str | None = None,
    ) -> tuple[bool, int]:
        """Add `amount` as a grant on `terms` (its id `grant_id`, default the idempotency key), once per
        idempotency key; returns (credited now, balance)."""
        if amount <= 0:
            raise ValueError("amount must be > 0")
        t = terms or GrantTerms()
        k = self.keys.account(account)
        now = self.wallet.clock()
        status, balance = await self._call(
            "credit",
            self._credit,
            [k.balance, k.credited(idempotency_key), k.ready, k.grants, k.wallet_due, k.outbox],
            [
                amount,
                f"{account} {amount}",
                account,
                grant_id or idempotency_key,
                t.expires_ms,
                t.drawn_priority,
                t.effective_ms if t.effective_ms is not None else now,
                "1" if t.idle_expiry else "0",
                t.kind,
                self.wallet.idle_expiry_ms,
                now,
            ],
            retried=True,
        )
        if status == -1:
            raise UnknownAccount(account)
        if status == -2:
            raise IdempotencyConflict(idempotency_key)
        if status == -4:
            raise NotInitialized(account)
        return status == 1, int(balance)

    async def mark_ready(self) -> None:
        """Mark every partition as holding the ledger's balances (first start, after a rebuild)."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for partition in range(self.keys.partitions):
                pipe.set(self.keys.ready(partition), "1")
            await pipe.execute()

    async def fix_held(self, account: str) -> tuple[int, int]:
        """Set the account's held total to the sum of its holds; returns (before, after)."""
        k = self.keys.account(account)
        before, after = await self._call("fix_held", self._fix_held, [k.balance, k.holds], [])
        if before == -1:
            raise UnknownAccount(account)
        return int(before), int(after)

    async def available(self, account: str) -> int:
        """Balance less what it holds, plus its credit line (credit_lines.py); raises UnknownAccount."""
        return available(account, await self.redis.hmget(self.keys.account(account).balance, AVAILABLE))

    async def balance(self, account: str) -> AccountBalance:
        k = self.keys.account(account)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hmget(k.balance, ["balance", "held"])
            pipe.hgetall(k.holds)
            (balance, held), holds = await pipe.execute()
        if balance is None:
            raise UnknownAccount(account)
        leases: list[Any] = []  # lease end per hold, in the order of `holds`
        if holds:
            leases = await self.redis.zmscore(k.hold_expiry, [k.expiry_member(as_text(r)) for r in holds])
        views = [
            HoldView(as_text(rid), int(amount), int(lease or 0))
            for (rid, amount), lease in zip(holds.items(), leases, strict=True)
        ]
        return AccountBalance(
            account, int(balance), int(held or 0), sorted(views, key=lambda h: h.request_id)
        )
