"""Routing's pure decisions (routing.py, price_routes.py, pipeline/choices.py): candidate order and weights
on a seeded RNG, the circuit breaker on a controlled clock, the routes and cost profiles read from the
settings with every error named, and the hold bounding the charge whichever candidate serves."""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar import routing
from sidecar.config import Settings, load_settings
from sidecar.errors import ConfigError
from sidecar.pipeline import admit
from sidecar.pipeline.outcome import Ending, Phase, Tariff, decide
from sidecar.pricing import PriceTable, Usage, cost
from sidecar.routing import Breaker, Router, ranked, with_model
from sidecar.wire import ROUTES


@dataclass(frozen=True)
class Cand:
    name: str
    priority: int = 0
    weight: int = 1
    position: int = 0
    cost: int = 0

    @property
    def circuit(self) -> tuple[str, str]:
        return self.name, "m"


def test_priority_first_then_position() -> None:
    cands = [Cand("c", 2, position=0), Cand("a", 0, position=1), Cand("b", 1, position=2)]
    assert [c.name for c in ranked(cands, random.Random(1))] == ["a", "b", "c"]


def test_weights_within_one_priority_hold_over_many_draws() -> None:
    """Weights 1, 3 and 6 among priority 0 (a lower priority after them): each comes first at its share,
    within 1.5 points over 20,000 seeded draws (uniform draws would be 33 points off the 60)."""
    cands = [Cand("a", 0, 1, 0), Cand("b", 0, 3, 1), Cand("c", 0, 6, 2), Cand("z", 1, 100, 3)]
    rng, n = random.Random(20), 20_000
    orders = [[c.name for c in ranked(cands, rng)] for _ in range(n)]
    first = Counter(o[0] for o in orders)
    for name, share in (("a", 0.1), ("b", 0.3), ("c", 0.6)):
        assert abs(first[name] / n - share) < 0.015, (name, first)
    assert {o[-1] for o in orders} == {"z"}  # a lower priority never comes before, whatever its weight
    # The second place follows the weights left: after c, b comes before a 3 times in 4.
    after_c = [o for o in orders if o[0] == "c"]
    assert abs(sum(o[1] == "b" for o in after_c) / len(after_c) - 0.75) < 0.02


def test_breaker_cools_after_failures_in_a_row_then_one_half_open_trial() -> None:
    b = Breaker(failures_to_cool=2, cooldown=30.0)
    key = ("a", "m")
    assert not b.record(key, routing.SERVER_ERROR, 0.0)
    assert not b.record(key, routing.OK, 1.0)  # a success resets the count
    assert not b.record(key, routing.RATE_LIMITED, 2.0)
    assert b.available(key, 2.0)
    assert b.record(key, routing.TIMEOUT, 3.0)  # two in a row: cooling
    assert not b.available(key, 3.0)
    assert not b.available(key, 32.9)
    assert b.open(10.0) == Counter({"a": 1})
    assert b.available(key, 33.0)  # half-open
    b.begin(key, 33.0)  # one request's trial
    assert not b.available(key, 34.0)  # no second trial while it runs
    assert b.record(key, routing.UNREACHABLE, 35.0)  # the trial failed: cooling again (a cooldown)
    assert not b.available(key, 64.9)
    assert b.available(key, 65.0)
    b.begin(key, 65.0)
    assert not b.record(key, routing.CLIENT_ERROR, 66.0)  # a 4xx is an answer: closed
    assert b.available(key, 66.0)
    assert b.open(66.0) == Counter()


def test_breaker_ignores_neutral_results_and_gives_up_a_stale_trial() -> None:
    b = Breaker(failures_to_cool=1, cooldown=10.0)
    key = ("a", "m")
    assert not b.record(("x", "m"), routing.CUT, 0.0)  # neither failure nor success
    assert b.record(key, routing.SERVER_ERROR, 0.0)
    b.begin(key, 10.0)
    assert not b.available(key, 15.0)
    assert not b.record(key, routing.CUT, 15.0)  # the trial was cut: another may try
    assert b.available(key, 15.0)
    b.begin(key, 15.0)
    assert not b.available(key, 24.9)
    assert b.available(key, 25.0)  # its result never came: given up after a cooldown


