"""The operation settings, a part of `config.Settings` (which inherits these fields; README "Operations
beyond tokens"): what each billable operation other than an LLM call costs, in integer micro-credits.
Pure: no I/O."""

from __future__ import annotations

import re
from typing import Annotated

import msgspec

from ..errors import ConfigError
from ..money import MAX_CHARGE
from .meters_settings import MeterSettings

Micro = Annotated[int, msgspec.Meta(ge=0, le=MAX_CHARGE)]
OPERATION_NAME = re.compile(r"[A-Za-z0-9_.:-]{1,64}\Z")  # a tag's part and a ledger row's model


class OperationConfig(msgspec.Struct, forbid_unknown_fields=True):
    """One operation: the price of a unit, a fixed price per run (charged on settle, whatever the units),
    the unit's name, the most units one hold may take, and its lease (unset: hold_lease_seconds)."""

    unit_price: Micro
    per_run: Micro = 0
    unit: str = "unit"
    max_units: Annotated[int, msgspec.Meta(ge=1, le=10**9)] = 1000
    lease_seconds: Annotated[int, msgspec.Meta(ge=1, le=7 * 86400)] | None = None

    def cost(self, units: int) -> int:
        """What `units` units of one run cost: per_run + units × unit_price (integers)."""
        return self.per_run + units * self.unit_price


class MeteringSettings(MeterSettings, kw_only=True):
    """The metering settings; `config.Settings` inherits them. They inherit the payment settings: a
    msgspec Struct takes fields from one line of bases only ("instance lay-out conflict")."""

    # Operations beyond tokens (POST /v1/holds): name -> its prices and limits (micro-credits).
    operations: dict[str, OperationConfig] = msgspec.field(default_factory=dict)


def check_operation_settings(settings: MeteringSettings) -> None:
    """What the types cannot say: a name usable in a ledger row and a tag, a worst case within
    MAX_CHARGE; raises ConfigError naming the setting."""
    for name, op in settings.operations.items():
        if not OPERATION_NAME.match(name):
            raise ConfigError(
                f"operations.{name}: an operation's name is 1-64 characters of A-Z a-z 0-9 _ . : -.",
                param=f"operations.{name}",
            )
        if not OPERATION_NAME.match(op.unit):
            raise ConfigError(
                f"operations.{name}.unit must be 1-64 characters of A-Z a-z 0-9 _ . : -.",
                param=f"operations.{name}.unit",
            )
        if op.cost(op.max_units) > MAX_CHARGE:
            raise ConfigError(
                f"operations.{name}.max_units: per_run + max_units × unit_price is "
                f"{op.cost(op.max_units)} micro-credits, above the {MAX_CHARGE} one charge may be.",
                param=f"operations.{name}.max_units",
            )
