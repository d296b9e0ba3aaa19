"""Money: integer micro-credits, their bounds and their decimal form. Dependency-free.

1 credit = 1,000,000 micro-credits. Every amount in Redis, Lua, SQL and Python is an integer count of
micro-credits; a decimal string of credits appears only at the edges (settings, admin input, messages).
"""

from __future__ import annotations

MICRO = 1_000_000  # micro-credits per credit
# Amounts stay below 2**53 so that Redis' Lua numbers (doubles) hold them exactly.
MAX_MICRO = 2**53 - 1
# The largest charge one settlement may debit (the settle script refuses more, before writing anything):
# a billion credits, far above any real request and far below 2**53.
MAX_CHARGE = 10**15 - 1
# The largest single grant: one billion credits, which keeps every balance far below 2**53.
MAX_GRANT = 10**15


def format_credits(micro: int) -> str:
    """Micro-credits as an exact decimal string of credits: 12_500_000 -> '12.5'."""
    sign = "-" if micro < 0 else ""
    whole, frac = divmod(abs(micro), MICRO)
    if not frac:
        return f"{sign}{whole}"
    return f"{sign}{whole}.{frac:06d}".rstrip("0")
