"""What a delivery sends, from an event's body (`Event.body()`): the webhook's bytes and signature header,
an email's subject and text (amounts as the event has them: integer micro-credits). Pure."""

from __future__ import annotations

import json
from typing import Any

from ..payments.signatures import signature

SIGNATURE_HEADER = "creditgate-signature"
EVENT_ID_HEADER = "creditgate-event-id"
EVENT_TYPE_HEADER = "creditgate-event-type"

# Our words for each event type (an unknown type is still sent, under its name).
SUBJECTS = {
    "balance.low": "Credit balance is low",
    "spend.high": "Spending crossed an alert amount",
    "balance.low_runway": "Credits will not cover the next 48 hours of recurring charges",
    "reload.requested": "Auto-reload started a top-up",
    "reload.failed": "Auto-reload could not top up",
    "reload.disabled": "Auto-reload was turned off after repeated failures",
}


def webhook_body(body: dict[str, Any]) -> bytes:
    """The POSTed bytes: compact JSON, keys sorted (what the signature covers, byte for byte)."""
    return json.dumps(body, separators=(",", ":"), sort_keys=True, ensure_ascii=False).encode()


def signature_header(secret: str, timestamp: int, payload: bytes) -> str:
    """``t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<payload>")>``, as Stripe signs."""
    return f"t={timestamp},v1={signature(secret, timestamp, payload)}"


def webhook_headers(body: dict[str, Any], secret: str, timestamp: int, payload: bytes) -> dict[str, str]:
    return {
        "Content-Type": "application/json",
        SIGNATURE_HEADER: signature_header(secret, timestamp, payload),
        EVENT_ID_HEADER: str(body["id"]),
        EVENT_TYPE_HEADER: str(body["type"]),
    }


def subject(body: dict[str, Any]) -> str:
    about = SUBJECTS.get(str(body["type"]), f"Event {body['type']}")
    return f"[creditgate] {about} (account {body['account']})"


def text(body: dict[str, Any]) -> str:
    """The email's plain text: what happened, the event's facts, its id (the webhook's event id)."""
    lines = [f"{SUBJECTS.get(str(body['type']), 'An event')} for account {body['account']}.", ""]
    for name, value in sorted(body["data"].items()):
        lines.append(f"  {name}: {_shown(value)}")
    lines += ["", f"Event: {body['type']} {body['id']}", f"At: {body['created_at']}", ""]
    return "\n".join(lines)


def _shown(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
