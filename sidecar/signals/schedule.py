"""When a delivery is tried again, and when it is given up. Pure: the caller passes `now`.

A failed attempt waits `base` seconds, doubling with each further failure up to `cap`, with jitter (the
delay is between half and all of that, derived from the delivery's id and attempt number: the same
inputs give the same time, so tests and replays are deterministic, while many deliveries failing
together spread out). Retries go on for the whole window (at least 24 h) from the delivery's queueing
(or replay): the last retry is at the window's end, and a failure then gives the delivery up."""

from __future__ import annotations

import datetime as dt
import hashlib
from dataclasses import dataclass
from typing import Literal

Outcome = Literal["delivered", "retry", "failed"]


@dataclass(frozen=True)
class Schedule:
    base_seconds: float = 30.0
    cap_seconds: float = 3600.0
    window: dt.timedelta = dt.timedelta(hours=24)

    def delay(self, delivery_id: int, attempts: int) -> dt.timedelta:
        """The wait after the `attempts`-th failed attempt (1, 2, ...)."""
        full = min(self.cap_seconds, self.base_seconds * 2 ** min(max(attempts - 1, 0), 40))
        return dt.timedelta(seconds=full * (0.5 + 0.5 * jitter(delivery_id, attempts)))

    def after_failure(
        self, delivery_id: int, attempts: int, window_start: dt.datetime, now: dt.datetime
    ) -> dt.datetime | None:
        """The next attempt's time after the `attempts`-th attempt failed at `now`; None: give up."""
        deadline = window_start + self.window
        if now >= deadline:
            return None
        return min(now + self.delay(delivery_id, attempts), deadline)

    def outcome(
        self, ok: bool, delivery_id: int, attempts: int, window_start: dt.datetime, now: dt.datetime
    ) -> tuple[Outcome, dt.datetime | None]:
        """What an attempt makes of the delivery: delivered, retried at the time given, or failed."""
        if ok:
            return "delivered", None
        later = self.after_failure(delivery_id, attempts, window_start, now)
        return ("retry", later) if later is not None else ("failed", None)


def jitter(delivery_id: int, attempts: int) -> float:
    """A fraction in [0, 1), the same for the same delivery and attempt."""
    digest = hashlib.sha256(f"{delivery_id}:{attempts}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64
