"""Retry policies as values: which pause comes before the next try, given the tries so far and `now`.
The stages that retry take one (tests give them pauses of zero); nothing here sleeps."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Retry:
    """Pauses (seconds) before the 2nd, 3rd, ... try; the last repeats while a `budget` (seconds from the
    first try) allows, else there are len(pauses) + 1 tries in all."""

    pauses: tuple[float, ...]
    budget: float | None = None

    def pause(self, tries: int, started: float, now: float) -> float | None:
        """The pause before try number tries + 1, or None to give up."""
        if self.budget is None:
            return self.pauses[tries - 1] if tries <= len(self.pauses) else None
        pause = self.pauses[min(tries, len(self.pauses)) - 1]
        return pause if now + pause < started + self.budget else None

    @classmethod
    def doubling(cls, first: float, cap: float, budget: float) -> Retry:
        """first, 2 × first, ... up to cap, then cap, while the budget lasts."""
        pauses = [first]
        while pauses[-1] < cap:
            pauses.append(min(cap, pauses[-1] * 2))
        return cls(tuple(pauses), budget)


# A settle that fails is sent again after these pauses: ~6 s of Redis trouble is ridden out before it
# is queued for the background retry.
SETTLE = Retry((0.05, 0.2, 0.5, 1.0, 2.0, 2.0))


def reserve(budget: float) -> Retry:
    """A reserve whose answer was lost is sent again with backoff for up to `budget` seconds."""
    return Retry.doubling(0.05, 0.5, budget)
