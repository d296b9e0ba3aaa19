"""How many output tokens a balance affords, and a body whose output limit is lowered to it. Pure,
integers only."""

from __future__ import annotations

from typing import Any

import msgspec

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


LIMIT_FIELDS = ("max_completion_tokens", "max_tokens", "max_output_tokens")
_DEFAULT_FIELD = {"chat": "max_tokens", "completions": "max_tokens", "responses": "max_output_tokens"}


def with_output_limit(body: bytes, route_kind: str, limit: int) -> bytes:
    """The JSON object `body` with every output-limit field it has set to `limit`, or the route's own
    field added when it has none."""
    data: dict[str, Any] = msgspec.json.decode(body)
    present = [name for name in LIMIT_FIELDS if data.get(name) is not None]
    for name in present or [_DEFAULT_FIELD[route_kind]]:
        data[name] = limit
    return msgspec.json.encode(data)
