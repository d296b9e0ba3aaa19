"""Failed sign-ins counted per client address in Redis, in fixed windows of the app's clock: at most
`portal_signin_attempts` in each `portal_signin_window_seconds`. The address is `request.remote` (the
peer of the connection; the sidecar has no notion of a trusted proxy, so behind one every client shares
the proxy's address).

Each sign-in attempt reserves a count first (INCR, and PEXPIRE NX for a new window's key, in one
MULTI on one key): one past the limit is refused without the secret being checked, so a burst of
attempts at once cannot run past the limit either. A sign-in that succeeds gives its count back; it
touches no other address's count."""

from __future__ import annotations

from dataclasses import dataclass

from ..keys import KeySpace
from ..redis_client import RedisClient

MAX_ADDRESS_CHARS = 64  # an IPv6 address with a zone fits; anything longer is cut


@dataclass(frozen=True, slots=True)
class Attempt:
    """One reserved attempt: its key, the count it made, and when its window ends (the app's ms)."""

    key: str
    count: int
    ends_ms: int


class SignInAttempts:
    def __init__(self, redis: RedisClient, keys: KeySpace, limit: int, window_seconds: int) -> None:
        self.redis, self.keys, self.limit, self.window_ms = redis, keys, limit, window_seconds * 1000

    def _key(self, address: str | None, now_ms: int) -> tuple[str, int]:
        window = now_ms // self.window_ms
        name = self.keys.portal_signin((address or "unknown")[:MAX_ADDRESS_CHARS], window)
        return name, (window + 1) * self.window_ms

    async def _add(self, key: str, by: int) -> int:
        async with self.redis.pipeline(transaction=True) as pipe:  # one key: one slot
            pipe.incrby(key, by)
            pipe.pexpire(key, self.window_ms, nx=True)
            count, _ = await pipe.execute()
        return int(count)

    async def reserve(self, address: str | None, now_ms: int) -> Attempt:
        """Count an attempt from `address` (see `limited`)."""
        key, ends_ms = self._key(address, now_ms)
        return Attempt(key, await self._add(key, 1), ends_ms)

    def limited(self, attempt: Attempt) -> bool:
        """Whether the attempt is past the limit: refuse it, check nothing."""
        return attempt.count > self.limit

    @staticmethod
    def retry_after(attempt: Attempt, now_ms: int) -> int:
        """Whole seconds until the attempt's window ends (at least 1)."""
        return max(1, -(-(attempt.ends_ms - now_ms) // 1000))

    async def succeeded(self, attempt: Attempt) -> None:
        """The attempt signed in: it was no failure, its count goes back."""
        await self._add(attempt.key, -1)

    async def failures(self, address: str | None, now_ms: int) -> int:
        """The failed attempts from `address` in the window of `now_ms`."""
        raw = await self.redis.get(self._key(address, now_ms)[0])
        return int(raw) if raw is not None else 0
