"""Referral codes and the referral settings, checked (config.py checks them at startup with this). Pure:
no I/O. A code is `referral_code_prefix` and 8 characters drawn with `secrets` from an alphabet of upper
case letters and digits without look-alikes."""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any

from ..errors import ConfigError
from ..money import MAX_GRANT, MICRO

# Upper case letters and digits without the look-alikes (0/O, 1/I/L): read aloud or typed from paper.
CODE_ALPHABET = "ABCDEFGHJKMNPQRSTUVWXYZ23456789"
CODE_CHARS = 8
MAX_CODE_LENGTH = 100


@dataclass(frozen=True, slots=True)
class ReferralPolicy:
    """The referral settings, checked: the codes' prefix, how many each account has, how often one may
    be used, and the bonus its owner earns (micro-credits) when a referred account first buys."""

    prefix: str = "STR-"
    per_account: int = 5
    max_uses: int = 10
    bonus: int = 25 * MICRO

    @classmethod
    def of(cls, s: Any) -> ReferralPolicy:
        """From the payment settings (`referral_*`); a bad one is a ConfigError naming it."""
        prefix = s.referral_code_prefix
        if not (prefix.isascii() and prefix.isprintable() and len(prefix) <= 50) or " " in prefix:
            raise ConfigError(
                "referral_code_prefix must be at most 50 printable ASCII characters, no spaces.",
                param="referral_code_prefix",
            )
        try:
            exact = Decimal(s.referral_bonus_credits) * MICRO
        except (InvalidOperation, ArithmeticError):
            exact = Decimal(-1)
        if not exact.is_finite() or exact != exact.to_integral_value() or not 0 <= exact <= MAX_GRANT:
            raise ConfigError(
                "referral_bonus_credits must be a decimal number of credits (6 decimals at most, 0: none).",
                param="referral_bonus_credits",
            )
        return cls(prefix, s.referral_codes_per_account, s.referral_code_max_uses, int(exact))

    def new_code(self) -> str:
        return self.prefix + "".join(secrets.choice(CODE_ALPHABET) for _ in range(CODE_CHARS))
