"""What an account's balance read returns (``Balances.balance``): its balance, held total and holds."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class HoldView:
    request_id: str
    amount: int
    lease_end_ms: int


@dataclass(frozen=True, slots=True)
class AccountBalance:
    account: str
    balance: int
    held: int
    holds: list[HoldView]

    @property
    def available(self) -> int:
        return self.balance - self.held