def test_a_failure_forced_through_while_cooling_extends_it_without_a_new_cooldown() -> None:
    b = Breaker(failures_to_cool=1, cooldown=10.0)
    key = ("a", "m")
    assert b.record(key, routing.SERVER_ERROR, 0.0)
    assert not b.record(key, routing.SERVER_ERROR, 5.0)
    assert not b.available(key, 14.9)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_router_skips_cooling_candidates_unless_all_are() -> None:
    clock = Clock()
    r = Router(max_attempts=3, failures_to_cool=1, cooldown_seconds=30, rng=random.Random(3), clock=clock)
    a, b = Cand("a", 0, position=0), Cand("b", 1, position=1)
    r.done(a, routing.SERVER_ERROR)
    plan = r.plan([a, b], "priority")
    assert ([c.name for c in plan.order], plan.forced) == (["b"], False)
    assert not r.begin(a, forced=False)
    r.done(b, routing.TIMEOUT)
    plan = r.plan([a, b], "priority")
    assert ([c.name for c in plan.order], plan.forced) == (["a", "b"], True)  # all cooling: tried anyway
    assert r.begin(a, forced=True)
    stats = r.stats()
    assert stats.cooldowns == Counter({"a": 1, "b": 1})
    assert stats.cooling == Counter({"a": 1, "b": 1})
    assert stats.attempts == Counter({("a", "server_error"): 1, ("b", "timeout"): 1})
    clock.now += 30
    assert [c.name for c in r.plan([a, b], "priority").order] == ["a", "b"]


def test_cost_order_is_cheapest_first_ties_in_priority_order() -> None:
    r = Router(max_attempts=3, failures_to_cool=1, cooldown_seconds=30, rng=random.Random(3))
    cands = [
        Cand("a", 0, position=0, cost=5),
        Cand("b", 1, position=1, cost=2),
        Cand("c", 2, position=2, cost=2),
    ]
    assert [c.name for c in r.plan(cands, "cost").order] == ["b", "c", "a"]
    assert [c.name for c in r.plan(cands, "priority").order] == ["a", "b", "c"]


def test_with_model_changes_the_model_and_no_other_byte() -> None:
    body = b'{"messages":[{"role":"user","content":"x\\u00e9"}],"model":"ours","temperature":1.50}'
    assert with_model(body, "theirs") == body.replace(b'"ours"', b'"theirs"')


# ---- the settings ------------------------------------------------------------------------------------

UPSTREAMS = {
    "a": {
        "base_url": "http://a/v1",
        "provider": "p1",
        "costs": {"default": {"prompt": "0.5", "completion": "1"}},
    },
    "b": {"base_url": "http://b/v1", "provider": "p1", "costs": {"models": {"b-m": {"prompt": "3"}}}},
    "c": {"base_url": "http://c/v1", "provider": "p2"},
}
ROUTED = {
    "prompt": "1",
    "completion": "2",
    "max_output_tokens": 100,
    "routes": [
        {"upstream": "a"},
        {"upstream": "b", "model": "b-m", "prompt": "2", "completion": "4"},
        {"upstream": "c", "prompt": "3", "completion": "6", "priority": 0},
    ],
}


def table(
    models: dict[str, Any], upstreams: dict[str, Any] = UPSTREAMS, costs_c: dict[str, Any] | None = None
) -> PriceTable:
    if costs_c is not None:
        upstreams = {**upstreams, "c": {**upstreams["c"], "costs": costs_c}}
    raw = {"models": models, "upstreams": upstreams}
    return PriceTable.from_settings(msgspec.convert(raw, Settings))


def test_routes_are_read_in_priority_then_position_order_with_their_prices_and_costs() -> None:
    prices = table({"m": ROUTED})
    found = prices.candidates(prices.resolve("m"))
    assert [(c.upstream, c.model, c.priority) for c in found] == [
        ("a", "m", 0),
        ("c", "m", 0),
        ("b", "b-m", 1),
    ]
    a, c, b = found
    assert (a.price.prompt, a.price.completion, b.price.prompt, c.price.completion) == (
        1000,
        2000,
        2000,
        6000,
    )
    assert {x.price.model for x in found} == {"m"}  # billed under the gateway's name
    assert a.rates is not None
    assert (a.rates.prompt, a.rates.completion) == (500, 1000)
    assert b.rates is not None
    assert (b.rates.prompt, b.rates.completion) == (3000, 0)
    assert c.rates is None  # no profile: unknown
    assert prices.resolve("m").upstream == "a"  # the primary
    assert prices.warnings == [
        "model 'm' is priced below its provider cost on upstream 'b' (model 'b-m' there): prompt 2 < 3 "
        "(credits per 1K tokens, the fee per request, at multiplier 1)"
    ]


