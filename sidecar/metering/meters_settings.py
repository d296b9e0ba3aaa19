"""The recurring-charge settings, a part of `config.Settings` (which inherits these fields; the README's
"Recurring charges" section documents them)."""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

from ..signals.alert_settings import AlertSettings


class RecurringPrice(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """A named price: micro-credits per unit (GB, container) per period, or once for a one-time fee."""

    price: Annotated[int, msgspec.Meta(gt=0)]
    period: str | int = "day"  # 'hour', 'day', 'month' or seconds
    kind: Literal["period", "one_time"] = "period"


def default_recurring_prices() -> dict[str, RecurringPrice]:
    return {
        "container-day": RecurringPrice(price=1_000_000),
        "deployment-fee": RecurringPrice(price=5_000_000, kind="one_time"),
        "storage-gb-day": RecurringPrice(price=10_000),
    }


class MeterSettings(AlertSettings, kw_only=True):  # a chain: msgspec Structs inherit fields from one base
    # Recurring charges: the named prices a meter may use, how often the charge worker runs (0: not in
    # this sidecar), and how long a period charge's Redis marker lives (retries within it are idempotent).
    recurring_prices: dict[str, RecurringPrice] = msgspec.field(default_factory=default_recurring_prices)
    meter_charge_interval_seconds: Annotated[float, msgspec.Meta(ge=0)] = 60.0
    meter_marker_seconds: Annotated[int, msgspec.Meta(ge=3600)] = 7 * 86_400
