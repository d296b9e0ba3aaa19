"""WAIT after a settle (``settle_wait_replicas``): how many replicas acknowledged it, counted when short.

Redis replicates asynchronously: a master that acknowledged a settle and then died before its replica
received it takes the debit (and its outbox entry) with it when the replica is promoted. ``WAIT n
timeout`` after the settle script (it cannot run inside Lua) says how many replicas have it. It does
not make the write durable: fewer than asked and the debit still stands (it already happened); it is
counted (``creditgate_settle_unreplicated_total``) and logged, so an operator knows which settles a
failover in that moment could lose (docs/scaling.md, *Failover*; reconcile finds the ones it does).
"""

from __future__ import annotations

import logging

log = logging.getLogger("creditgate.replicas")


class ReplicaWait:
    def __init__(self, replicas: int, timeout_ms: int) -> None:
        self.replicas = replicas
        self.timeout_ms = timeout_ms
        self.short = 0  # settles fewer replicas acknowledged than asked (or whose WAIT failed)

    def check(self, acked: int | None, request_id: str, account: str) -> None:
        """Count and log a settle `acked` replicas acknowledged (None: the WAIT failed, unknown)."""
        if acked is not None and acked >= self.replicas:
            return
        self.short += 1
        log.warning(
            "settle of %s on %s: %s of %d replicas acknowledged it within %d ms (settle_wait_replicas); "
            "the debit stands, but a failover before it replicates would lose it",
            request_id,
            account,
            "unknown" if acked is None else acked,
            self.replicas,
            self.timeout_ms,
        )
