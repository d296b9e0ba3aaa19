"""Webhook signatures as Stripe makes them, checked before a body is parsed. Pure: the caller passes `now`.

The header is ``t=<unix seconds>,v1=<hex>[,v1=<hex>…]`` (other schemes, e.g. v0, are ignored); a v1 is
HMAC-SHA256 of ``f"{t}.".encode() + body`` keyed by a signing secret. Any v1 may match any of the secrets
(several while one rotates); the timestamp may be at most the tolerance old, and no more than
`FUTURE_SKEW_SECONDS` ahead of `now` (a sender's clock running ahead; anything later is refused)."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence
from typing import Literal

from ..errors import BadRequest

FUTURE_SKEW_SECONDS = 30
Reason = Literal["missing_header", "malformed_header", "too_old", "in_future", "bad_signature", "no_secret"]
REASONS: tuple[Reason, ...] = (
    "missing_header", "malformed_header", "too_old", "in_future", "bad_signature", "no_secret",
)  # fmt: skip


class SignatureRejected(BadRequest):
    """A webhook whose signature does not verify: a 400, nothing done. Names the header, never a secret."""

    def __init__(self, reason: Reason, header: str, message: str) -> None:
        super().__init__(message, param=header, code="invalid_signature")
        self.reason: Reason = reason


def signature(secret: str, timestamp: int, body: bytes) -> str:
    """The hex v1 signature of `body` at `timestamp`."""
    return hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()


def verify(
    header_value: str | None,
    body: bytes,
    secrets: Sequence[str],
    *,
    now: int,
    tolerance: int,
    header: str = "Stripe-Signature",
) -> int:
    """The signed timestamp, when `header_value` signs `body` with one of `secrets` within `tolerance`
    seconds of `now` (and at most FUTURE_SKEW_SECONDS ahead); else SignatureRejected (its reason, for
    the rejection counter)."""
    if not secrets:
        raise SignatureRejected("no_secret", header, "This webhook has no signing secret configured.")
    if not header_value:
        raise SignatureRejected("missing_header", header, f"Missing the {header} header.")
    timestamp: int | None = None
    signed: list[str] = []
    for item in header_value.split(","):
        name, eq, value = item.strip().partition("=")
        if not eq:
            continue
        if name == "t" and value.isascii() and value.isdigit() and len(value) <= 12:
            timestamp = int(value)
        elif name == "v1":
            signed.append(value.strip())
    if timestamp is None or not signed:
        raise SignatureRejected(
            "malformed_header", header, f"The {header} header needs t=<timestamp> and v1=<signature>."
        )
    if now - timestamp > tolerance:
        raise SignatureRejected("too_old", header, f"The {header} timestamp is too old.")
    if timestamp - now > min(tolerance, FUTURE_SKEW_SECONDS):
        raise SignatureRejected("in_future", header, f"The {header} timestamp is in the future.")
    expected = [signature(secret, timestamp, body).encode() for secret in secrets]
    matched = False
    for candidate in signed:
        got = candidate.encode("ascii", "replace")
        for want in expected:
            matched |= hmac.compare_digest(got, want)  # every pair compared: no early exit to time
    if not matched:
        raise SignatureRejected("bad_signature", header, f"The {header} signature does not match.")
    return timestamp
