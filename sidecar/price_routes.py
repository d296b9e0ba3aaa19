"""A model's upstream candidates (``routes``) and each upstream's provider cost rates (``costs``), read
from the settings like prices (README "Routing and fallback", "Provider costs and margins"); the price
table (pricing.PriceTable) is built with them. Pure: no I/O."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from fractions import Fraction
from typing import Protocol

from .errors import ConfigError
from .money import MICRO
from .pricing import ModelPrices, Price, parse_decimal
from .tables import CostProfile, CostRates


class UpstreamCosts(Protocol):
    """An upstream's provider cost profile (config.UpstreamConfig)."""

    @property
    def costs(self) -> CostProfile | None: ...


@dataclass(frozen=True, slots=True)
class Candidate:
    """One upstream a model may be served by (README "Routing and fallback")."""

    upstream: str
    # The model's name at that upstream; None (a model without routes): the name the client sent.
    model: str | None
    priority: int  # lower is tried first
    weight: int  # the share among candidates of one priority
    position: int  # in the model's routes
    price: Price  # the customer's price when this candidate serves (its `model` is the gateway's name)
    rates: Price | None  # what the upstream charges the operator (its cost profile); None: unknown

    @property
    def circuit(self) -> tuple[str, str]:
        """What the circuit breaker counts failures of: the upstream and the model sent to it."""
        return self.upstream, self.model or self.price.model


def only_candidate(price: Price) -> Candidate:
    """The candidate of a price whose model has no routes: its upstream, the name the client sent."""
    return Candidate(price.upstream, None, 0, 1, 0, price, None)


PRICE_FIELDS = ("prompt", "completion", "cached_prompt", "request_fee")


def rates_of(fields: Mapping[str, str | None], where: str, model: str, upstream: str) -> Price:
    """A Price of decimal strings of credits per 1K tokens (`cached_prompt` may be None) and per request,
    every field an integer at one scale; the remaining Price fields are the caller's to replace."""
    per_1k = {
        name: parse_decimal(text, f"{where}.{name}")
        for name in ("prompt", "completion", "cached_prompt")
        if (text := fields[name]) is not None
    }
    per_token = {name: value * Fraction(MICRO, 1000) for name, value in per_1k.items()}
    fee = parse_decimal(fields["request_fee"] or "0", f"{where}.request_fee") * MICRO
    scale = math.lcm(fee.denominator, *(v.denominator for v in per_token.values()))
    return Price(
        model=model,
        upstream=upstream,
        max_output_tokens=0,
        scale=scale,
        prompt=int(per_token["prompt"] * scale),
        completion=int(per_token["completion"] * scale),
        cached_prompt=int(per_token["cached_prompt"] * scale) if "cached_prompt" in per_token else None,
        request_fee=int(fee * scale),
    )


def _per_field(price: Price) -> dict[str, Fraction]:
    """A price's fields in micro-credits per token (the fee per request); cached at the prompt rate when
    it has none."""
    cached = price.cached_prompt if price.cached_prompt is not None else price.prompt
    raw = {"prompt": price.prompt, "completion": price.completion, "cached_prompt": cached,
           "request_fee": price.request_fee}  # fmt: skip
    return {name: Fraction(value, price.scale) for name, value in raw.items()}


def below_cost(price: Price, rates: Price) -> list[str]:
    """The price fields below the provider's cost for them, at multiplier 1 (the markup not counted), as
    "prompt 0.001 < 0.002" (credits per 1K tokens; the fee per request). Cached prompt tokens are compared
    only when either side prices them apart."""
    mine, theirs = _per_field(price), _per_field(rates)
    names = [
        n
        for n in PRICE_FIELDS
        if n != "cached_prompt" or {price.cached_prompt, rates.cached_prompt} != {None}
    ]
    return [f"{n} {_credits(mine[n], n)} < {_credits(theirs[n], n)}" for n in names if mine[n] < theirs[n]]


def _credits(per_unit: Fraction, field: str) -> str:
    """Micro-credits per token (per request for the fee) as the decimal string of credits it was set as."""
    value = per_unit / MICRO * (1 if field == "request_fee" else 1000)
    text = format(Decimal(value.numerator) / Decimal(value.denominator), "f")
    return text.rstrip("0").rstrip(".") if "." in text else text