def test_a_model_without_routes_is_its_upstream_alone_as_the_client_names_it() -> None:
    prices = table({"m": {"prompt": "1", "upstream": "c"}})
    (only,) = prices.candidates(prices.resolve("m"))
    assert (only.upstream, only.model, only.rates) == ("c", None, None)


def costed(costs: dict[str, Any]) -> dict[str, Any]:
    return {**UPSTREAMS, "c": {"base_url": "http://c/v1", "costs": costs}}


@pytest.mark.parametrize(
    ("model", "upstreams", "param"),
    [
        ({**ROUTED, "routes": [{"upstream": "nope"}]}, UPSTREAMS, "models.m.routes.0.upstream"),
        ({**ROUTED, "routes": [{"upstream": "a"}, {"upstream": "b", "prompt": "x"}]}, UPSTREAMS,
         "models.m.routes.1.prompt"),
        ({**ROUTED, "routes": [{"upstream": "a"}, {"upstream": "a", "model": "m"}]}, UPSTREAMS,
         "models.m.routes.1.upstream"),
        ({**ROUTED, "routes": []}, UPSTREAMS, "models.m.routes"),
        ({**ROUTED, "upstream": "a"}, UPSTREAMS, "models.m.upstream"),
        ({**ROUTED, "routes": [{"upstream": "a", "weight": 0}]}, UPSTREAMS, "models.m.routes.0.weight"),
        ({**ROUTED, "routes": [{"upstream": "a", "priority": -1}]}, UPSTREAMS, "models.m.routes.0.priority"),
        ({**ROUTED, "routes": [{"upstream": "a", "region": "eu"}]}, UPSTREAMS, "models.m.routes.0.region"),
        ({**ROUTED, "routing_order": "fastest"}, UPSTREAMS, "models.m.routing_order"),
        (ROUTED, costed({"models": {"x": {"prompt": "-1"}}}), "upstreams.c.costs.models.x.prompt"),
        (ROUTED, costed({"default": {"completion": "1"}}), "upstreams.c.costs.default.prompt"),
        (ROUTED, costed({"default": {"prompt": "1", "request_fee": "1e-30"}}),
         "upstreams.c.costs.default.request_fee"),
    ],
)  # fmt: skip
def test_bad_routes_and_costs_are_named(model: dict[str, Any], upstreams: dict[str, Any], param: str) -> None:
    with pytest.raises(ConfigError) as raised:
        load_settings(environ={}, overrides={"models": {"m": model}, "upstreams": upstreams})
    assert raised.value.param == param
    assert param.split(".")[-1] in raised.value.message


@pytest.mark.parametrize(
    ("name", "value"),
    [("routing_max_attempts", "0"), ("routing_order", "random"), ("routing_cooldown_seconds", "0"),
     ("routing_failures_to_cool", "0")],
)  # fmt: skip
def test_bad_routing_settings_are_named(name: str, value: str) -> None:
    with pytest.raises(ConfigError) as raised:
        load_settings(environ={f"CREDITGATE_{name.upper()}": value})
    assert raised.value.param == name


# ---- keys per candidate, and the hold over them -----------------------------------------------------

POLICY = admit.AdmitPolicy(None, None, "x-key", 1, "x-fit", False)
PROVIDERS = {"a": "p1", "b": "p1", "c": "p2"}


def plan(
    prices: PriceTable, body: dict[str, Any], headers: dict[str, str], keys: dict[str, str]
) -> admit.Admission:
    raw = msgspec.json.encode(body)
    identified = admit.identify(raw, prices)
    return admit.plan("r", "acct", ROUTES["/v1/chat/completions"], raw, identified, headers, prices, POLICY,
                      own_keys=keys, providers=PROVIDERS)  # fmt: skip


BODY = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10}


def test_each_candidate_goes_out_with_its_own_key_and_the_inline_one_only_to_the_primarys_provider() -> None:
    prices = table({"m": ROUTED})
    adm = plan(prices, BODY, {}, {"p2": "sk-vault"})
    assert [(c.upstream, c.key_source, c.api_key) for c in adm.choices] == [
        ("a", "pool", None), ("c", "vault", "sk-vault"), ("b", "pool", None)]  # fmt: skip
    assert [c.multiplier for c in adm.choices] == [prices.pooled, prices.byok, prices.pooled]
    assert "sk-vault" not in repr(adm.choices)
    inline = plan(prices, BODY, {"x-key": "sk-mine"}, {"p2": "sk-vault"})
    assert [(c.upstream, c.key_source, c.api_key) for c in inline.choices] == [
        ("a", "inline", "sk-mine"),
        ("b", "inline", "sk-mine"),
    ]  # fmt: skip  (c is p2's: never sent)
    assert inline.hold == max(c.hold for c in inline.choices)


