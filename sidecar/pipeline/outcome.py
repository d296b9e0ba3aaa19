"""How a request ended, and what that costs: the charge table of the README ("What is charged when"), in
code. Pure: `decide` takes the `Ending` the forward stage returns and gives the `Outcome` and the charge.

    the ending                                    outcome                      charged
    not sent (shutdown had cut everything)        shutting_down                nothing
    upstream unreachable / failed mid-body        upstream_unreachable/_failed nothing
      ... because shutdown cut it                 shutdown_cut_unanswered      nothing
    an answer other than 200 (4xx, 5xx, 3xx)      upstream_<status>            nothing
    a 200 body with usage                         ok                           its usage
    a 200 body without usage                      no_usage_estimated           the estimate (policy
                                                  no_usage                     "estimate"), else nothing
    a 200 body over upstream_max_body_bytes       too_large_estimated          the estimate ("estimate"),
      (not read: its usage is in the rest)        too_large                    else nothing
    a stream with usage                           ok / client_gone /           its usage
                                                  shutdown_cut
    a stream without usage the client left        client_gone_estimated        the estimate
      ... or shutdown cut                         shutdown_cut_estimated       the estimate
      ... that ran to its end                     no_usage_estimated/no_usage  as a body without usage
      ... that the upstream cut                   stream_cut                   nothing
    any estimate above the hold                   (as above)                   the hold
    any charge above MAX_CHARGE                   (as above)                   MAX_CHARGE, logged

Cache hits (cache_hit, cache_collapsed) are charged nothing and do not pass here.

The provider's cost of the request (what the operator pays its upstream, README "Provider costs and
margins"), beside the charge: 0 when no upstream answered 200 (not sent, unreachable, an error status:
providers do not bill those) or the caller's own key served (its provider bills the caller); the
upstream's cost rates applied to the usage it reported (rounded up once) for a 200 with usage; unknown
(None) for a 200 without usage (estimated, too large, cut, broken off: the provider billed what this
gateway did not see) or from an upstream without a cost profile.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Literal

from ..money import MAX_CHARGE
from ..pricing import Multiplier, Price, Usage, cost, provider_cost

# A request answered without usage is estimated at this many bytes per token (the usual English
# average): the prompt from the client's body, the completion from the answer's body or, for a stream,
# one token per event the client was sent.
ESTIMATE_BYTES_PER_TOKEN = 4

NoUsageCharge = Literal["estimate", "free"]


class Outcome(enum.StrEnum):
    """The outcome of a metered request, as the ledger row and the metrics name it."""

    OK = "ok"
    NO_USAGE = "no_usage"
    NO_USAGE_ESTIMATED = "no_usage_estimated"
    CLIENT_GONE = "client_gone"
    CLIENT_GONE_ESTIMATED = "client_gone_estimated"
    SHUTDOWN_CUT = "shutdown_cut"
    SHUTDOWN_CUT_ESTIMATED = "shutdown_cut_estimated"
    SHUTDOWN_CUT_UNANSWERED = "shutdown_cut_unanswered"
    SHUTTING_DOWN = "shutting_down"
    STREAM_CUT = "stream_cut"
    UPSTREAM_UNREACHABLE = "upstream_unreachable"
    UPSTREAM_FAILED = "upstream_failed"
    UPSTREAM_STATUS = "upstream_status"  # labelled upstream_<status>
    TOO_LARGE = "too_large"
    TOO_LARGE_ESTIMATED = "too_large_estimated"
    CACHE_HIT = "cache_hit"
    CACHE_COLLAPSED = "cache_collapsed"


class Phase(enum.Enum):
    """How far the forward stage got."""

    NOT_SENT = "not_sent"  # shutdown had cut everything: the upstream was not called
    UNREACHABLE = "unreachable"  # no answer: connect failed or timed out
    BODY_FAILED = "body_failed"  # the answer's body broke off
    ANSWERED = "answered"  # a whole answer body (any status)
    TOO_LARGE = "too_large"  # an answer body over upstream_max_body_bytes: the rest was not read
    STREAMED = "streamed"  # a 200 event stream, relayed


@dataclass(frozen=True, slots=True)
class Ending:
    """What the forward stage saw. `usage` is what the upstream reported (the last one, for a stream)."""

    phase: Phase
    status: int | None = None  # the upstream's status, once it answered
    usage: Usage | None = None
    cut: bool = False  # the shutdown cut interrupted it
    client_gone: bool = False  # a stream's client left before its end
    ran_to_end: bool = False  # a stream read to its end (not cut by the upstream)
    relayed_events: int = 0  # events of a stream the client was sent
    answer_bytes: int = 0  # the size of an answer body (too large: what was read, or its declared length)


@dataclass(frozen=True, slots=True)
class Verdict:
    outcome: Outcome
    status: int | None
    usage: Usage | None  # what is charged for (reported, or estimated)
    charge: int  # micro-credits, at most MAX_CHARGE
    uncapped: int  # the charge before the ceiling (above MAX_CHARGE only for absurd usage)
    cost: int | None = None  # the provider's cost, micro-credits; None: unknown

    @property
    def label(self) -> str:
        """The outcome as the ledger row, the log line and the metrics spell it."""
        if self.outcome is Outcome.UPSTREAM_STATUS:
            return f"upstream_{self.status}"
        return self.outcome.value


@dataclass(frozen=True, slots=True)
class Tariff:
    """What one request's usage is priced at, and how its estimate is figured."""

    price: Price
    multiplier: Multiplier
    body_size: int  # the client's request body, for the prompt estimate
    no_usage_charge: NoUsageCharge = "estimate"
    hold: int | None = None  # the worst case held: the most a too-large answer's estimate is charged
    rates: Price | None = None  # the serving upstream's cost rates; None: no cost profile
    own_key: bool = False  # the caller's own provider key served: the operator pays the provider nothing