def model_routes(
    name: str, model: ModelPrices, base: Price, upstreams: Mapping[str, UpstreamCosts]
) -> tuple[tuple[Candidate, ...], list[str]]:
    """A model's candidates in their static order, each priced (`base`: the model's own price), and the
    warnings of those priced below their upstream's cost."""
    own = {field: getattr(model, field) for field in PRICE_FIELDS}
    found = _candidates(name, model, own, f"models.{name}", upstreams)
    candidates = tuple(dataclasses.replace(c, price=_priced(c, base)) for c in found)
    warnings = []
    for c in candidates:
        low = below_cost(c.price, c.rates) if c.rates is not None else []
        if low:
            warnings.append(
                f"model {name!r} is priced below its provider cost on upstream {c.upstream!r} "
                f"(model {c.model or name!r} there): {', '.join(low)} (credits per 1K tokens, the fee per "
                "request, at multiplier 1)"
            )
    return candidates, warnings


_NO_PRICE = Price("", "", 0, 1, 0, 0, None, 0)  # a candidate priced as its model (filled in after)


def _priced(candidate: Candidate, base: Price) -> Price:
    """A candidate's price: the model's (`base`), or its own fields with the model's other settings."""
    if candidate.price is _NO_PRICE:
        return dataclasses.replace(base, upstream=candidate.upstream)
    return dataclasses.replace(
        candidate.price,
        model=base.model,
        max_output_tokens=base.max_output_tokens,
        unseen_input_tokens=base.unseen_input_tokens,
    )


def _candidates(
    name: str,
    model: ModelPrices,
    own: Mapping[str, str | None],
    where: str,
    upstreams: Mapping[str, UpstreamCosts],
) -> list[Candidate]:
    """A model's candidates in their static order (priority, then position), their prices parsed (one
    that overrides nothing is priced as the model) and their upstreams' cost rates looked up."""
    if model.routes is None:
        rates = _costrates_of(upstreams.get(model.upstream), model.upstream, name)
        return [Candidate(model.upstream, None, 0, 1, 0, _NO_PRICE, rates)]
    if model.upstream != "default":
        raise ConfigError(
            f"{where} sets both upstream and routes: name the upstream in routes.", param=f"{where}.upstream"
        )
    if not model.routes:
        raise ConfigError(f"{where}.routes must name at least one upstream.", param=f"{where}.routes")
    found: list[Candidate] = []
    seen: set[tuple[str, str]] = set()
    for position, route in enumerate(model.routes):
        at = f"{where}.routes.{position}"
        if route.upstream not in upstreams:
            raise ConfigError(
                f"{at}.upstream names {route.upstream!r}, which is not in upstreams.", param=f"{at}.upstream"
            )
        sent = route.model or name
        if (route.upstream, sent) in seen:
            raise ConfigError(
                f"{at} repeats upstream {route.upstream!r} with model {sent!r}.", param=f"{at}.upstream"
            )
        seen.add((route.upstream, sent))
        overrides = {field: getattr(route, field) for field in PRICE_FIELDS}
        price = _NO_PRICE
        if any(v is not None for v in overrides.values()):
            fields = {f: overrides[f] if overrides[f] is not None else own[f] for f in PRICE_FIELDS}
            price = rates_of(fields, at, name, route.upstream)
        rates = _costrates_of(upstreams[route.upstream], route.upstream, sent)
        priority = route.priority if route.priority is not None else position
        found.append(Candidate(route.upstream, sent, priority, route.weight, position, price, rates))
    found.sort(key=lambda c: (c.priority, c.position))
    return found


def _costrates_of(upstream: UpstreamCosts | None, name: str, model: str) -> Price | None:
    """The cost rates of `model` (the name sent) at the upstream `name`: its own, else the profile's
    default, else None (unknown)."""
    profile = upstream.costs if upstream is not None else None
    if profile is None:
        return None
    where = f"upstreams.{name}.costs"
    rates: CostRates | None = profile.models.get(model)
    at = f"{where}.models.{model}"
    if rates is None:
        rates, at = profile.default, f"{where}.default"
    if rates is None:
        return None
    return rates_of({field: getattr(rates, field) for field in PRICE_FIELDS}, at, model, name)


def check_cost_profiles(upstreams: Mapping[str, UpstreamCosts]) -> None:
    """Every rate of every cost profile parsed (a rate no candidate uses is checked too); raises
    ConfigError naming the field."""
    for name, upstream in upstreams.items():
        profile = upstream.costs
        if profile is None:
            continue
        for model in profile.models:
            _costrates_of(upstream, name, model)
        if profile.default is not None:
            _costrates_of(upstream, name, "\x00")  # no model has that name: the default
