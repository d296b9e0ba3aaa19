"""Prices, the worst-case estimate and the cost of a request, in integer micro-credits. Pure: no I/O.

Prices are configured as decimal strings of credits per 1K tokens (and credits per request for the fee).
They are read exactly (``decimal.Decimal`` -> ``fractions.Fraction``), brought to one integer scale per
model at startup, and every cost is computed with integers only:

    base   = uncached_prompt × prompt + cached × cached_prompt + completion × completion + request_fee
    charge = ceil(base × multiplier)                        (micro-credits)

Rounding happens once, at the end, upward to the next micro-credit. The multiplier applies to the whole
base, the fee included: pooled key ``pooled_multiplier`` (1.25 by default), the caller's own key
``byok_multiplier`` (1 by default).

A model is served by one or more upstream candidates (``routes``), each with the customer's price when it
serves (the model's, or the route's overrides) and the upstream's provider cost rates (``costs``), read
the same way: a provider's cost is ``ceil(base)`` at those rates, multiplier 1.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from fractions import Fraction
from typing import TYPE_CHECKING, Protocol

from .errors import BadRequest, ConfigError
from .money import MAX_CHARGE, MICRO

if TYPE_CHECKING:
    from .tables import CostProfile, CostRates, RouteConfig


class ModelPrices(Protocol):
    """One model's configured prices (config.ModelConfig): decimal strings of credits."""

    @property
    def prompt(self) -> str: ...
    @property
    def completion(self) -> str: ...
    @property
    def cached_prompt(self) -> str | None: ...
    @property
    def request_fee(self) -> str: ...
    @property
    def max_output_tokens(self) -> int: ...
    @property
    def aliases(self) -> list[str]: ...
    @property
    def upstream(self) -> str: ...
    @property
    def image_input_tokens(self) -> int | None: ...
    @property
    def audio_input_tokens(self) -> int | None: ...
    @property
    def file_input_tokens(self) -> int | None: ...
    @property
    def stored_input_tokens(self) -> int | None: ...
    @property
    def routes(self) -> list[RouteConfig] | None: ...
    @property
    def routing_order(self) -> str | None: ...


class UpstreamCosts(Protocol):
    """An upstream's provider cost profile (config.UpstreamConfig)."""

    @property
    def costs(self) -> CostProfile | None: ...


class PriceSettings(Protocol):
    """What the price table is built from (config.Settings has it): no import of the config module."""

    @property
    def models(self) -> Mapping[str, ModelPrices]: ...
    @property
    def pooled_multiplier(self) -> str: ...
    @property
    def byok_multiplier(self) -> str: ...
    @property
    def routing_order(self) -> str: ...
    def upstream_table(self) -> Mapping[str, UpstreamCosts]: ...


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0  # part of prompt_tokens that was served from the provider's prompt cache


@dataclass(frozen=True, slots=True)
class Price:
    """One model's price, scaled so that ``micro-credits = value / scale``; every field an integer."""

    model: str
    upstream: str
    max_output_tokens: int
    scale: int
    prompt: int  # per token
    completion: int  # per token
    cached_prompt: int | None  # per token; None: cached tokens cost the prompt price
    request_fee: int  # per request
    # Input tokens per part the body's bytes do not bound, by kind (see wire.unseen_inputs); a kind
    # missing here is refused.
    unseen_input_tokens: dict[str, int] = field(default_factory=dict)

    def base(self, usage: Usage) -> int:
        """Cost before the multiplier, in 1/scale micro-credits."""
        cached = min(usage.cached_tokens, usage.prompt_tokens) if self.cached_prompt is not None else 0
        return (
            (usage.prompt_tokens - cached) * self.prompt
            + cached * (self.cached_prompt or 0)
            + usage.completion_tokens * self.completion
            + self.request_fee
        )


@dataclass(frozen=True, slots=True)
class Multiplier:
    numerator: int
    denominator: int


ONE = Multiplier(1, 1)


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


