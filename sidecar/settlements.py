"""Settlements Redis did not take in time, kept and sent again until it does.

A settle that still fails after the request path's own retries (Redis away for longer than ~6 s) is not
dropped: its charge and ledger entry wait here, and a background task sends them again every few
seconds. The settle script is idempotent by request id, so sending again one that did reach Redis
changes nothing, and one whose hold was reaped meanwhile still debits, once.

Not for ever: a request's settled marker lives only until its window end (``settled_marker_seconds``
after the settle's first try), and from then on Redis refuses the settle. So once the window has ended
(by this host's clock, plus a margin for clocks apart) the settlement gives up on Redis: its usage row
is written straight to the Postgres ledger (skipped there if the flusher already wrote it: one row per
request id), with an ERROR log and ``creditgate_settlements_expired_total``. Redis then holds a balance
the ledger does not; reconcile reports the account's drift and ``reconcile --repair`` debits Redis to
the ledger's figure: charged once, never lost. At shutdown what is still waiting gets a last try
before the outbox's final flush; anything Redis still refuses is logged with its request id, account
and charge, so an operator can replay it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import msgspec
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from .balances import Balances
from .errors import UnknownAccount, WindowClosed
from .outbox import UsageEvent, encode_event, ledger_row

log = logging.getLogger("creditgate.settlements")
# How long past its window end (by this host's clock) a settlement still waits before it gives up on
# Redis: clocks a little apart must not let a try land while its usage row is written to the ledger.
GIVE_UP_MARGIN_MS = 60_000


@dataclass(frozen=True, slots=True)
class PendingSettlement:
    account: str
    request_id: str
    charge: int  # micro-credits
    event: UsageEvent
    window_end_ms: int  # every try carries it; Redis refuses the settle from then on

    def ledger_row(self) -> tuple[Any, ...]:
        """The usage row the flusher would have written from the settle's outbox entry: the same event, so
        the same created_at (its settled_ms, set once before the first try) and so the same row, should
        the settle have reached Redis after all and its entry be flushed too. (An event without times,
        which the request path never makes, gets now: its flushed entry would take its stream id's.)"""
        event = msgspec.structs.replace(
            self.event, request_id=self.request_id, account=self.account, charge=self.charge
        )
        return ledger_row({"d": encode_event(event)}, f"{time.time_ns() // 1_000_000}-0")


class PendingSettlements:
    def __init__(self, balances: Balances, *, limit: int = 100_000) -> None:
        self.balances = balances
        self.limit = limit
        self.pending: dict[str, PendingSettlement] = {}
        self.settled = 0  # taken by Redis on a later try
        self.dropped = 0  # refused for good: the backlog was full
        self.expired = 0  # gave up on Redis after the window: written to the ledger instead
        # Writes an expired settlement's usage row to the ledger (the app points it at the ledger store);
        # until it is set, or while it fails, the settlement stays waiting.
        self.write_ledger: Callable[[PendingSettlement], Awaitable[None]] | None = None
        self.now_ms: Callable[[], int] = lambda: int(time.time() * 1000)

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
        goes on: one bad settlement never holds back the ones after it. Those past their window (and the
        margin) are written to the ledger instead, first."""
        for item in list(self.pending.values()):
            if self.now_ms() >= item.window_end_ms + GIVE_UP_MARGIN_MS:
                await self._give_up(item)
        taken = 0
        for request_id, item in list(self.pending.items()):
            try:
                await self.balances.settle(
                    item.account, item.request_id, item.charge, item.event, window_end_ms=item.window_end_ms
                )
            except WindowClosed:  # Redis says the window ended (its clock ahead of ours)
                await self._give_up(item)
                continue
            except UnknownAccount:  # never deleted: Redis lost it; it waits for the rebuild (or its window)
                log.warning(
                    "settlement of %s waits: account %s is missing from Redis", request_id, item.account
                )
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

    async def _give_up(self, item: PendingSettlement) -> None:
        """Write the settlement's usage row to the ledger instead of Redis; it stays waiting if that fails."""
        if self.write_ledger is None:
            return
        try:
            await self.write_ledger(item)
        except Exception as exc:  # Postgres away too: kept, tried again on the next pass
            log.error(
                "settlement of %s past its window: the ledger refused it too (%r)", item.request_id, exc
            )
            return
        del self.pending[item.request_id]
        self.expired += 1
        log.error(
            "settlement of %s (%d micro-credits on %s) gave up on Redis after its window "
            "(settled_marker_seconds): written to the ledger; `creditgate reconcile --repair` debits Redis",
            item.request_id,
            item.charge,
            item.account,
        )

    def log_lost(self) -> None:
        """At shutdown: name every settlement Redis never took, for a replay by hand."""
        for item in self.pending.values():
            log.error(
                "settlement lost at shutdown: request %s, account %s, %d micro-credits (Redis unreachable)",
                item.request_id,
                item.account,
                item.charge,
            )
