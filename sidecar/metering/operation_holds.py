"""What an operation hold is, as its metadata hash in Redis keeps it (``AccountKeys.operation``), and what a
client is shown of it. Pure: no I/O.

The hash's fields: ``spec`` (the hold as first asked: `HoldSpec`, written once, HSETNX), ``held`` ("1"
once the reserve script took the hold), ``end`` (the claim of the one settle or release: "<kind> <units>
<window end ms> <at ms>", written once, HSETNX) and ``result`` (`HoldResult`, once the settle script
answered)."""

from __future__ import annotations

import datetime as dt
import hashlib
import re
from dataclasses import dataclass
from typing import Any, Literal

import msgspec

from ..errors import BadRequest
from ..money import format_credits
from ..wallet import cap_scopes
from .settings import OperationConfig

HOLD_ID = re.compile(r"op_[0-9a-f]{32}\Z")
MAX_KEY_CHARS = 255
EndKind = Literal["settle", "release"]


class HoldSpec(msgspec.Struct, kw_only=True, frozen=True):
    """A hold as first asked; a retried POST (same idempotency key) finds it and goes on with it."""

    operation: str
    units: int
    digest: str  # of the body (operation, units): the same key with another body is a 409
    amount: int  # held: per_run + units × unit_price, at the prices of the time it was asked
    per_run: int
    unit_price: int
    unit: str
    key_id: str | None
    created_ms: int  # wall clock
    window_end_ms: int  # the reserve's window (wall clock): a reserve landing later is refused
    lease_ms: int

    def cost(self, units: int) -> int:
        return self.per_run + units * self.unit_price

    def scopes(self) -> list[str]:
        """The spend-cap scopes it counts in: the account, its key, and the operation as the model."""
        return cap_scopes(self.key_id, self.operation, None)


class HoldResult(msgspec.Struct, kw_only=True, frozen=True):
    state: EndKind
    units: int
    charged: int
    released: int  # what the settle script released of the hold (0 when the reaper had released it)
    at_ms: int


@dataclass(frozen=True, slots=True)
class EndClaim:
    kind: EndKind
    units: int
    window_end_ms: int
    at_ms: int

    def encode(self) -> str:
        return f"{self.kind} {self.units} {self.window_end_ms} {self.at_ms}"

    @classmethod
    def parse(cls, text: str) -> EndClaim:
        kind, units, window, at = text.split(" ")
        assert kind in ("settle", "release")
        return cls(kind, int(units), int(window), int(at))  # type: ignore[arg-type]


encode = msgspec.json.Encoder().encode
decode_spec = msgspec.json.Decoder(HoldSpec).decode
decode_result = msgspec.json.Decoder(HoldResult).decode


def hold_id_of(account: str, idempotency_key: str) -> str:
    """The hold id: from the account and its idempotency key, so a retried POST finds the same hold (and
    request ids, whose settled markers are not account-scoped, stay apart across accounts)."""
    return "op_" + hashlib.sha256(f"{account}\x00{idempotency_key}".encode()).hexdigest()[:32]


def body_digest(operation: str, units: int) -> str:
    return hashlib.sha256(f"{operation}\x00{units}".encode()).hexdigest()


def priced(table: dict[str, OperationConfig], operation: str, units: int) -> tuple[OperationConfig, int]:
    """The operation's settings and the worst case of `units` units; BadRequest naming the field."""
    op = table.get(operation)
    if op is None:
        known = ", ".join(sorted(table)[:20]) or "none configured"
        raise BadRequest(f"Unknown operation {operation[:64]!r} (operations: {known}).", param="operation")
    if not 1 <= units <= op.max_units:
        raise BadRequest(
            f"units must be an integer from 1 to {op.max_units} (operations.{operation}.max_units).",
            param="units",
        )
    return op, op.cost(units)


def check_idempotency_key(key: str) -> None:
    if not 1 <= len(key) <= MAX_KEY_CHARS or not key.isprintable():
        raise BadRequest(
            f"idempotency_key must be 1-{MAX_KEY_CHARS} printable characters.", param="idempotency_key"
        )


@dataclass(frozen=True, slots=True)
class HoldView:
    """A hold as it stands: held (its lease running), expired (the reaper released it), settled,
    released, or not_held (the reserve refused it, or it was never taken)."""

    hold_id: str
    spec: HoldSpec
    state: str
    lease_end_ms: int | None
    result: HoldResult | None

    @classmethod
    def of(cls, hold_id: str, fields: dict[str, str], hold: str | None, lease: float | None) -> HoldView:
        spec = decode_spec(fields["spec"])
        result = decode_result(fields["result"]) if "result" in fields else None
        if result is not None:
            state = "settled" if result.state == "settle" else "released"
        elif hold is not None:
            state = "held"
        else:
            state = "expired" if fields.get("held") == "1" else "not_held"
        live = hold is not None and lease is not None and result is None
        return cls(hold_id, spec, state, int(lease) if live and lease is not None else None, result)

    def body(self) -> dict[str, Any]:
        s, r = self.spec, self.result
        return {
            "object": "hold",
            "id": self.hold_id,
            "operation": s.operation,
            "unit": s.unit,
            "units": s.units,
            "amount": s.amount,
            "amount_credits": format_credits(s.amount),
            "per_run": s.per_run,
            "unit_price": s.unit_price,
            "state": self.state,
            "created_at": iso(s.created_ms),
            "lease_expires_at": iso(self.lease_end_ms) if self.lease_end_ms is not None else None,
            "lease_end_ms": self.lease_end_ms,
            "settled_units": r.units if r is not None and r.state == "settle" else None,
            "charged": r.charged if r is not None else None,
            "charged_credits": format_credits(r.charged) if r is not None else None,
            "released": r.released if r is not None else None,
        }


def iso_seconds(ms: int) -> str:
    """A time as ISO 8601 in UTC, to the second (as a request's spend-cap refusal says when it resets)."""
    return dt.datetime.fromtimestamp(ms // 1000, dt.UTC).isoformat().replace("+00:00", "Z")


def iso(ms: int) -> str:
    """A time as ISO 8601 in UTC, to the millisecond."""
    stamp = dt.datetime.fromtimestamp(ms // 1000, dt.UTC).replace(microsecond=(ms % 1000) * 1000)
    return stamp.isoformat(timespec="milliseconds").replace("+00:00", "Z")
