"""Money back out of a wallet: the debit script, which takes credits back once per debit id because their
money went back (a provider refund, a dispute, an operator's refund). A mixin of `Balances`, which runs
the script; the ledger learns of it from the outbox (a 'reversal' row), like every debit."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from redis.commands.core import AsyncScript

from .errors import NotInitialized, UnknownAccount
from .keys import KeySpace
from .money import MAX_GRANT
from .wallet import WalletPolicy


@dataclass(frozen=True, slots=True)
class Debit:
    taken: int  # micro-credits taken back (by the first call with this id)
    balance: int  # the balance after
    now: bool  # False: an earlier call with this id took it


class Debits:
    keys: KeySpace
    wallet: WalletPolicy
    _debit: AsyncScript

    async def _call(
        self, name: str, script: AsyncScript, keys: list[Any], args: list[Any], *, retried: bool = False
    ) -> Any:
        raise NotImplementedError

    async def debit(
        self,
        account: str,
        debit_id: str,
        amount: int,
        *,
        grant_id: str | None = None,
        only_grant: bool = False,
    ) -> Debit:
        """Take back up to `amount` micro-credits, once per `debit_id`: never more than the account has
        available (the balance stays at or above what its holds hold, so never below zero), drawn from
        `grant_id` first, then the other grants; with `only_grant` only from that grant's remainder.
        A retry returns what the first call took."""
        if not 0 < amount <= MAX_GRANT:
            raise ValueError(f"amount must be in 1..{MAX_GRANT}")
        if only_grant and not grant_id:
            raise ValueError("only_grant needs a grant_id")
        k = self.keys.account(account)
        status, taken, balance = await self._call(
            "debit",
            self._debit,
            [k.balance, k.debited(debit_id), k.ready, k.grants, k.wallet_due, k.outbox],
            [
                debit_id,
                str(amount),
                account,
                grant_id or "",
                "1" if only_grant else "0",
                self.wallet.idle_expiry_ms,
                self.wallet.clock(),
            ],
            retried=True,
        )
        if status == -1:
            raise UnknownAccount(account)
        if status == -4:
            raise NotInitialized(account)
        return Debit(int(taken), int(balance), status == 1)
