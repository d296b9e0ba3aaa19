"""The hold stage's part of Idempotency-Key (idempotency.py): the single flight of one key in this
process, and the stored answer a reserve found, as this request's answer."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..idempotency import IdempotentAnswer, Replays
from ..scripts import Reservation
from .admit import Admission

if TYPE_CHECKING:
    from .hold import HoldNotes

ReplayFlight = asyncio.Future[IdempotentAnswer | None]


@dataclass(frozen=True, slots=True)
class Replay:
    """Answered from the idempotency store: nothing held, charged or settled."""

    answer: IdempotentAnswer
    balance: int | None  # the balance the reserve saw (None: the answer of a request in this process)


async def lead_or_wait(
    replays: Replays, adm: Admission, notes: HoldNotes
) -> tuple[Replay | None, ReplayFlight | None]:
    """(the answer of the request in this process with the same key, None) once it has one; else (None,
    the flight this request now leads, or None when another still runs: its claim in Redis answers)."""
    plan = adm.idempotency
    if plan is None:
        return None, None
    leader, flight = replays.flights.lead_or_join(plan.key)
    while not leader:
        waiting = time.perf_counter()
        try:
            answer = await replays.wait(flight)
        finally:
            notes.waited += time.perf_counter() - waiting
        if answer is not None:
            notes.cache_result = "replay"
            return Replay(replays.replay(plan, answer), None), None
        previous = flight  # it stored nothing (the next waiter leads), or it takes too long
        leader, flight = replays.flights.lead_or_join(plan.key)
        if not leader and flight is previous:
            return None, None
    return None, flight


def land_replay(
    replays: Replays, adm: Admission, flight: ReplayFlight | None, answer: IdempotentAnswer | None
) -> None:
    """End the Idempotency-Key flight this request leads: its waiters get `answer` (None: they go on)."""
    if flight is not None and adm.idempotency is not None:
        replays.flights.land(adm.idempotency.key, flight, answer)


def replayed(replays: Replays, adm: Admission, reservation: Reservation, notes: HoldNotes) -> Replay | None:
    """The idempotency entry the reserve found, as this request's answer (a 409 if another's)."""
    if adm.idempotency is None or not reservation.replay:
        return None
    notes.cache_result = "replay"
    return Replay(replays.replay(adm.idempotency, reservation.cached), reservation.balance)
