"""Stage 2, the hold: the worst case reserved in Redis, or a cached answer instead.

One reserve script looks the answer up (account scope; an Idempotency-Key's stored answer first) and
takes the hold in the same round trip. Identical cacheable requests in flight in this process wait for the
first one's answer (single flight), and so do requests with one Idempotency-Key (idempotency.py).
A reserve whose answer was lost is sent again (idempotent by request id); the reserve's refusals become
the errors the client sees. With `fit_output` a request the balance cannot cover at its output limit is
lowered to what it does cover, when at least `afford_min_output_tokens` fit.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass

from redis.exceptions import RedisError

from ..balances import Balances, Reservation, ReserveStatus
from ..cache import CachedResponse, ResponseCache
from ..cachekey import BYPASS
from ..errors import (
    Conflict,
    InsufficientCredits,
    Unauthorized,
    UnknownAccount,
    WindowClosed,
)
from ..idempotency import Replays, in_progress
from ..refusals import refusal
from ..wallet import cap_scopes
from .admit import Admission
from .replay import Replay, ReplayFlight, land_replay, lead_or_wait, replayed
from .retry import Retry

log = logging.getLogger("creditgate.hold")
Flight = asyncio.Future[CachedResponse | None]


@dataclass(frozen=True, slots=True)
class HoldPolicy:
    hold_lease_seconds: int
    top_up_url: str | None
    afford_min_output_tokens: int
    retry: Retry


@dataclass(slots=True)
class HoldNotes:
    """What the hold stage learnt, kept even when it raises: the cache's part, and time spent waiting on
    another request's upstream call (not our own work)."""

    cache_result: str  # hit, collapsed, miss, bypass, off, or replay (answered for an Idempotency-Key)
    waited: float = 0.0

    @classmethod
    def of(cls, adm: Admission) -> HoldNotes:
        return cls("off" if adm.cache is None else ("bypass" if adm.cache is BYPASS else "miss"))


@dataclass(frozen=True, slots=True)
class Hit:
    """Answered from cache: no hold was taken."""

    entry: CachedResponse
    collapsed: bool  # the answer of an identical request in flight, not a stored one
    replay_flight: ReplayFlight | None = None  # the Idempotency-Key flight this request leads


@dataclass(frozen=True, slots=True)
class Held:
    """The worst case is held: go upstream with `admission` (its output limit may have been lowered)."""

    admission: Admission
    flight: Flight | None  # the single flight this request leads, to land once it is answered
    replay_flight: ReplayFlight | None = None  # the Idempotency-Key flight it leads, likewise


