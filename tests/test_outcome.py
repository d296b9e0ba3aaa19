"""The charge table, as a table: one row per line of the README's "What is charged when", run against
the pure `decide` (the handler charges exactly what it returns)."""

from __future__ import annotations

import pytest

from sidecar.money import MAX_CHARGE
from sidecar.pipeline.outcome import Ending, Phase, Tariff, decide, estimate
from sidecar.pricing import Multiplier, Price, Usage, cost

PRICE = Price("m", "default", 100, scale=1, prompt=1000, completion=2000, cached_prompt=500, request_fee=0)
ONE = Multiplier(1, 1)
USAGE = Usage(prompt_tokens=5, completion_tokens=16)
BODY = 40  # bytes of the client's request body: 10 prompt tokens by the estimate
HOLD = 100_000  # the worst case held: no estimate is charged above it


def tariff(no_usage: str = "estimate") -> Tariff:
    return Tariff(PRICE, ONE, BODY, no_usage, HOLD)  # type: ignore[arg-type]


def price(usage: Usage) -> int:
    return cost(PRICE, usage, ONE)


ROWS = [
    # 200 with usage: the cost of that usage
    (
        "200 body with usage",
        Ending(Phase.ANSWERED, 200, USAGE, answer_bytes=300),
        "estimate",
        "ok",
        price(USAGE),
    ),
    (
        "200 stream with usage",
        Ending(Phase.STREAMED, 200, USAGE, ran_to_end=True),
        "estimate",
        "ok",
        price(USAGE),
    ),
    # unreachable, timed out, 4xx/5xx, stream cut by the upstream: nothing
    ("unreachable", Ending(Phase.UNREACHABLE), "estimate", "upstream_unreachable", 0),
    ("failed mid-body", Ending(Phase.BODY_FAILED, 200), "estimate", "upstream_failed", 0),
    ("a 429", Ending(Phase.ANSWERED, 429, answer_bytes=80), "estimate", "upstream_429", 0),
    ("a 500 quoting usage", Ending(Phase.ANSWERED, 500, USAGE), "estimate", "upstream_500", 0),
    ("a redirect", Ending(Phase.ANSWERED, 302), "estimate", "upstream_302", 0),
    (
        "stream cut by the upstream",
        Ending(Phase.STREAMED, 200, relayed_events=3),
        "estimate",
        "stream_cut",
        0,
    ),
    # a 200 without usage: the estimate, or nothing with no_usage_charge: free
    (
        "200 body, no usage",
        Ending(Phase.ANSWERED, 200, answer_bytes=41),
        "estimate",
        "no_usage_estimated",
        price(Usage(10, 11)),
    ),
    ("200 body, no usage, free", Ending(Phase.ANSWERED, 200, answer_bytes=41), "free", "no_usage", 0),
    (
        "stream to its end, no usage",
        Ending(Phase.STREAMED, 200, ran_to_end=True, relayed_events=7),
        "estimate",
        "no_usage_estimated",
        price(Usage(10, 7)),
    ),
    (
        "stream to its end, no usage, free",
        Ending(Phase.STREAMED, 200, ran_to_end=True),
        "free",
        "no_usage",
        0,
    ),
    # a body over upstream_max_body_bytes: a 200 by no_usage_charge, never above the hold; errors nothing
    (
        "200 body too large, estimate below the hold",
        Ending(Phase.TOO_LARGE, 200, answer_bytes=41),
        "estimate",
        "too_large_estimated",
        price(Usage(10, 11)),
    ),
    (
        "200 body too large, estimate above the hold",
        Ending(Phase.TOO_LARGE, 200, answer_bytes=10**6),
        "estimate",
        "too_large_estimated",
        HOLD,
    ),
    ("200 body too large, free", Ending(Phase.TOO_LARGE, 200, answer_bytes=10**6), "free", "too_large", 0),
    # every estimate is bounded by the hold (found by test_fuzz: a 200 without usage, max_tokens 1)
    (
        "200 body, no usage, estimate above the hold",
        Ending(Phase.ANSWERED, 200, answer_bytes=10**6),
        "estimate",
        "no_usage_estimated",
        HOLD,
    ),
    (
        "stream to its end, no usage, estimate above the hold",
        Ending(Phase.STREAMED, 200, ran_to_end=True, relayed_events=10**6),
        "estimate",
        "no_usage_estimated",
        HOLD,
    ),
    (
        "client gone, no usage, estimate above the hold",
        Ending(Phase.STREAMED, 200, client_gone=True, relayed_events=10**6),
        "estimate",
        "client_gone_estimated",
        HOLD,
    ),
    (
        "shutdown cuts a stream, no usage, estimate above the hold",
        Ending(Phase.STREAMED, 200, cut=True, relayed_events=10**6),
        "estimate",
        "shutdown_cut_estimated",
        HOLD,
    ),
    ("a 500 too large", Ending(Phase.TOO_LARGE, 500, answer_bytes=10**6), "estimate", "upstream_500", 0),
    # the client disconnects mid-stream: the last usage reported, else the estimate
    (
        "client gone, usage drained",
        Ending(Phase.STREAMED, 200, USAGE, client_gone=True, ran_to_end=True),
        "estimate",
        "client_gone",
        price(USAGE),
    ),
    (
        "client gone, no usage",
        Ending(Phase.STREAMED, 200, client_gone=True, relayed_events=4),
        "free",  # the disconnect estimate applies whatever no_usage_charge says
        "client_gone_estimated",
        price(Usage(10, 4)),
    ),
    # shutdown cuts: a stream by the disconnect policy, an unanswered request nothing
    (
        "shutdown cuts a stream",
        Ending(Phase.STREAMED, 200, USAGE, cut=True),
        "estimate",
        "shutdown_cut",
        price(USAGE),
    ),
    (
        "shutdown cuts a stream, no usage",
        Ending(Phase.STREAMED, 200, cut=True, relayed_events=2),
        "estimate",
        "shutdown_cut_estimated",
        price(Usage(10, 2)),
    ),
    (
        "shutdown cuts a body",
        Ending(Phase.BODY_FAILED, 200, cut=True),
        "estimate",
        "shutdown_cut_unanswered",
        0,
    ),
    ("shutdown cuts the call", Ending(Phase.UNREACHABLE, cut=True), "estimate", "shutdown_cut_unanswered", 0),
    ("started after the cut", Ending(Phase.NOT_SENT), "estimate", "shutting_down", 0),
    # usage above the ceiling: the ceiling
    (
        "absurd usage",
        Ending(Phase.ANSWERED, 200, Usage(completion_tokens=10**12), answer_bytes=9),
        "estimate",
        "ok",
        MAX_CHARGE,
    ),
]


@pytest.mark.parametrize(
    ("ending", "no_usage", "label", "charge"), [r[1:] for r in ROWS], ids=[r[0] for r in ROWS]
)
def test_the_charge_table(ending: Ending, no_usage: str, label: str, charge: int) -> None:
    verdict = decide(ending, tariff(no_usage))
    assert (verdict.label, verdict.charge) == (label, charge)
    assert verdict.charge <= MAX_CHARGE


def test_the_ceiling_is_reported_uncapped() -> None:
    verdict = decide(Ending(Phase.ANSWERED, 200, Usage(completion_tokens=10**12)), tariff())
    assert verdict.uncapped == 2000 * 10**12 > verdict.charge == MAX_CHARGE


def test_the_estimate_rounds_up() -> None:
    assert estimate(1, answer_bytes=1) == Usage(1, 1)
    assert estimate(8, relayed_events=3) == Usage(2, 3)
