"""The response cache: what a request may do with it, its entries in Redis, and single flight.

Entries are msgpack records (body bytes, a few provider headers, the usage that produced them, when they
were stored) kept in Redis with a TTL. With the default account scope an entry lives in the account's
hash slot, so ``reserve.lua`` looks it up in the same round trip that takes the hold and ``settle.lua``
stores it in the same round trip that settles: a miss costs no extra round trip. A shared-scope entry
lives outside any account's slot and takes one command of its own each way.

Single flight: the first of several concurrent identical cacheable requests in this process leads (goes
upstream); the others wait for its answer (up to ``cache_wait_seconds``) and are served it as a hit. If
the leader gets no storable answer, the waiters go upstream themselves, and are charged only for that.

Keying: a body up to ``KEY_INLINE_BYTES`` is keyed on the event loop (tens of microseconds, a couple of
milliseconds at worst); a larger one (up to ``cache_max_request_bytes``) in the cache's one key-worker
thread, after the caller's ``before_keying`` check, so the loop goes on serving while it is hashed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import msgspec
from multidict import CIMultiDictProxy

from .cachekey import BYPASS, SHARED_SCOPE, CachePlan, account_scope, cache_key, cacheable, client_directives
from .config import Settings
from .flights import Flights
from .headers import HeaderNames, answer_headers
from .keys import KeySpace
from .pricing import Usage
from .redis_client import RedisClient
from .upstream import forwarded_extra
from .wire import MeteredRequest

# Provider headers worth replaying; everything else is per call (ids, dates, rate limits, cookies).
KEPT_HEADERS = ("content-type", "openai-model", "openai-version")
# Larger request bodies are keyed in the key worker, off the event loop (see bench/cache_lookup.py).
KEY_INLINE_BYTES = 16 * 1024


class CachedResponse(msgspec.Struct, array_like=True):
    body: bytes  # the whole JSON body, or every SSE event as the upstream sent it (usage chunk included)
    stream: bool
    headers: list[tuple[str, str]]
    stored_ms: int
    expires_ms: int
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int

    @property
    def usage(self) -> Usage:
        return Usage(self.prompt_tokens, self.completion_tokens, self.cached_tokens)


_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder(CachedResponse).decode


@dataclass
class CacheStats:
    """What only the cache sees (hits, saved credits and bypasses are in the request metrics)."""

    misses: int = 0  # cacheable requests that went upstream
    collapsed: int = 0  # served a concurrent identical request's answer
    too_large: int = 0  # answers not stored for their size
    waiting: int = 0  # requests waiting now for an identical request's answer


@dataclass(frozen=True, slots=True)
class CachePolicy:
    """The settings the cache reads."""

    ttl_ms: int
    max_entry_bytes: int
    max_request_bytes: int
    routes: frozenset[str]
    shared: bool
    forwarded: HeaderNames  # forwarded headers that can change an answer (the shared scope keys on them)
    wait_seconds: float

    @classmethod
    def of(cls, settings: Settings) -> CachePolicy:
        return cls(
            ttl_ms=settings.cache_ttl_seconds * 1000,
            max_entry_bytes=settings.cache_max_entry_bytes,
            max_request_bytes=settings.cache_max_request_bytes,
            routes=frozenset(settings.cache_routes),
            shared=settings.cache_scope == "shared",
            forwarded=forwarded_extra(settings),
            wait_seconds=settings.cache_wait_seconds,
        )


class ResponseCache:
    def __init__(self, policy: CachePolicy, redis: RedisClient, keys: KeySpace) -> None:
        self.redis = redis
        self.keys = keys
        self.ttl_ms = policy.ttl_ms
        self.max_entry_bytes = policy.max_entry_bytes
        self.max_request_bytes = policy.max_request_bytes
        self.routes = policy.routes
        self.shared = policy.shared
        self.forwarded = policy.forwarded
        self.wait_seconds = policy.wait_seconds
        self.stats = CacheStats()
        self._flights = Flights[CachedResponse]()
        # One thread: keying is CPU work under the GIL, so more threads would only take turns with the
        # event loop's thread more often; one leaves the loop every other turn at least.
        self._keyer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="creditgate-cache-key")

    def close(self) -> None:
        self._keyer.shutdown(wait=False, cancel_futures=True)

    # ---- deciding ----------------------------------------------------------------------------------

    async def plan(
        self,
        route_kind: str,
        request: MeteredRequest,
        model: str,
        body: bytes,
        account: str,
        cache_control: str | None,
        byok: bool = False,
        headers: Mapping[str, str] | None = None,
        before_keying: Callable[[], Awaitable[None]] | None = None,
    ) -> CachePlan:
        """The shared scope holds only pooled answers, keyed on every forwarded header that can change
        them: an answer got with a caller's own key (BYOK) is kept in, and looked up from, the
        account's own scope, so no account can serve another one an answer it shaped.

        A body above KEY_INLINE_BYTES is keyed in the key worker, once `before_keying` (a cheap check
        that may raise) has passed."""
        if route_kind not in self.routes or not cacheable(route_kind, request.temperature, request.n):
            return BYPASS
        if len(body) > self.max_request_bytes:  # never keyed: its key would decode the whole body
            return BYPASS
        directives = client_directives(cache_control)
        if not directives.store:
            return BYPASS
        if not directives.lookup:
            self.stats.misses += 1  # no-cache: straight upstream (the lookup path counts its own misses)
        shared = self.shared and not byok
        scope = account_scope(account)
        if shared:
            varying = answer_headers(headers or {}, self.forwarded)
            scope = SHARED_SCOPE + ("\n" + msgspec.json.encode(varying).decode() if varying else "")
        if len(body) <= KEY_INLINE_BYTES:
            digest = cache_key(route_kind, model, body, scope)
        else:
            if before_keying is not None:
                await before_keying()
            loop = asyncio.get_running_loop()
            digest = await loop.run_in_executor(self._keyer, cache_key, route_kind, model, body, scope)
        key = self.keys.shared_cache(digest) if shared else self.keys.account(account).cache(digest)
        return CachePlan(
            forward="miss" if directives.lookup else "request",
            lookup=directives.lookup,
            store=True,
            digest=digest,
            key=key,
            colocated=not shared,
        )

    # ---- entries -----------------------------------------------------------------------------------

    def entry(
        self, body: bytes, *, stream: bool, headers: CIMultiDictProxy[str], usage: Usage, now_ms: int
    ) -> tuple[CachedResponse, bytes] | None:
        """The entry for a complete answer and its encoding, or None when it is over the size cap."""
        if len(body) > self.max_entry_bytes:
            self.stats.too_large += 1
            return None
        kept = [(name, headers[name]) for name in KEPT_HEADERS if name in headers]
        entry = CachedResponse(
            body,
            stream,
            kept,
            now_ms,
            now_ms + self.ttl_ms,
            usage.prompt_tokens,
            usage.cached_tokens,
            usage.completion_tokens,
        )
        encoded = _encode(entry)
        if len(encoded) > self.max_entry_bytes:
            self.stats.too_large += 1
            return None
        return entry, encoded

    @staticmethod
    def decode(value: bytes | None) -> CachedResponse | None:
        """An entry read back; None for one this version cannot read (it is then treated as a miss)."""
        if value is None:
            return None
        try:
            return _decode(value)
        except msgspec.MsgspecError:
            return None

    async def get(self, key: str) -> CachedResponse | None:
        """A shared-scope lookup (account-scoped ones happen inside the reserve script)."""
        value = await self.redis.get(key)
        return self.decode(value if isinstance(value, bytes) else None)

    async def put(self, key: str, encoded: bytes) -> None:
        """A shared-scope store (account-scoped ones happen inside the settle script)."""
        await self.redis.set(key, encoded, px=self.ttl_ms)

    # ---- single flight -----------------------------------------------------------------------------

    def lead_or_join(self, digest: str) -> tuple[bool, asyncio.Future[CachedResponse | None]]:
        """(True, flight) when this request leads the flight for `digest`, (False, flight) to wait on."""
        return self._flights.lead_or_join(digest)

    def land(
        self, digest: str, flight: asyncio.Future[CachedResponse | None], entry: CachedResponse | None
    ) -> None:
        """End a flight with the answer its waiters may be served (None: they go upstream themselves)."""
        self._flights.land(digest, flight, entry)

    async def wait(self, flight: asyncio.Future[CachedResponse | None]) -> CachedResponse | None:
        """The leader's answer, or None when it has none or it takes longer than cache_wait_seconds."""
        self.stats.waiting += 1
        try:
            return await self._flights.wait(flight, self.wait_seconds)
        finally:
            self.stats.waiting -= 1
