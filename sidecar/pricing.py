"""Prices, the worst-case estimate and the cost of a request, in integer micro-credits. Pure: no I/O.

Prices are configured as decimal strings of credits per 1K tokens (and credits per request for the fee).
They are read exactly (``decimal.Decimal`` -> ``fractions.Fraction``), brought to one integer scale per
model at startup, and every cost is computed with integers only:

    base   = uncached_prompt × prompt + cached × cached_prompt + completion × completion + request_fee
    charge = ceil(base × multiplier)                        (micro-credits)

Rounding happens once, at the end, upward to the next micro-credit. The multiplier applies to the whole
base, the fee included: pooled key ``pooled_multiplier`` (1.25 by default), the caller's own key
``byok_multiplier`` (1 by default).
A model's upstream candidates and their provider cost rates (``ceil(base)`` at multiplier 1): price_routes.py.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from fractions import Fraction
from typing import TYPE_CHECKING, Protocol

from .errors import BadRequest, ConfigError
from .money import MAX_CHARGE

if TYPE_CHECKING:
    from .price_routes import Candidate, UpstreamCosts
    from .tables import RouteConfig


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
        from .price_routes import PRICE_FIELDS, check_cost_profiles, model_routes, rates_of  # (imports this)

        prices: dict[str, Price] = {}
        aliases: dict[str, str] = {}
        routes: dict[str, tuple[Candidate, ...]] = {}
        orders: dict[str, str] = {}
        check_cost_profiles(upstreams := settings.upstream_table())
        warnings: list[str] = []
        for name, model in settings.models.items():
            where = f"models.{name}"
            own = {field: getattr(model, field) for field in PRICE_FIELDS}
            base = dataclasses.replace(
                rates_of(own, where, name, model.upstream),
                max_output_tokens=model.max_output_tokens,
                unseen_input_tokens={
                    kind: tokens
                    for kind, setting in _SETTING.items()
                    if (tokens := getattr(model, setting)) is not None
                },
            )
            routes[name], below = model_routes(name, model, base, upstreams)
            prices[name] = dataclasses.replace(base, upstream=routes[name][0].upstream)  # the primary's
            orders[name] = model.routing_order or settings.routing_order
            warnings += below
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
            from .price_routes import only_candidate

            found = (only_candidate(price),)
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


def _multiplier(value: str, setting: str) -> Multiplier:
    fraction = parse_decimal(value, setting, allow_zero=False)
    return Multiplier(fraction.numerator, fraction.denominator)
