"""The reserve refusals that become the same error whoever asked for the hold (a request's hold stage,
pipeline/hold.py, and an operation's hold, metering/operations.py): one place, so both answer alike."""

from __future__ import annotations

import datetime as dt

from .errors import CreditgateError, InvoiceOverdue, SpendCapExceeded, Unauthorized
from .scripts import Reservation, ReserveStatus


def refusal(res: Reservation, account: str) -> CreditgateError | None:
    """The error of a blocked account (402 invoice_overdue), a spend cap overshot (402) or an account gone
    (401); None for any other status (the caller's own refusals, or held)."""
    if res.status is ReserveStatus.BLOCKED:
        return InvoiceOverdue(account)
    if res.status is ReserveStatus.CAPPED and res.cap is not None:
        cap = res.cap
        resets = None if cap.resets_ms is None else _iso(cap.resets_ms)
        return SpendCapExceeded(cap.scope, cap.period, cap.limit, cap.used, resets)
    if res.status is ReserveStatus.NO_ACCOUNT:
        return Unauthorized("The account behind this key no longer exists.")
    return None


def _iso(ms: int) -> str:
    """A time as ISO 8601 in UTC, to the second (when a spend cap resets)."""
    return dt.datetime.fromtimestamp(ms // 1000, dt.UTC).isoformat().replace("+00:00", "Z")
