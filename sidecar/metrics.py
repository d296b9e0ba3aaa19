"""Prometheus metrics: every object defined once, on a registry of the app's own, and ``GET /metrics``.

Names follow the shared contract (``creditgate_*``, base units, ``_total`` counters, ``_seconds``
durations). Labels stay bounded: route, model (a configured model, else ``other``), status class,
cache result, script, reason — never an account, key or user. Modules keep plain stats of their own
(``FlushStats``, ``DriftState``, the proxy's in-flight set); a collector reads them at scrape time, and
the outbox backlog is refreshed by the ``/metrics`` handler just before rendering. That read is a Redis
round trip on every scrape, in either mode and with or without traffic, so its outcome is also
``creditgate_redis_up``: 1 when Redis answered it within ``BACKLOG_TIMEOUT``, 0 when it failed or timed
out (the backlog gauges then keep their last values).

A process exports the series of what it does. ``Metrics(serving=False)`` (``creditgate flush``) has no
request, hold, script or drift series; ``Metrics(flushing=False)`` (a serving process that runs no
flusher: ``flusher_enabled: false``, or a worker other than 0) has no ``creditgate_flush_*``,
``creditgate_ledger_rows_written_total`` or ``creditgate_outbox_dead_letters_total``, which would read 0
forever there (``reconciling=False``: no ``creditgate_reconcile_*``). All keep ``creditgate_build_info``,
the outbox backlog gauges and ``creditgate_redis_up``: the backlog is the outbox's, whoever flushes it.
"""

from __future__ import annotations

import asyncio
import logging
import platform
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector

from . import __version__
from .metric_series import Series
from .observe import RequestRecord
from .reconcile_stats import ReconcileStats, reconcile_families

log = logging.getLogger("creditgate.metrics")
# No `*_created` series: they would double the series count and nothing reads them (process-wide).
disable_created_metrics()  # type: ignore[no-untyped-call]

# LLM calls take from milliseconds (embeddings) to minutes (long generations).
LLM_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600)
OVERHEAD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25)
SCRIPT_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1)
FLUSH_ROWS_BUCKETS = (1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000)
FLUSH_SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
BACKLOG_TIMEOUT = 1.0  # seconds the /metrics handler waits for the outbox backlog (else redis_up is 0)


@dataclass
class Sources:
    """Where the scrape-time values come from; set once the app's services exist."""

    holds_active: Callable[[], int] = lambda: 0
    rows_written: Callable[[], int] = lambda: 0
    flush_failures: Callable[[], int] = lambda: 0
    dead_letters: Callable[[], int] = lambda: 0
    settlements_expired: Callable[[], int] = lambda: 0
    settle_unreplicated: Callable[[], int] = lambda: 0
    drift: Callable[[], tuple[int, int]] = lambda: (0, 0)
    reconcile: Callable[[], ReconcileStats] = ReconcileStats
    backlog: Callable[[], Awaitable[tuple[int, float]]] | None = None  # refreshed on each scrape


class _StatsCollector(Collector):
    def __init__(self, sources: Sources, serving: bool, flushing: bool, reconciling: bool) -> None:
        self.sources = sources
        self.serving, self.flushing, self.reconciling = serving, flushing, reconciling

    def collect(self) -> Iterator[Metric]:
        if self.serving:
            yield GaugeMetricFamily(
                "creditgate_holds_active",
                "Exchanges holding credits in this process.",
                value=self.sources.holds_active(),
            )
        if self.flushing:
            yield from self._flushed()
        if self.serving:
            yield CounterMetricFamily(
                "creditgate_settlements_expired",
                "Settlements Redis did not take within their window, written to the ledger instead.",
                value=self.sources.settlements_expired(),
            )
            yield CounterMetricFamily(
                "creditgate_settle_unreplicated",
                "Settles fewer replicas acknowledged than settle_wait_replicas asked (the debit stands).",
                value=self.sources.settle_unreplicated(),
            )
            yield from self._drift()
            if self.reconciling:
                yield from reconcile_families(self.sources.reconcile())

    def _flushed(self) -> Iterator[Metric]:
        s = self.sources
        yield CounterMetricFamily(
            "creditgate_ledger_rows_written", "Rows the flusher wrote to the ledger.", value=s.rows_written()
        )
        yield CounterMetricFamily(
            "creditgate_flush_failures", "Failed ledger batch writes (retried).", value=s.flush_failures()
        )
        yield CounterMetricFamily(
            "creditgate_outbox_dead_letters",
            "Outbox entries the ledger can never take, parked in the dead-letter streams.",
            value=s.dead_letters(),
        )

    def _drift(self) -> Iterator[Metric]:
        accounts, total = self.sources.drift()
        yield GaugeMetricFamily(
            "creditgate_ledger_drift_accounts",
            "Accounts whose Redis balance disagrees with the ledger.",
            value=accounts,
        )
        yield GaugeMetricFamily(
            "creditgate_ledger_drift_microcredits", "Sum of absolute drift at the last check.", value=total
        )


