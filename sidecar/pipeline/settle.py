"""Stage 4, settlement: the hold released and the charge debited, once, with the ledger entry in the
same Lua step; a cached answer stored with it, and so is an Idempotency-Key's answer (or its claim
released when there is none to store).

A settle Redis refuses is sent again by the retry policy (it is idempotent by request id: a retry cannot
charge twice); one that still fails is kept and sent again in the background (settlements.py), never
dropped. The handler calls `settle` exactly once per held request; a cache hit is `record_hit`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from redis.exceptions import RedisError

from ..balances import Balances, Settlement
from ..cache import CachedResponse, ResponseCache
from ..errors import UnknownAccount, WindowClosed
from ..idempotency import IdempotentAnswer, Replays
from ..outbox import UsageEvent
from ..pricing import Usage
from ..settlements import PendingSettlement, PendingSettlements
from .admit import Admission
from .outcome import Verdict
from .retry import Retry

log = logging.getLogger("creditgate.settle")


@dataclass(frozen=True, slots=True)
class Stored:
    """An answer to keep in the cache, and its encoding."""

    entry: CachedResponse
    encoded: bytes


def ledger_entry(
    adm: Admission,
    provider: str,
    outcome: str,
    usage: Usage | None,
    *,
    hold: int,
    saved: int | None = None,
    cost: int | None = None,
    attempts: int = 0,
) -> UsageEvent:
    """The outbox entry (the future ledger row) of a request: `provider` the upstream that served (the
    last one tried), `cost` what its provider charges (None: unknown), `attempts` the upstream calls."""
    usage = usage or Usage()
    return UsageEvent(
        route=adm.route.kind,
        model=adm.price.model,
        provider=provider,
        key_source=adm.key_source,
        multiplier=f"{adm.multiplier.numerator}/{adm.multiplier.denominator}",
        prompt_tokens=usage.prompt_tokens,
        cached_tokens=usage.cached_tokens,
        completion_tokens=usage.completion_tokens,
        hold=hold,
        saved=saved,
        outcome=outcome,
        started_ms=adm.started_ms,
        settled_ms=int(time.time() * 1000),
        key_id=adm.key_id,
        user=adm.end_user,
        tags=list(adm.tags) or None,
        cost=cost,
        attempts=attempts,
        upstream_model=adm.upstream_model,
        marked_up=adm.marked_up,
    )


class Settler:
    def __init__(
        self,
        balances: Balances,
        cache: ResponseCache | None,
        *,
        cache_ttl_seconds: int,
        retry: Retry,
        replays: Replays,
    ) -> None:
        self.balances = balances
        self.cache = cache
        self.replays = replays
        self.cache_ttl_ms = cache_ttl_seconds * 1000
        self.retry = retry
        self.pending = PendingSettlements(balances)  # settlements Redis has not taken yet

    async def settle(
        self,
        adm: Admission,
        provider: str,
        verdict: Verdict,
        stored: Stored | None,
        replay: IdempotentAnswer | None = None,
        *,
        attempts: int = 1,
    ) -> tuple[Settlement | None, Stored | None]:
        """Debit `verdict.charge` and release the hold; returns the settlement (None when Redis did not
        take it: it is then queued) and the cache entry that was stored (None if none was). `replay` is
        the Idempotency-Key's answer to store (stored when the settlement is returned); `attempts` the
        upstream calls made."""
        if verdict.uncapped > verdict.charge:  # usage no real request has: billed at the ceiling
            log.error(
                "request %s reported usage costing %d micro-credits; charged the ceiling of %d",
                adm.request_id,
                verdict.uncapped,
                verdict.charge,
            )
        event = ledger_entry(
            adm, provider, verdict.label, verdict.usage, hold=adm.hold, cost=verdict.cost, attempts=attempts
        )
        store = None  # an account-scope entry: stored by the settle script, in the account's slot
        if stored is not None and adm.cache is not None and adm.cache.colocated:
            store = (adm.cache.key, stored.encoded, self.cache_ttl_ms)
        settlement, idempotency = None, self._idempotency(adm, replay)
        # one window end for every try, here and in the background: from the first try (never before the
        # request's start, whose window its reserve carried), so the marker outlives each try's window
        window_end_ms = self.balances.window_end(max(int(time.time() * 1000), adm.started_ms))
        started = time.monotonic()
        tries = 0
        while True:
            tries += 1
            try:
                settlement = await self.balances.settle(
                    adm.account,
                    adm.request_id,
                    verdict.charge,
                    event,
                    cache_entry=store,
                    window_end_ms=window_end_ms,
                    idempotency=idempotency,
                )
                break
            except WindowClosed:  # only with clocks far apart: the background retry writes the ledger row
                log.error("settle of %s reached Redis after its window", adm.request_id)
                break
            except RedisError as exc:  # idempotent by request id: retrying cannot charge twice
                log.warning("settle of %s failed (attempt %d): %r", adm.request_id, tries, exc)
            except UnknownAccount:  # accounts are never deleted: Redis lost it, and is not rebuilt yet
                log.error(
                    "settle of %s: account %s is missing from Redis (lost?); kept until it is rebuilt",
                    adm.request_id,
                    adm.account,
                )
                break
            pause = self.retry.pause(tries, started, time.monotonic())
            if pause is None:
                break
            await asyncio.sleep(pause)
        if settlement is None:  # kept, and sent again in the background until Redis takes it
            log.error(
                "settle of %s (%d micro-credits) failed; kept and retried in the background",
                adm.request_id,
                verdict.charge,
            )
            self.pending.add(
                PendingSettlement(adm.account, adm.request_id, verdict.charge, event, window_end_ms)
            )
            return None, None
        if stored is not None and store is None and adm.cache is not None and self.cache is not None:
            try:  # a shared-scope entry, outside the settle script's slot
                await self.cache.put(adm.cache.key, stored.encoded)
            except RedisError as exc:  # the answer is served all the same; only the entry is lost
                log.warning("storing the cache entry of %s failed: %r", adm.request_id, exc)
                stored = None
        if settlement.first and verdict.charge > adm.hold:  # the overdraft is in the ledger row too
            log.warning(
                "request %s on %s cost %d, above its hold of %d",
                adm.request_id,
                adm.account,
                verdict.charge,
                adm.hold,
            )
        return settlement, stored

    async def record_hit(
        self,
        adm: Admission,
        provider: str,
        outcome: str,
        usage: Usage,
        saved: int,
        replay: IdempotentAnswer | None = None,
    ) -> Settlement:
        """A cache hit: nothing held, nothing charged; recorded as a zero-charge ledger entry with what it
        saved (and no settled marker: it moved no money, and its ledger row is written once by request
        id), its Idempotency-Key's answer `replay` stored with it. Raises UnknownAccount when the account
        is gone."""
        event = ledger_entry(adm, provider, outcome, usage, hold=0, saved=saved, cost=0)
        idempotency = self._idempotency(adm, replay)
        return await self.balances.settle(
            adm.account, adm.request_id, 0, event, record=True, idempotency=idempotency
        )

    def _idempotency(self, adm: Admission, replay: IdempotentAnswer | None) -> tuple[str, bytes, int] | None:
        """The Idempotency-Key's part of a settle: store `replay`, or (None) release the claim."""
        return self.replays.stored(adm.idempotency, replay) if adm.idempotency is not None else None
