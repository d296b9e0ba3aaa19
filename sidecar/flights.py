"""Single flight: the first of several concurrent requests for one key in this process leads (does the
work); the others wait for its result. The response cache keys flights on a request's digest, the
idempotency store on its Idempotency-Key."""

from __future__ import annotations

import asyncio
from typing import Generic, TypeVar

T = TypeVar("T")


class Flights(Generic[T]):
    def __init__(self) -> None:
        self._flights: dict[str, asyncio.Future[T | None]] = {}
        self.waiting = 0  # requests waiting now for a leader's result

    def lead_or_join(self, key: str) -> tuple[bool, asyncio.Future[T | None]]:
        """(True, flight) when this request leads the flight for `key`, (False, flight) to wait on."""
        flight = self._flights.get(key)
        if flight is not None:
            return False, flight
        flight = asyncio.get_running_loop().create_future()
        self._flights[key] = flight
        return True, flight

    def land(self, key: str, flight: asyncio.Future[T | None], result: T | None) -> None:
        """End a flight with the result its waiters get (None: they do the work themselves)."""
        if self._flights.get(key) is flight:
            del self._flights[key]
        if not flight.done():
            flight.set_result(result)

    async def wait(self, flight: asyncio.Future[T | None], seconds: float) -> T | None:
        """The leader's result, or None when it has none or it takes longer than `seconds`."""
        self.waiting += 1
        try:
            async with asyncio.timeout(seconds):
                return await asyncio.shield(flight)
        except TimeoutError:
            return None
        finally:
            self.waiting -= 1
