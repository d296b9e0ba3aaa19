"""Who a request acts for. Pure: no I/O (admission imports it)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Caller:
    """The account a request acts for, and its API key's id (None in account-header mode)."""

    account: str
    key_id: str | None = None