# The outcomes charged by an estimate: at most the hold.
ESTIMATED = frozenset(
    {
        Outcome.NO_USAGE_ESTIMATED,
        Outcome.CLIENT_GONE_ESTIMATED,
        Outcome.SHUTDOWN_CUT_ESTIMATED,
        Outcome.TOO_LARGE_ESTIMATED,
    }
)


def estimate(body_size: int, *, relayed_events: int = 0, answer_bytes: int | None = None) -> Usage:
    """The usage charged when none was reported: the prompt at ESTIMATE_BYTES_PER_TOKEN bytes per token,
    plus an answer body at the same rate, or one completion token per event relayed."""
    completion = relayed_events if answer_bytes is None else -(-answer_bytes // ESTIMATE_BYTES_PER_TOKEN)
    return Usage(prompt_tokens=-(-body_size // ESTIMATE_BYTES_PER_TOKEN), completion_tokens=completion)


def decide(ending: Ending, tariff: Tariff) -> Verdict:
    """The outcome of a request and what it is charged: the charge table above."""
    outcome, usage = _outcome(ending, tariff)
    uncapped = cost(tariff.price, usage, tariff.multiplier) if usage is not None else 0
    if outcome in ESTIMATED and tariff.hold is not None:
        # A guess, never the upstream's word: bounded by what the caller agreed to risk (its hold).
        uncapped = min(uncapped, tariff.hold)
    return Verdict(outcome, ending.status, usage, min(uncapped, MAX_CHARGE), uncapped, _cost(ending, tariff))


def _cost(ending: Ending, tariff: Tariff) -> int | None:
    """The provider's cost of the request (see the module's docstring)."""
    if ending.status != 200 or ending.phase is Phase.NOT_SENT:
        return 0
    if tariff.own_key:
        return 0
    if ending.usage is None or tariff.rates is None or ending.phase not in (Phase.ANSWERED, Phase.STREAMED):
        return None
    return provider_cost(tariff.rates, ending.usage)


def _outcome(ending: Ending, tariff: Tariff) -> tuple[Outcome, Usage | None]:
    phase = ending.phase
    if phase is Phase.NOT_SENT:
        return Outcome.SHUTTING_DOWN, None
    if phase in (Phase.UNREACHABLE, Phase.BODY_FAILED):
        if ending.cut:  # the client gets a 503 and nothing else: nothing is charged
            return Outcome.SHUTDOWN_CUT_UNANSWERED, None
        failed = Outcome.UPSTREAM_UNREACHABLE if phase is Phase.UNREACHABLE else Outcome.UPSTREAM_FAILED
        return failed, None
    if phase is Phase.TOO_LARGE:
        if ending.status != 200:
            return Outcome.UPSTREAM_STATUS, None
        if tariff.no_usage_charge == "estimate":
            return Outcome.TOO_LARGE_ESTIMATED, estimate(tariff.body_size, answer_bytes=ending.answer_bytes)
        return Outcome.TOO_LARGE, None
    if phase is Phase.ANSWERED:
        if ending.status != 200:
            return Outcome.UPSTREAM_STATUS, None
        if ending.usage is not None:
            return Outcome.OK, ending.usage
        return _no_usage(tariff, estimate(tariff.body_size, answer_bytes=ending.answer_bytes))
    # A stream.
    if ending.usage is not None:
        if ending.cut:
            return Outcome.SHUTDOWN_CUT, ending.usage
        return (Outcome.CLIENT_GONE if ending.client_gone else Outcome.OK), ending.usage
    guess = estimate(tariff.body_size, relayed_events=ending.relayed_events)
    if ending.cut:
        return Outcome.SHUTDOWN_CUT_ESTIMATED, guess
    if ending.client_gone:
        return Outcome.CLIENT_GONE_ESTIMATED, guess
    if ending.ran_to_end:
        return _no_usage(tariff, guess)
    return Outcome.STREAM_CUT, None


def _no_usage(tariff: Tariff, guess: Usage) -> tuple[Outcome, Usage | None]:
    if tariff.no_usage_charge == "estimate":
        return Outcome.NO_USAGE_ESTIMATED, guess
    return Outcome.NO_USAGE, None