def ceil_div(numerator: int, denominator: int) -> int:
    return -(-numerator // denominator)


def cost(price: Price, usage: Usage, multiplier: Multiplier) -> int:
    """The charge for a finished request, in micro-credits, rounded up once."""
    return ceil_div(price.base(usage) * multiplier.numerator, price.scale * multiplier.denominator)


def provider_cost(rates: Price, usage: Usage) -> int:
    """What the provider charges for `usage` at its cost rates, in micro-credits, rounded up once (at
    most MAX_CHARGE, as a charge)."""
    return min(cost(rates, usage, ONE), MAX_CHARGE)


def worst_case(price: Price, prompt_tokens: int, output_tokens: int, multiplier: Multiplier) -> int:
    """The hold: every prompt token at the uncached price plus the whole output budget, at most
    MAX_CHARGE (no charge is ever more, so that hold still bounds it, and it stays below 2**53)."""
    charge = cost(price, Usage(prompt_tokens=prompt_tokens, completion_tokens=output_tokens), multiplier)
    return min(charge, MAX_CHARGE)


def estimate_prompt_tokens(body_size: int, bytes_per_token: int) -> int:
    """An upper estimate of prompt tokens from the request body's size (a BPE token is at least a byte)."""
    return ceil_div(body_size, bytes_per_token)


_SETTING = {
    "image": "image_input_tokens",
    "audio": "audio_input_tokens",
    "file": "file_input_tokens",
    "stored": "stored_input_tokens",
}
_WHAT = {"image": "an image", "audio": "audio", "file": "a file", "stored": "stored state"}


def unseen_prompt_tokens(price: Price, inputs: list[tuple[str, str]]) -> int:
    """The input tokens of parts the body's bytes do not bound: each image, audio and file part at its
    model's per-part ceiling, stored state once at its ceiling. A kind the model has no ceiling for is a
    400 naming the part (the worst case could not be bounded)."""
    total = 0
    stored = False
    for kind, param in inputs:
        tokens = price.unseen_input_tokens.get(kind)
        if tokens is None:
            raise BadRequest(
                f"{param} sends {_WHAT[kind]}, whose tokens this gateway cannot bound for {price.model} "
                f"(models.{price.model}.{_SETTING[kind]} is not set).",
                param=param,
            )
        if kind == "stored":
            if stored:
                continue
            stored = True
        total += tokens
    return total


def parse_decimal(value: str, setting: str, *, allow_zero: bool = True) -> Fraction:
    try:
        number = Decimal(value)
    except (InvalidOperation, TypeError):
        raise ConfigError(
            f"{setting} must be a decimal string such as '0.0025', got {value!r}.", param=setting
        ) from None
    if not number.is_finite() or number < 0 or (number == 0 and not allow_zero):
        raise ConfigError(
            f"{setting} must be a {'non-negative' if allow_zero else 'positive'} number.", param=setting
        )
    # Bounded before it becomes a Fraction: "1e999999999" would take 10**999999999 (minutes, gigabytes).
    if number > MAX_DECIMAL or (number and _decimals(number) > MAX_DECIMAL_PLACES):
        raise ConfigError(
            f"{setting} must be at most {MAX_DECIMAL} with at most {MAX_DECIMAL_PLACES} decimal places, "
            f"got {value!r}.",
            param=setting,
        )
    return Fraction(number)


# The bounds of a decimal setting (a price in credits, a multiplier): far beyond any real one.
MAX_DECIMAL = 10**9
MAX_DECIMAL_PLACES = 18


def _decimals(number: Decimal) -> int:
    """The decimal places `number` needs (trailing zeros not counted), without rounding it."""
    _, digits, exponent = number.as_tuple()
    assert isinstance(exponent, int)  # finite
    trailing = len(digits) - len("".join(map(str, digits)).rstrip("0"))
    return max(0, -(exponent + trailing))


PRICE_FIELDS = ("prompt", "completion", "cached_prompt", "request_fee")


def _rates(fields: Mapping[str, str | None], where: str, model: str, upstream: str) -> Price:
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


class PriceTable:
    def __init__(
        self,
        prices: dict[str, Price],
        aliases: dict[str, str],
        pooled: Multiplier,
        byok: Multiplier,
        routes: dict[str, tuple[Candidate, ...]] | None = None,
        orders: dict[str, str] | None = None,
    ) -> None:
        self.prices = prices
        self.aliases = aliases
        self.pooled = pooled
        self.byok = byok
        # Each model's upstream candidates, in their static order (priority, then position); a model
        # missing here (a table built by hand) has its price's upstream alone.
        self.routes = routes or {}
        self.orders = orders or {}  # each model's routing order, "priority" or "cost"
        self.warnings: list[str] = []  # prices below a candidate's provider cost (logged at startup)

    @classmethod
    def from_settings(cls, settings: PriceSettings) -> PriceTable:
        prices: dict[str, Price] = {}
        aliases: dict[str, str] = {}
        routes: dict[str, tuple[Candidate, ...]] = {}
        orders: dict[str, str] = {}
        upstreams = settings.upstream_table()
        check_cost_profiles(upstreams)
        warnings: list[str] = []
        for name, model in settings.models.items():
            where = f"models.{name}"
            own = {field: getattr(model, field) for field in PRICE_FIELDS}
            base = dataclasses.replace(
                _rates(own, where, name, model.upstream),
                max_output_tokens=model.max_output_tokens,
                unseen_input_tokens={
                    kind: tokens
                    for kind, setting in _SETTING.items()
                    if (tokens := getattr(model, setting)) is not None
                },
            )
            found = _candidates(name, model, own, where, upstreams)
            base = dataclasses.replace(base, upstream=found[0].upstream)  # the primary's
            candidates = tuple(dataclasses.replace(c, price=_priced(c, base)) for c in found)
            prices[name] = base
            routes[name] = candidates
            orders[name] = model.routing_order or settings.routing_order
            for c in candidates:
                low = below_cost(c.price, c.rates) if c.rates is not None else []
                if low:
                    warnings.append(
                        f"model {name!r} is priced below its provider cost on upstream {c.upstream!r} "
                        f"(model {c.model or name!r} there): {', '.join(low)} (credits per 1K tokens, the "
                        "fee per request, at multiplier 1)"
                    )
            for alias in model.aliases:
                if alias in settings.models or aliases.get(alias, name) != name:
                    raise ConfigError(
                        f"{where}.aliases: {alias!r} names two models.", param=f"{where}.aliases"
                    )
                aliases[alias] = name
        table = cls(
            prices,
            aliases,
            _multiplier(settings.pooled_multiplier, "pooled_multiplier"),
            _multiplier(settings.byok_multiplier, "byok_multiplier"),
            routes,
            orders,
        )
        table.warnings = warnings
        return table

    def candidates(self, price: Price) -> tuple[Candidate, ...]:
        """The model's upstream candidates in their static order (the first is the primary)."""
        found = self.routes.get(price.model)
        if found is None:
            found = (Candidate(price.upstream, None, 0, 1, 0, price, None),)
        return found

    def order(self, price: Price) -> str:
        return self.orders.get(price.model, "priority")

    def listing(self) -> list[dict[str, object]]:
        """The priced models, then their aliases, as OpenAI model objects."""
        names = [*self.prices, *self.aliases]
        return [
            {"id": name, "object": "model", "created": 0, "owned_by": self.resolve(name).upstream}
            for name in names
        ]

    def resolve(self, model: str) -> Price:
        """The price of a model named directly or by alias; an unknown model is a 400, never free."""
        price = self.prices.get(model) or self.prices.get(self.aliases.get(model, ""))
        if price is None:
            raise BadRequest(
                f"The model {model!r} is not priced by this gateway.", param="model", code="model_not_found"
            )
        return price


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
        rates = _cost_rates(upstreams.get(model.upstream), model.upstream, name)
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
            price = _rates(fields, at, name, route.upstream)
        rates = _cost_rates(upstreams[route.upstream], route.upstream, sent)
        priority = route.priority if route.priority is not None else position
        found.append(Candidate(route.upstream, sent, priority, route.weight, position, price, rates))
    found.sort(key=lambda c: (c.priority, c.position))
    return found


def _cost_rates(upstream: UpstreamCosts | None, name: str, model: str) -> Price | None:
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
    return _rates({field: getattr(rates, field) for field in PRICE_FIELDS}, at, model, name)


def check_cost_profiles(upstreams: Mapping[str, UpstreamCosts]) -> None:
    """Every rate of every cost profile parsed (a rate no candidate uses is checked too); raises
    ConfigError naming the field."""
    for name, upstream in upstreams.items():
        profile = upstream.costs
        if profile is None:
            continue
        for model in profile.models:
            _cost_rates(upstream, name, model)
        if profile.default is not None:
            _cost_rates(upstream, name, "\x00")  # no model has that name: the default


def _multiplier(value: str, setting: str) -> Multiplier:
    fraction = parse_decimal(value, setting, allow_zero=False)
    return Multiplier(fraction.numerator, fraction.denominator)