class Holder:
    def __init__(
        self, balances: Balances, cache: ResponseCache | None, policy: HoldPolicy, replays: Replays
    ) -> None:
        self.balances = balances
        self.cache = cache
        self.policy = policy
        self.replays = replays

    async def plan_cache(self, adm: Admission, body: bytes, headers: Mapping[str, str]) -> Admission:
        """The admission with the cache's part planned (`body` keyed: the client's own). A body big enough
        to be keyed off the loop is keyed only for an account with credits available: keying is real
        work, and an account with nothing available gets its 402 first (free work is never refused)."""
        if self.cache is None:
            return adm

        async def can_pay() -> None:
            if adm.hold <= 0:
                return
            try:
                available = await self.balances.available(adm.account)
            except UnknownAccount:
                raise Unauthorized("The account behind this key no longer exists.") from None
            if available <= 0:
                raise self._insufficient(adm, available)

        plan = await self.cache.plan(
            adm.route.kind,
            adm.request,
            adm.price.model,
            body,
            adm.account,
            headers.get("Cache-Control"),
            adm.any_own_key,
            headers,
            before_keying=can_pay,
        )
        return dataclasses.replace(adm, cache=plan)

    async def hold(self, adm: Admission, notes: HoldNotes) -> Hit | Held | Replay:
        """A stored answer, or the hold taken; raises the reserve's refusals (402, 401, 409, 503). A
        request with an Idempotency-Key another request in this process is answering waits for it."""
        replay, own = await lead_or_wait(self.replays, adm, notes)
        if replay is not None:
            return replay
        try:
            got = await self._hold(adm, notes, own)
        except BaseException:
            land_replay(self.replays, adm, own, None)
            raise
        if isinstance(got, Replay):
            land_replay(self.replays, adm, own, got.answer)
        return got

    async def _hold(
        self, adm: Admission, notes: HoldNotes, replay: ReplayFlight | None
    ) -> Hit | Held | Replay:
        plan, cache = adm.cache, self.cache
        if plan is None or cache is None or not plan.lookup:
            held, reservation = await self._reserve_checked(adm, None, notes)
            return replayed(self.replays, adm, reservation, notes) or Held(held, None, replay)
        leader, flight = cache.lead_or_join(plan.digest)
        own: Flight | None = flight if leader else None
        try:
            if not leader:
                waiting = time.perf_counter()
                try:
                    answer = await cache.wait(flight)
                finally:
                    notes.waited += time.perf_counter() - waiting
                if answer is not None:
                    notes.cache_result = "collapsed"
                    return Hit(answer, collapsed=True, replay_flight=replay)
                # The first request got no storable answer (or took too long): go upstream ourselves.
            if not plan.colocated:
                answer = await cache.get(plan.key)
                if answer is not None:
                    return self._hit(adm, own, answer, notes, replay)
            held, reservation = await self._reserve_checked(adm, plan.key if plan.colocated else None, notes)
            answered = replayed(self.replays, adm, reservation, notes)
            if answered is not None:
                self.land(adm, own, None)
                return answered
            if reservation.status is ReserveStatus.CACHED:
                answer = cache.decode(reservation.cached)
                if answer is not None:
                    return self._hit(adm, own, answer, notes, replay)
                held, _ = await self._reserve_checked(adm, None, notes)  # an entry this version can't read
            if held.cache is None:  # lowered to fit the balance: never cached, the waiters go on alone
                self.land(adm, own, None)
                own = None
            cache.stats.misses += 1
            return Held(held, own, replay)
        except BaseException:
            self.land(adm, own, None)
            raise

    def land(self, adm: Admission, flight: Flight | None, answer: CachedResponse | None) -> None:
        """End the single flight this request leads, handing its waiters `answer` (None: go upstream)."""
        if flight is not None and adm.cache is not None and self.cache is not None:
            self.cache.land(adm.cache.digest, flight, answer)

    def _hit(
        self,
        adm: Admission,
        own: Flight | None,
        answer: CachedResponse,
        notes: HoldNotes,
        replay: ReplayFlight | None,
    ) -> Hit:
        notes.cache_result = "hit"
        self.land(adm, own, answer)
        return Hit(answer, collapsed=False, replay_flight=replay)

    async def _reserve_checked(
        self, adm: Admission, cache_key: str | None, notes: HoldNotes
    ) -> tuple[Admission, Reservation]:
        """Reserve (looking `cache_key` up in the same step), lowering the output limit to fit when asked;
        the refusals become errors."""
        reservation = await self._reserve(adm, cache_key)
        if reservation.status is ReserveStatus.INSUFFICIENT:
            lowered = self._lowered(adm, reservation.available)
            if lowered is not None:
                notes.cache_result = "bypass"
                adm = lowered
                reservation = await self._reserve(adm, None)
        if reservation.status is ReserveStatus.INSUFFICIENT:
            raise self._insufficient(adm, reservation.available)
        refused = refusal(reservation, adm.account)  # blocked, capped, or the account gone
        if refused is not None:
            raise refused
        if reservation.status is ReserveStatus.ALREADY_SETTLED:
            raise Conflict("This request id was already settled.")
        if reservation.status is ReserveStatus.IN_PROGRESS:
            raise in_progress()
        if reservation.status is ReserveStatus.WINDOW_CLOSED:  # only with clocks far apart
            log.error(
                "reserve of %s reached Redis after its window; is this host's clock right?", adm.request_id
            )
            raise WindowClosed(adm.request_id)
        return adm, reservation

    def _lowered(self, adm: Admission, available: int) -> Admission | None:
        """With fit_output: the request lowered to the output limit `available` affords, when at least
        afford_min_output_tokens fit and that is less than it asked for."""
        if not adm.fit_output or not adm.route.has_output:
            return None
        fits = adm.affordable(available)
        if fits >= adm.output_limit or fits < self.policy.afford_min_output_tokens:
            return None
        return adm.lowered_to(fits)

    def _insufficient(self, adm: Admission, available: int) -> InsufficientCredits:
        """The 402: what was required and available, and how many output tokens the latter affords."""
        if not adm.route.has_output:
            return InsufficientCredits(available, adm.hold, self.policy.top_up_url)
        return InsufficientCredits(
            available,
            adm.hold,
            self.policy.top_up_url,
            output_limit=adm.output_limit,
            affordable_output_tokens=adm.affordable(available),
        )

    async def _reserve(self, adm: Admission, cache_key: str | None) -> Reservation:
        """The reserve script, sent again while its answer is lost, by the retry policy (idempotent by
        request id: a hold an earlier try took is found, not taken twice). If it still fails, any hold it
        may have taken is released at once (a settle of nothing), and the error goes on (a 503). Every try
        carries the window end from the request's start: one landing later is refused by Redis."""
        now_ms = int(time.time() * 1000)
        lease_end_ms = now_ms + self.policy.hold_lease_seconds * 1000
        window_end_ms = self.balances.window_end(adm.started_ms)
        started = time.monotonic()
        tries = 0
        while True:
            tries += 1
            try:
                return await self.balances.reserve(
                    adm.account,
                    adm.request_id,
                    adm.hold,
                    lease_end_ms,
                    cache_key=cache_key,
                    window_end_ms=window_end_ms,
                    scopes=cap_scopes(adm.key_id, adm.price.model, adm.end_user),
                    idempotency_key=adm.idempotency.key if adm.idempotency else None,
                )
            except RedisError as exc:
                pause = self.policy.retry.pause(tries, started, time.monotonic())
                if pause is None:
                    log.warning(
                        "reserve of %s failed (attempt %d, %r); giving up", adm.request_id, tries, exc
                    )
                    # its marker outlives every try's window: a try landing late finds it, or is refused
                    late = self.balances.window_end(max(int(time.time() * 1000), adm.started_ms))
                    release = self.replays.stored(adm.idempotency, None) if adm.idempotency else None
                    with contextlib.suppress(RedisError, UnknownAccount, WindowClosed):
                        await self.balances.settle(
                            adm.account, adm.request_id, 0, window_end_ms=late, idempotency=release
                        )
                    raise
                log.warning("reserve of %s failed (attempt %d, %r); retrying", adm.request_id, tries, exc)
            await asyncio.sleep(pause)
