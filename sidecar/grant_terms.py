"""A grant's terms as the admin API and the CLI take them: kind, priority, a fixed end or an idle expiry,
when it took effect, its payment reference. Checked here; every error names its field."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from decimal import Decimal
from typing import ClassVar

import msgspec

from .errors import BadRequest, ConfigError
from .money import MAX_GRANT, MICRO
from .wallet import DAY_MS, GRANT_KINDS, GrantTerms

MAX_PRIORITY = 1_000_000


class GrantBody(msgspec.Struct, forbid_unknown_fields=True):
    amount: int | None = None
    credits: str | None = None
    kind: str = "grant"
    note: str | None = None
    priority: int | None = None  # lower is drawn first (default by kind: wallet.DEFAULT_PRIORITY)
    expires_at: str | None = None  # ISO 8601 with a zone offset, in the future
    expires_in_days: int | None = None
    idle_expiry: bool | None = None  # default: free kinds without a fixed end expire when idle
    effective_at: str | None = None  # ISO 8601, not in the future (its order among equal grants)
    payment_ref: str | None = None


def _instant(text: str, field: str) -> int:
    try:
        at = dt.datetime.fromisoformat(text)
    except ValueError:
        raise BadRequest(f"{field} must be an ISO 8601 time, got {text!r}.", param=field) from None
    if at.tzinfo is None:
        raise BadRequest(f"{field} needs a zone offset (e.g. Z or +02:00).", param=field)
    return int(at.timestamp()) * 1000 + at.microsecond // 1000


def grant_terms(body: GrantBody, now_ms: int) -> GrantTerms:
    """The terms of a grant body, checked against `now_ms`."""
    if body.kind not in GRANT_KINDS:
        raise BadRequest(f"kind must be one of {', '.join(GRANT_KINDS)}.", param="kind")
    if body.priority is not None and not -MAX_PRIORITY <= body.priority <= MAX_PRIORITY:
        raise BadRequest(f"priority must be between -{MAX_PRIORITY} and {MAX_PRIORITY}.", param="priority")
    if body.expires_at is not None and body.expires_in_days is not None:
        raise BadRequest("Give at most one of expires_at and expires_in_days.", param="expires_at")
    expires_ms = 0
    if body.expires_at is not None:
        expires_ms = _instant(body.expires_at, "expires_at")
        if expires_ms <= now_ms:
            raise BadRequest("expires_at must be in the future.", param="expires_at")
    if body.expires_in_days is not None:
        if not 1 <= body.expires_in_days <= 36_500:
            raise BadRequest("expires_in_days must be between 1 and 36500.", param="expires_in_days")
        expires_ms = now_ms + body.expires_in_days * DAY_MS
    if expires_ms > 253_402_300_799_000:  # 9999-12-31
        raise BadRequest("expires_at is too far ahead.", param="expires_at")
    effective_ms = None
    if body.effective_at is not None:
        effective_ms = _instant(body.effective_at, "effective_at")
        if effective_ms > now_ms:
            raise BadRequest("effective_at cannot be in the future.", param="effective_at")
        if effective_ms <= 0:
            raise BadRequest("effective_at must be after 1970.", param="effective_at")
    return GrantTerms(body.kind, body.priority, expires_ms, body.idle_expiry, effective_ms)


@dataclass(frozen=True, slots=True)
class Starter:
    """The grant every new account gets (settings starter_credits, starter_expiry_days)."""

    amount: int
    expiry_days: int | None

    IDEMPOTENCY_KEY: ClassVar[str] = "starter"

    def terms(self, now_ms: int) -> GrantTerms:
        expires_ms = 0 if self.expiry_days is None else now_ms + self.expiry_days * DAY_MS
        return GrantTerms("starter", None, expires_ms)


def starter_of(credits: str | None, expiry_days: int | None) -> Starter | None:
    """The starter grant of the settings, or None; a ConfigError naming starter_credits if it is not an
    exact positive number of credits."""
    if credits is None:
        return None
    try:
        exact = Decimal(credits) * MICRO
    except ArithmeticError:
        exact = Decimal("NaN")
    if not exact.is_finite() or exact != exact.to_integral_value() or not 0 < exact <= MAX_GRANT:
        raise ConfigError(
            "starter_credits must be a decimal number of credits above 0 (6 decimals at most), "
            f"got {credits!r}.",
            param="starter_credits",
        )
    return Starter(int(exact), expiry_days)
