"""How many output tokens a balance affords. Pure, integers only."""

from __future__ import annotations

from .pricing import Multiplier, Price


def affordable_output_tokens(
    available: int, price: Price, prompt_tokens: int, n: int, multiplier: Multiplier, cap: int
) -> int:
    """The largest output limit k (at most `cap`) whose hold, ``worst_case(prompt, n × k)``, fits in
    `available` micro-credits; 0 when not even the prompt fits.

    ceil(base × num ÷ (scale × den)) ≤ available  ⇔  base × num ≤ available × scale × den, as available
    is an integer; base = prompt × prompt price + fee + n × k × completion price."""
    budget = available * price.scale * multiplier.denominator
    fixed = (prompt_tokens * price.prompt + price.request_fee) * multiplier.numerator
    if available < 0 or fixed > budget:
        return 0
    per_token = n * price.completion * multiplier.numerator
    if per_token == 0:
        return cap
    return min(cap, (budget - fixed) // per_token)