@settings(max_examples=300, deadline=None)
@given(
    prices=st.lists(st.tuples(st.integers(0, 5000), st.integers(0, 5000), st.integers(0, 100)), min_size=1,
                    max_size=4),
    vault=st.sets(st.sampled_from(["p1", "p2"])),
    max_tokens=st.integers(1, 100),
    content=st.text(max_size=40),
    data=st.data(),
)  # fmt: skip
def test_the_hold_bounds_the_charge_whichever_candidate_serves(
    prices: list[tuple[int, int, int]], vault: set[str], max_tokens: int, content: str, data: st.DataObject
) -> None:
    """Routes with different prices and keys (so multipliers): any usage within the worst case's bounds
    costs at most the hold on every candidate; lowered to what a balance affords, the hold fits it."""
    routes = [
        {"upstream": "abc"[i % 3], "model": f"m{i}", "prompt": f"0.{p:06d}", "completion": f"0.{c:06d}",
         "request_fee": f"0.{f:06d}"}
        for i, (p, c, f) in enumerate(prices)
    ]  # fmt: skip
    table_ = table({"m": {"prompt": "1", "max_output_tokens": 100, "routes": routes}})
    body = {"model": "m", "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens}
    adm = plan(table_, body, {}, dict.fromkeys(vault, "sk"))
    usage = Usage(
        prompt_tokens=data.draw(st.integers(0, adm.prompt_tokens)),
        completion_tokens=data.draw(st.integers(0, adm.outputs * max_tokens)),
    )
    assert all(cost(c.price, usage, c.multiplier) <= adm.hold for c in adm.choices)
    available = data.draw(st.integers(0, adm.hold))
    fits = adm.affordable(available)
    if fits >= 1:
        assert adm.lowered_to(fits).hold <= available
    if fits < max_tokens:
        assert adm.lowered_to(fits + 1).hold > available


# ---- the provider's cost beside the charge ----------------------------------------------------------


@pytest.mark.parametrize(
    ("ending", "own_key", "with_rates", "expected"),
    [
        (Ending(Phase.ANSWERED, status=200, usage=Usage(10, 20)), False, True, 10 * 500 + 20 * 1000),
        # a's rates price no cached tokens apart: they cost its prompt rate
        (Ending(Phase.STREAMED, status=200, usage=Usage(10, 20, 4)), False, True, 10 * 500 + 20 * 1000),
        (Ending(Phase.ANSWERED, status=200, usage=Usage(10, 20)), True, True, 0),  # the caller's key
        (Ending(Phase.ANSWERED, status=200, usage=Usage(10, 20)), False, False, None),  # no profile
        (Ending(Phase.ANSWERED, status=200, answer_bytes=80), False, True, None),  # estimated
        (Ending(Phase.STREAMED, status=200, relayed_events=3), False, True, None),  # cut, no usage
        (Ending(Phase.TOO_LARGE, status=200, answer_bytes=10**6), False, True, None),
        (Ending(Phase.BODY_FAILED, status=200), False, True, None),
        (Ending(Phase.ANSWERED, status=500), False, True, 0),  # not billed
        (Ending(Phase.UNREACHABLE), False, False, 0),
        (Ending(Phase.NOT_SENT), False, True, 0),
    ],
)
def test_the_providers_cost_of_each_ending(
    ending: Ending, own_key: bool, with_rates: bool, expected: int | None
) -> None:
    prices = table({"m": ROUTED})
    a = prices.candidates(prices.resolve("m"))[0]
    tariff = Tariff(a.price, prices.pooled, 100, rates=a.rates if with_rates else None, own_key=own_key)
    assert decide(ending, tariff).cost == expected


def test_a_cost_rounds_up_once() -> None:
    rates = table({"m": {"prompt": "1", "upstream": "c"}}, costs_c={"default": {"prompt": "0.0000015"}})
    (c,) = rates.candidates(rates.resolve("m"))
    assert c.rates is not None
    tariff = Tariff(c.price, rates.pooled, 100, rates=c.rates)
    # 3 tokens × 0.0015 micro-credits = 0.0045: 1 micro-credit (rounded up once, not per token).
    assert decide(Ending(Phase.ANSWERED, status=200, usage=Usage(3, 0)), tariff).cost == 1
