"""The reconciler's figures for /metrics: the last pass's drift per kind, the repairs, when it ran."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from .reconcile import DRIFT_KINDS


@dataclass
class ReconcileStats:
    """The reconciler's figures (drift.py's ``DriftState`` keeps them): the last pass's drift per kind
    (items, Σ |micro-credits|), repairs made so far per kind, and when and how long the last pass ran."""

    drift: dict[str, tuple[int, int]] = field(default_factory=dict)
    repairs: dict[str, int] = field(default_factory=dict)
    last_run: float = 0.0  # unix time the last pass finished (0: none yet)
    started: float = field(default_factory=time.time)  # the job's start (the timestamp until a pass ran)
    duration: float = 0.0


def reconcile_families(stats: ReconcileStats) -> Iterator[Metric]:
    """The ``creditgate_reconcile_*`` series of a process that runs the reconciler."""
    items = GaugeMetricFamily(
        "creditgate_reconcile_drift",
        "Drift the last reconcile pass found, by kind: accounts (balance, held), holds (orphan_hold, "
        "stale_hold) or money-in rows (grant_unapplied).",
        labels=["kind"],
    )
    micro = GaugeMetricFamily(
        "creditgate_reconcile_drift_microcredits",
        "Sum of the absolute micro-credits of the last pass's drift, by kind.",
        labels=["kind"],
    )
    repairs = CounterMetricFamily(
        "creditgate_reconcile_repairs", "Drift items repaired by this process, by kind.", labels=["kind"]
    )
    for kind in DRIFT_KINDS:
        count, total = stats.drift.get(kind, (0, 0))
        items.add_metric([kind], count)
        micro.add_metric([kind], total)
        repairs.add_metric([kind], stats.repairs.get(kind, 0))
    yield items
    yield micro
    yield repairs
    yield GaugeMetricFamily(
        "creditgate_reconcile_last_run_timestamp_seconds",
        "When the last reconcile pass finished (unix time; the reconciler's start until one has).",
        value=stats.last_run or stats.started,
    )
    yield GaugeMetricFamily(
        "creditgate_reconcile_duration_seconds",
        "How long the last reconcile pass took.",
        value=stats.duration,
    )
