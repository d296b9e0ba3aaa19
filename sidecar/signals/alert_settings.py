"""The settings of alerts and auto-reload (inherited by config.Settings; the README's "Alerts and
auto-reload" table documents each)."""

from __future__ import annotations

from typing import Annotated

import msgspec

from .settings import SignalSettings

Percent = Annotated[int, msgspec.Meta(ge=1, le=100)]


class AlertSettings(SignalSettings, kw_only=True):  # msgspec: one base with fields, so a chain
    # Alerts: read by the flusher from each settle. The default low-balance rules of every account (its
    # own rules come on top, unless it turns the defaults off): whole percents of its last top-up.
    alerts_enabled: bool = True
    alert_top_up_percents: list[Percent] = msgspec.field(default_factory=lambda: [20, 5])
    # Auto-reload: how often the worker starts the reloads requested, how many failures in a row turn an
    # account's auto-reload off, and the least and most credits one reload may buy (micro-credits).
    reload_interval_seconds: Annotated[float, msgspec.Meta(gt=0)] = 2.0
    reload_max_failures: Annotated[int, msgspec.Meta(ge=1, le=100)] = 3
    reload_min_credits: Annotated[int, msgspec.Meta(gt=0)] = 1_000_000
    reload_max_credits: Annotated[int, msgspec.Meta(gt=0)] = 100_000_000_000