class Metrics:
    def __init__(self, *, serving: bool = True, flushing: bool = True, reconciling: bool = True) -> None:
        """`serving` / `flushing` / `reconciling`: this process answers requests / runs the outbox flusher
        / the reconciler. The series of a role it does not have are not registered (hooks stay valid)."""
        self.registry = registry = CollectorRegistry(auto_describe=True)
        r = registry if serving else None  # the request-path series
        f = registry if flushing else None  # the flusher's series
        self.sources = Sources()
        Gauge("creditgate_build_info", "Build information.", ["version", "python"], registry=registry).labels(
            __version__, platform.python_version()
        ).set(1)
        self.requests = Counter(
            "creditgate_requests",
            "Requests answered.",
            ["route", "model", "status_class", "cache"],
            registry=r,
        )
        self.duration = Histogram(
            "creditgate_request_duration_seconds",
            "Whole request time.",
            ["route"],
            buckets=LLM_BUCKETS,
            registry=r,
        )
        self.upstream_duration = Histogram(
            "creditgate_upstream_duration_seconds",
            "Upstream call, from sending to the last byte.",
            ["route", "model"],
            buckets=LLM_BUCKETS,
            registry=r,
        )
        self.first_byte = Histogram(
            "creditgate_upstream_first_byte_seconds",
            "Time to the upstream's first byte (streams: first chunk, i.e. first token).",
            ["route", "model"],
            buckets=LLM_BUCKETS,
            registry=r,
        )
        self.overhead = Histogram(
            "creditgate_overhead_seconds",
            "Request time not spent waiting on the upstream or a slow client.",
            ["route"],
            buckets=OVERHEAD_BUCKETS,
            registry=r,
        )
        money = ["route", "model"]
        self.held = Counter("creditgate_held_microcredits", "Micro-credits held.", money, registry=r)
        self.charged = Counter("creditgate_charged_microcredits", "Micro-credits charged.", money, registry=r)
        self.released = Counter(
            "creditgate_released_microcredits",
            "Held micro-credits released (hold minus charge).",
            money,
            registry=r,
        )
        self.saved = Counter(
            "creditgate_cache_saved_microcredits",
            "Micro-credits the response cache saved callers.",
            money,
            registry=r,
        )
        self.tokens = Counter(
            "creditgate_tokens",
            "Tokens by type (prompt: uncached).",
            ["route", "model", "type"],
            registry=r,
        )
        self.payment_required = Counter(
            "creditgate_payment_required", "402 answers by reason.", ["route", "reason"], registry=r
        )
        self.overdrafts = Counter(
            "creditgate_overdrafts", "Requests that cost more than their hold.", money, registry=r
        )
        self.usage_missing = Counter(
            "creditgate_usage_missing",
            "200 answers that reported no usage (charged by no_usage_charge).",
            money,
            registry=r,
        )
        self.backlog = Gauge(
            "creditgate_outbox_backlog_entries", "Debits waiting in the outbox.", registry=registry
        )
        self.oldest = Gauge(
            "creditgate_outbox_oldest_age_seconds",
            "Age of the oldest debit in the outbox.",
            registry=registry,
        )
        self.redis_up = Gauge(
            "creditgate_redis_up",
            "1 if Redis answered this scrape's outbox read within 1 s, 0 if it failed or timed out.",
            registry=registry,
        )
        self.flush_rows = Histogram(
            "creditgate_flush_batch_rows", "Rows per ledger batch.", buckets=FLUSH_ROWS_BUCKETS, registry=f
        )
        self.flush_seconds = Histogram(
            "creditgate_flush_duration_seconds",
            "Time to write one ledger batch.",
            buckets=FLUSH_SECONDS_BUCKETS,
            registry=f,
        )
        self.script = Histogram(
            "creditgate_redis_script_duration_seconds",
            "Redis money script calls.",
            ["script"],
            buckets=SCRIPT_BUCKETS,
            registry=r,
        )
        self._scripts: dict[str, Histogram] = {}  # bound children, by script name
        registry.register(_StatsCollector(self.sources, serving, flushing, reconciling))
        # Bound children, so a request pays no labels() lookups: both bounded, like the labels.
        self._series: dict[tuple[str, str], Series] = {}
        self._answered: dict[tuple[str, str, str, str], Counter] = {}

    # ---- hooks the modules call ----------------------------------------------------------------------

    def observe_script(self, script: str, nanoseconds: int) -> None:
        child = self._scripts.get(script)
        if child is None:
            child = self._scripts[script] = self.script.labels(script)
        child.observe(nanoseconds / 1e9)

    def observe_flush(self, rows: int, seconds: float) -> None:
        self.flush_rows.observe(rows)
        self.flush_seconds.observe(seconds)

    def observe_request(self, rec: RequestRecord) -> None:
        route, model = rec.route, rec.model
        series = self._series.get((route, model))
        if series is None:
            series = self._series[route, model] = Series(self, route, model)
        outcome = (route, model, rec.status_class, rec.cache)
        answered = self._answered.get(outcome)
        if answered is None:
            answered = self._answered[outcome] = self.requests.labels(*outcome)
        answered.inc()
        series.duration.observe(rec.duration)
        series.overhead.observe(rec.overhead)
        if rec.upstream_seconds is not None:
            series.upstream_duration.observe(rec.upstream_seconds)
        if rec.first_byte_seconds is not None:
            series.first_byte.observe(rec.first_byte_seconds)
        if rec.status == 402:  # rare: no cached child
            self.payment_required.labels(route, rec.error_code or "unknown").inc()
        if rec.hold:
            series.held.inc(rec.hold)
            if rec.settled:
                series.charged.inc(rec.charge)
                if rec.hold > rec.charge:
                    series.released.inc(rec.hold - rec.charge)
                elif rec.charge > rec.hold:
                    series.overdrafts.inc()
        elif rec.charge:  # charged without a hold of its own (e.g. a collapsed cache follower)
            series.charged.inc(rec.charge)
        if rec.saved:
            series.saved.inc(rec.saved)
        if rec.outcome in ("no_usage", "no_usage_estimated"):  # rare: no cached child
            self.usage_missing.labels(route, model).inc()
        elif rec.usage is not None and rec.cache not in ("hit", "collapsed"):  # what the upstream processed
            cached = min(rec.usage.cached_tokens, rec.usage.prompt_tokens)
            series.prompt_tokens.inc(rec.usage.prompt_tokens - cached)
            series.cached_prompt_tokens.inc(cached)
            series.completion_tokens.inc(rec.usage.completion_tokens)

    def render(self) -> bytes:
        return generate_latest(self.registry)


METRICS = web.AppKey("metrics", Metrics)


async def metrics_handler(request: web.Request) -> web.Response:
    return await metrics_response(request.config_dict[METRICS])


async def metrics_response(metrics: Metrics) -> web.Response:
    """The /metrics answer: the registry, with the outbox backlog read now."""
    backlog = metrics.sources.backlog
    if backlog is not None:
        try:
            async with asyncio.timeout(BACKLOG_TIMEOUT):
                entries, oldest = await backlog()
            metrics.backlog.set(entries)
            metrics.oldest.set(oldest)
            metrics.redis_up.set(1)
        except Exception as exc:  # the scrape still answers, with the last known backlog
            metrics.redis_up.set(0)
            log.warning("outbox backlog unavailable for /metrics: %r", exc)
    body = metrics.render()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})
