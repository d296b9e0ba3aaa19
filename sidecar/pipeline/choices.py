"""A request's upstream candidates as it would use them: the provider key each goes out with (the pooled
one, the account's stored one, or the caller's inline one), the multiplier that key is charged at, and
the request's worst case there. Pure: no I/O."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from ..price_routes import Candidate
from ..pricing import Multiplier, Price, PriceTable, worst_case

KeySource = Literal["pool", "vault", "inline"]
NO_KEYS: Mapping[str, str] = {}


def key_headers(source: KeySource, marked_up: bool) -> dict[str, str]:
    """The answer's headers on where the provider key came from (pool, vault, inline) and whether the
    pooled markup applied (Admission.marked_up), for a body (respond.py) and a stream (forward.py)."""
    return {"x-creditgate-key-source": source, "x-creditgate-markup": "true" if marked_up else "false"}


@dataclass(frozen=True, slots=True)
class Choice:
    """One upstream candidate as this request would use it: the key it goes out with, the multiplier
    that key is charged at, and this request's worst case there."""

    candidate: Candidate
    multiplier: Multiplier
    api_key: str | None = field(repr=False)  # the caller's own (inline or vault); None: the pooled key
    key_source: KeySource
    hold: int  # the worst case at this candidate's price and multiplier

    # What ordering and the breaker read (routing.Routable).
    @property
    def circuit(self) -> tuple[str, str]:
        return self.candidate.circuit

    @property
    def priority(self) -> int:
        return self.candidate.priority

    @property
    def weight(self) -> int:
        return self.candidate.weight

    @property
    def position(self) -> int:
        return self.candidate.position

    @property
    def cost(self) -> int:
        return self.hold

    @property
    def upstream(self) -> str:
        return self.candidate.upstream

    @property
    def price(self) -> Price:
        return self.candidate.price


def choices_for(
    prices: PriceTable,
    price: Price,
    inline: str | None,
    own_keys: Mapping[str, str],
    providers: Mapping[str, str],
    prompt_tokens: int,
    output_tokens: int,
) -> tuple[Choice, ...]:
    """The model's candidates with the key each would go out with: the inline key (the byok_header), and
    then only the candidates of the primary's provider (a caller's key is never sent to another
    provider); else the account's stored key for the candidate's provider (the vault); else the pooled
    key. An own key is charged at byok_multiplier, the pooled one at pooled_multiplier."""
    candidates = prices.candidates(price)

    def provider(c: Candidate) -> str:
        return providers.get(c.upstream, c.upstream)

    if inline is not None:
        first = provider(candidates[0])
        candidates = tuple(c for c in candidates if provider(c) == first)
    out: list[Choice] = []
    for c in candidates:
        key = inline or own_keys.get(provider(c))
        source: KeySource = "inline" if inline else "vault" if key else "pool"
        multiplier = prices.byok if key else prices.pooled
        hold = worst_case(c.price, prompt_tokens, output_tokens, multiplier)
        out.append(Choice(c, multiplier, key, source, hold))
    return tuple(out)
