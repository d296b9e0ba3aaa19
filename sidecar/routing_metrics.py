"""The routing series (routing.py's counts, read at scrape time): upstream attempts by result, fallbacks,
cooldowns, and the circuits open now. Labels are configured upstreams and models only."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .routing import RoutingStats


class RoutingCollector(Collector):
    """Registered on a serving app's registry (metrics.Metrics) with its gateway's router's `stats`."""

    def __init__(self, stats: Callable[[], RoutingStats]) -> None:
        self.stats = stats

    def collect(self) -> Iterator[Metric]:
        return routing_families(self.stats())


def routing_families(stats: RoutingStats) -> Iterator[Metric]:
    """Upstream attempts by result, fallbacks, cooldowns and the circuits open now (routing.py)."""
    attempts = CounterMetricFamily(
        "creditgate_upstream_attempts",
        "Upstream calls, by upstream and result (ok, redirect, client_error, rate_limited, server_error, "
        "timeout, unreachable, body_failed, cut).",
        labels=["upstream", "result"],
    )
    for (upstream, result), n in sorted(stats.attempts.items()):
        attempts.add_metric([upstream, result], n)
    yield attempts
    fallbacks = CounterMetricFamily(
        "creditgate_routing_fallbacks",
        "Requests that went on to their next candidate, by model and the upstream that failed.",
        labels=["model", "upstream"],
    )
    for (model, upstream), n in sorted(stats.fallbacks.items()):
        fallbacks.add_metric([model, upstream], n)
    yield fallbacks
    cooldowns = CounterMetricFamily(
        "creditgate_routing_cooldowns",
        "Candidates the circuit breaker cooled down, by upstream.",
        labels=["upstream"],
    )
    for upstream, n in sorted(stats.cooldowns.items()):
        cooldowns.add_metric([upstream], n)
    yield cooldowns
    cooling = GaugeMetricFamily(
        "creditgate_routing_cooling",
        "Candidates whose circuit is open (cooling down, or half-open until a trial succeeds), by upstream.",
        labels=["upstream"],
    )
    for upstream, n in sorted(stats.cooling.items()):
        cooling.add_metric([upstream], n)
    yield cooling
