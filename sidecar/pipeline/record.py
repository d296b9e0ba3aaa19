"""The request record (observe.RequestRecord: metrics and the request log line) filled from what the
stages returned, in one place per step of the walk."""

from __future__ import annotations

from ..balances import Settlement
from ..observe import RequestRecord
from ..pricing import Price, Usage
from ..wire import MeteredRequest
from .admit import Admission
from .forward import Forwarded
from .hold import HoldNotes
from .outcome import Verdict


def identified(rec: RequestRecord, price: Price, request: MeteredRequest) -> None:
    rec.model = price.model
    rec.stream = bool(request.stream)


def admitted(rec: RequestRecord, adm: Admission) -> None:
    rec.key_source = adm.key_source


def held(rec: RequestRecord, notes: HoldNotes, adm: Admission | None) -> None:
    """After the hold stage, whether it held, answered from cache or raised."""
    rec.cache = notes.cache_result
    rec.waited += notes.waited
    if adm is not None:
        rec.hold = adm.hold


def hit(rec: RequestRecord, usage: Usage, saved: int, outcome: str) -> None:
    rec.settled, rec.usage, rec.saved, rec.outcome = True, usage, saved, outcome


def replayed(rec: RequestRecord) -> None:
    """An Idempotency-Key's retry answered from the store: nothing charged, nothing settled."""
    rec.outcome = "idempotent_replay"


def finished(
    rec: RequestRecord, adm: Admission, fwd: Forwarded, verdict: Verdict, settlement: Settlement | None
) -> None:
    """After settlement: the upstream that served and its key, the timings, the outcome, and the charge
    once Redis took it."""
    rec.upstream, rec.attempts, rec.key_source = fwd.upstream.name, fwd.attempts, adm.key_source
    t = fwd.timings
    rec.upstream_started, rec.upstream_first_byte, rec.upstream_ended = (
        t.upstream_started,
        t.upstream_first_byte,
        t.upstream_ended,
    )
    rec.waited += t.waited
    rec.outcome = verdict.label
    if settlement is not None:
        rec.settled, rec.charge, rec.usage = True, verdict.charge, verdict.usage
