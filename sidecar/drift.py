"""The last reconcile pass, kept for monitoring (``/admin/ledger``, the ``creditgate_*drift*`` gauges), and
its findings logged."""

from __future__ import annotations

import logging
import time

from .reconcile import Report
from .reconcile_stats import ReconcileStats

log = logging.getLogger("creditgate.app")


class DriftState:
    """The last reconcile pass, for monitoring (``/admin/ledger``, the ``creditgate_*drift*`` gauges)."""

    def __init__(self) -> None:
        self.accounts = 0  # accounts whose balance or held total drift
        self.total = 0  # Σ |balance drift|
        self.checked_at = 0.0
        self.stats = ReconcileStats(repairs={})

    def update(self, report: Report, seconds: float) -> None:
        self.accounts = len(report.accounts)
        self.total = sum(abs(d.amount) for d in report.accounts)
        self.checked_at = time.time()
        stats = self.stats
        stats.drift, stats.last_run, stats.duration = report.by_kind(), self.checked_at, seconds
        for kind, count in report.repaired.items():
            stats.repairs[kind] = stats.repairs.get(kind, 0) + count
        for drift in report.accounts:
            log.warning(
                "ledger drift on %s: Redis %s, ledger says %d; held %d, its holds sum to %d",
                drift.account,
                drift.redis_balance,
                drift.expected,
                drift.redis_held,
                drift.holds_total,
            )
        for hold in report.holds:
            log.warning(
                "%s on %s: request %s holds %d (lease end %s)",
                hold.kind,
                hold.account,
                hold.request_id,
                hold.amount,
                hold.lease_end_ms,
            )
        for grant in report.grants:
            log.warning(
                "grant_unapplied on %s: money in %s (%d) not credited to Redis after %.0f s",
                grant.account,
                grant.idempotency_id,
                grant.amount,
                grant.age_seconds,
            )
