"""Settlements Redis did not take in time, kept and sent again until it does.

A settle that still fails after the request path's own retries (Redis away for longer than ~6 s) is not
dropped: its charge and ledger entry wait here, and a background task sends them again every few
seconds. The settle script is idempotent by request id, so sending again one that did reach Redis
changes nothing, and one whose hold was reaped meanwhile still debits, once. At shutdown what is still
waiting gets a last try before the outbox's final flush; anything Redis still refuses is logged with
its request id, account and charge, so an operator can replay it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from .balances import Balances
from .errors import UnknownAccount
from .outbox import UsageEvent

log = logging.getLogger("creditgate.settlements")


@dataclass(frozen=True, slots=True)
class PendingSettlement:
    account: str
    request_id: str
    charge: int  # micro-credits
    event: UsageEvent


class PendingSettlements:
    def __init__(self, balances: Balances, *, limit: int = 100_000) -> None:
        self.balances = balances
        self.limit = limit
        self.pending: dict[str, PendingSettlement] = {}
        self.settled = 0  # taken by Redis on a later try
        self.dropped = 0  # refused for good: the account is gone, or the backlog was full

    def add(self, item: PendingSettlement) -> None:
        if len(self.pending) >= self.limit:
            self.dropped += 1
            log.error(
                "%d settlements already wait for Redis; %s (%d micro-credits on %s) is dropped",
                len(self.pending),
                item.request_id,
                item.charge,
                item.account,
            )
            return
        self.pending[item.request_id] = item

    async def retry(self) -> int:
        """Send every waiting settlement once, oldest first; returns how many Redis took. Stops at the
        first connection failure: Redis is still away, the rest waits for the next try. Any other error
        (Redis refusing this one settlement, say) is logged and that one stays waiting, but the pass
        goes on: one bad settlement never holds back the ones after it."""
        taken = 0
        for request_id, item in list(self.pending.items()):
            try:
                await self.balances.settle(item.account, item.request_id, item.charge, item.event)
            except UnknownAccount:
                self.dropped += 1
                del self.pending[request_id]
                log.error("settlement of %s: account %s no longer exists", request_id, item.account)
                continue
            except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
                log.warning("%d settlements still wait for Redis (%r)", len(self.pending), exc)
                break
            except (RedisError, ValueError) as exc:
                log.error(
                    "settlement of %s (%d micro-credits on %s) refused (%r); it stays waiting",
                    request_id,
                    item.charge,
                    item.account,
                    exc,
                )
                continue
            del self.pending[request_id]
            taken += 1
        self.settled += taken
        if taken:
            log.info("%d settlements that had waited for Redis are settled", taken)
        return taken

    def log_lost(self) -> None:
        """At shutdown: name every settlement Redis never took, for a replay by hand."""
        for item in self.pending.values():
            log.error(
                "settlement lost at shutdown: request %s, account %s, %d micro-credits (Redis unreachable)",
                item.request_id,
                item.account,
                item.charge,
            )
