"""The per-(route, model) children of the request metrics, each bound on first use."""

from __future__ import annotations

from functools import cached_property
from typing import TYPE_CHECKING

from prometheus_client import Counter, Histogram

if TYPE_CHECKING:
    from .metrics import Metrics


class Series:
    """The children of the per-route and per-(route, model) metrics for one (route, model), each bound on
    first use: a series appears in /metrics once something was recorded in it, as with ``labels()``."""

    def __init__(self, metrics: Metrics, route: str, model: str) -> None:
        self._metrics, self._route, self._model = metrics, route, model

    @cached_property
    def duration(self) -> Histogram:
        return self._metrics.duration.labels(self._route)

    @cached_property
    def overhead(self) -> Histogram:
        return self._metrics.overhead.labels(self._route)

    @cached_property
    def upstream_duration(self) -> Histogram:
        return self._metrics.upstream_duration.labels(self._route, self._model)

    @cached_property
    def first_byte(self) -> Histogram:
        return self._metrics.first_byte.labels(self._route, self._model)

    @cached_property
    def held(self) -> Counter:
        return self._metrics.held.labels(self._route, self._model)

    @cached_property
    def charged(self) -> Counter:
        return self._metrics.charged.labels(self._route, self._model)

    @cached_property
    def released(self) -> Counter:
        return self._metrics.released.labels(self._route, self._model)

    @cached_property
    def overdrafts(self) -> Counter:
        return self._metrics.overdrafts.labels(self._route, self._model)

    @cached_property
    def saved(self) -> Counter:
        return self._metrics.saved.labels(self._route, self._model)

    @cached_property
    def prompt_tokens(self) -> Counter:
        return self._metrics.tokens.labels(self._route, self._model, "prompt")

    @cached_property
    def cached_prompt_tokens(self) -> Counter:
        return self._metrics.tokens.labels(self._route, self._model, "cached_prompt")

    @cached_property
    def completion_tokens(self) -> Counter:
        return self._metrics.tokens.labels(self._route, self._model, "completion")
