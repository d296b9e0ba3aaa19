"""Stripe's webhook signature scheme (signatures.verify, pure, at a given `now`): any v1 may match any
secret; a tampered body, a wrong secret, an old or future timestamp, a missing or garbled header fail."""

from __future__ import annotations

import pytest

from sidecar.payments.signatures import SignatureRejected, verify

from .support_stripe import OLD_SECRET, WEBHOOK_SECRET, sign

NOW = 1_800_000_000
BODY = b'{"id": "evt_1", "type": "checkout.session.completed"}'
SECRETS = [WEBHOOK_SECRET, OLD_SECRET]


def reason(header: str | None, body: bytes = BODY, secrets: list[str] = SECRETS, now: int = NOW) -> str:
    with pytest.raises(SignatureRejected) as err:
        verify(header, body, secrets, now=now, tolerance=300)
    assert err.value.param == "Stripe-Signature"
    assert all(s not in err.value.message for s in SECRETS)
    return err.value.reason


def test_a_signature_by_any_secret_verifies() -> None:
    assert verify(sign(BODY, WEBHOOK_SECRET, NOW), BODY, SECRETS, now=NOW, tolerance=300) == NOW
    assert verify(sign(BODY, OLD_SECRET, NOW - 300), BODY, SECRETS, now=NOW, tolerance=300) == NOW - 300
    good = sign(BODY, OLD_SECRET, NOW).split("v1=")[1]
    rotated = f"t={NOW},v1={'0' * 64},v0=abc,v1={good}"  # Stripe signs with each active secret
    assert verify(rotated, BODY, [WEBHOOK_SECRET, OLD_SECRET], now=NOW + 300, tolerance=300) == NOW


def test_what_does_not_verify_is_refused_with_its_reason() -> None:
    assert reason(sign(BODY + b" ", WEBHOOK_SECRET, NOW)) == "bad_signature"
    assert reason(sign(BODY, "whsec_someone_else", NOW)) == "bad_signature"
    assert reason(sign(BODY, WEBHOOK_SECRET, NOW - 301)) == "too_old"
    assert reason(sign(BODY, WEBHOOK_SECRET, NOW + 31)) == "in_future"  # a clock 30 s ahead is let be
    assert verify(sign(BODY, WEBHOOK_SECRET, NOW + 30), BODY, SECRETS, now=NOW, tolerance=300) == NOW + 30
    assert reason(None) == "missing_header"
    assert reason("") == "missing_header"
    for garbled in ("garbage", f"t={NOW}", "v1=abc", "t=soon,v1=abc", f"t={NOW},v0=abc", "t=-5,v1=ab"):
        assert reason(garbled) == "malformed_header", garbled
    assert reason(f"t={NOW},v1=ünïcode") == "bad_signature"
    assert reason(sign(BODY, WEBHOOK_SECRET, NOW), secrets=[]) == "no_secret"
