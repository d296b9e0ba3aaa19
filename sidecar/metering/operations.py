"""Operations beyond tokens: a two-phase hold for work other than an LLM call (a judge run, optimisation
iterations), through the request path's own scripts: `Balances.reserve` holds the worst case (the same
balance and spend-cap rules, the same refusals), `Balances.settle` debits the actual cost once, releases
the rest and appends the ledger entry to the outbox in the same step; the hold reaper releases a lease
that ran out.

Each step is a keyed write to the hold's metadata hash (operation_holds.py) in the account's slot, then
one script: the spec is written once (HSETNX) before the reserve, so a retried POST finds it (another body
is a 409) and sends the same reserve (idempotent by hold id); the one settle or release is claimed once
(HSETNX) before the settle script, so a retry sends the same settle (idempotent by hold id: never charged
twice), and its answer is kept. A settle after the reaper released the hold still charges, once. A
settle that charges nothing (no per_run, 0 units) writes no ledger row, as a free request does not."""

from __future__ import annotations

import time
from collections.abc import Callable

from ..balances import Balances, ReserveStatus
from ..caller import Caller
from ..errors import (
    BadRequest,
    Conflict,
    InsufficientCredits,
    NotFound,
)
from ..keys import AccountKeys, as_text
from ..money import format_credits
from ..outbox import UsageEvent
from ..refusals import refusal
from .operation_holds import (
    HOLD_ID,
    EndClaim,
    EndKind,
    HoldResult,
    HoldSpec,
    HoldView,
    body_digest,
    check_idempotency_key,
    decode_spec,
    encode,
    hold_id_of,
    priced,
)
from .settings import OperationConfig

KEEP_AFTER_MS = 60_000  # the metadata outlives a settled marker by this much


class Operations:
    def __init__(
        self,
        balances: Balances,
        table: dict[str, OperationConfig],
        *,
        lease_seconds: int,
        top_up_url: str | None = None,
        clock: Callable[[], int] | None = None,
    ) -> None:
        """`lease_seconds`: an operation's lease unless it sets its own; `clock`: now in ms for the lease
        ends (default the wallet's clock; the reaper's `now` is compared with them). Times recorded (when
        asked, when settled: the ledger row's) are the wall's, as the request path's are."""
        self.balances, self.table = balances, table
        self.lease_ms = lease_seconds * 1000
        self.top_up_url = top_up_url
        self.clock = clock or (lambda: balances.wallet.clock())

    @property
    def _keep_ms(self) -> int:
        return self.balances.settled_marker_ms + KEEP_AFTER_MS

    def price(self, operation: str, units: int) -> int:
        """The worst case of `units` units of `operation` (BadRequest naming the field)."""
        return priced(self.table, operation, units)[1]

    async def hold(self, caller: Caller, operation: str, units: int, idempotency_key: str) -> HoldView:
        """Hold the worst case of `units` units, once per idempotency key (a retry with the same body gets
        the same hold; another body is a 409). Raises the reserve's refusals: 402, 401, 409."""
        op, amount = priced(self.table, operation, units)
        check_idempotency_key(idempotency_key)
        account = caller.account
        hold_id = hold_id_of(account, idempotency_key)
        k = self.balances.keys.account(account)
        now = self.clock()
        lease_ms = op.lease_seconds * 1000 if op.lease_seconds is not None else self.lease_ms
        spec = HoldSpec(
            operation=operation,
            units=units,
            digest=body_digest(operation, units),
            amount=amount,
            per_run=op.per_run,
            unit_price=op.unit_price,
            unit=op.unit,
            key_id=caller.key_id,
            created_ms=_wall_ms(),
            window_end_ms=self.balances.window_end(),
            lease_ms=lease_ms,
        )
        async with self.balances.redis.pipeline(transaction=True) as pipe:
            pipe.hsetnx(k.operation(hold_id), "spec", encode(spec))
            pipe.hgetall(k.operation(hold_id))
            pipe.pexpire(k.operation(hold_id), lease_ms + self._keep_ms, nx=True)
            _, raw, _ = await pipe.execute()
        fields = _text(raw)
        found = decode_spec(fields["spec"])
        if found.digest != spec.digest:
            raise Conflict(
                f"This idempotency_key was used for another hold ({found.units} units of {found.operation}).",
                param="idempotency_key",
            )
        if not ({"held", "end", "result"} & fields.keys()):
            await self._reserve(k, hold_id, found, now)
        return await self.view(account, hold_id)

    async def _reserve(self, k: AccountKeys, hold_id: str, spec: HoldSpec, now: int) -> None:
        res = await self.balances.reserve(
            k.account,
            hold_id,
            spec.amount,
            now + spec.lease_ms,
            window_end_ms=spec.window_end_ms,
            scopes=spec.scopes(),
        )
        if res.status is ReserveStatus.INSUFFICIENT:
            raise InsufficientCredits(res.available, spec.amount, self.top_up_url)
        refused = refusal(res, k.account)  # blocked, capped, or the account gone
        if refused is not None:
            raise refused
        if res.status is ReserveStatus.WINDOW_CLOSED:
            raise Conflict(
                "This idempotency_key's hold was not taken within its window (settled_marker_seconds); "
                "use a new idempotency_key.",
                param="idempotency_key",
            )
        # HELD, or ALREADY_SETTLED (it was held, and settled or released since): it is held once
        await self.balances.redis.hset(k.operation(hold_id), "held", "1")

    async def _fields(self, account: str, hold_id: str) -> dict[str, str]:
        """The hold's metadata; NotFound when there is none for this account (another's hold included)."""
        fields: dict[str, str] = {}
        if HOLD_ID.match(hold_id):
            fields = _text(
                await self.balances.redis.hgetall(self.balances.keys.account(account).operation(hold_id))
            )
        if "spec" not in fields:
            raise NotFound(f"No hold {hold_id[:64]!r}.", param="id")
        return fields

    async def view(self, account: str, hold_id: str) -> HoldView:
        """The hold as it stands (GET /v1/holds/{id})."""
        k = self.balances.keys.account(account)
        if not HOLD_ID.match(hold_id):
            raise NotFound(f"No hold {hold_id[:64]!r}.", param="id")
        async with self.balances.redis.pipeline(transaction=True) as pipe:
            pipe.hgetall(k.operation(hold_id))
            pipe.hget(k.holds, hold_id)
            pipe.zscore(k.hold_expiry, k.expiry_member(hold_id))
            raw, hold, lease = await pipe.execute()
        fields = _text(raw)
        if "spec" not in fields:
            raise NotFound(f"No hold {hold_id!r}.", param="id")
        return HoldView.of(hold_id, fields, None if hold is None else as_text(hold), lease)

    async def settle(self, account: str, hold_id: str, units: int) -> HoldView:
        """Debit per_run + `units` × unit_price (0 ≤ units ≤ the units held) once and release the rest; a
        retry with the same units returns the first result, with other units (or after a release) it is
        a 409."""
        fields = await self._fields(account, hold_id)
        spec = decode_spec(fields["spec"])
        if isinstance(units, bool) or not 0 <= units <= spec.units:
            raise BadRequest(f"units must be an integer from 0 to the {spec.units} held.", param="units")
        return await self._end(account, hold_id, fields, "settle", units)

    async def release(self, account: str, hold_id: str) -> HoldView:
        """Release the hold without a charge, once (a retry returns the same; after a settle, a 409)."""
        return await self._end(account, hold_id, await self._fields(account, hold_id), "release", 0)

    async def _end(
        self, account: str, hold_id: str, fields: dict[str, str], kind: EndKind, units: int
    ) -> HoldView:
        spec = decode_spec(fields["spec"])
        k = self.balances.keys.account(account)
        meta = k.operation(hold_id)
        if "end" not in fields and "held" not in fields:
            await self._check_taken(k, hold_id)
        if "end" not in fields:
            claim = EndClaim(kind, units, self.balances.window_end(), _wall_ms())
            async with self.balances.redis.pipeline(transaction=True) as pipe:
                pipe.hsetnx(meta, "end", claim.encode())
                pipe.hget(meta, "end")
                _, raw = await pipe.execute()
            fields["end"] = as_text(raw)
        claim = EndClaim.parse(fields["end"])
        if (claim.kind, claim.units) != (kind, units):
            done = "settled with" if claim.kind == "settle" else "released"
            what = f" {claim.units} units" if claim.kind == "settle" else ""
            raise Conflict(
                f"This hold was {done}{what} already.", param="units" if kind == "settle" else "id"
            )
        if "result" not in fields:
            charge = spec.cost(units) if kind == "settle" else 0
            event = _ledger_entry(spec, units, claim) if kind == "settle" else None
            done_ = await self.balances.settle(
                account,
                hold_id,
                charge,
                event,
                window_end_ms=claim.window_end_ms,
                scopes=spec.scopes(),
            )
            result = HoldResult(
                state=kind, units=units, charged=done_.charged, released=done_.released, at_ms=claim.at_ms
            )
            async with self.balances.redis.pipeline(transaction=True) as pipe:
                pipe.hset(meta, "result", encode(result))
                pipe.pexpire(meta, self._keep_ms, gt=True)
                await pipe.execute()
        return await self.view(account, hold_id)

    async def _check_taken(self, k: AccountKeys, hold_id: str) -> None:
        """A hold whose reserve was refused (or never answered) has nothing to settle: the settle script
        would charge it as one the reaper released. One held but not yet marked so is marked now."""
        if not await self.balances.redis.hexists(k.holds, hold_id):
            raise Conflict("This hold was never taken (its POST was refused): nothing to settle.", param="id")
        await self.balances.redis.hset(k.operation(hold_id), "held", "1")

    async def extend(self, account: str, hold_id: str) -> HoldView:
        """Renew a live hold's lease: it ends a lease from now (never earlier than it did)."""
        view = await self.view(account, hold_id)
        if view.state != "held":
            raise Conflict(
                f"This hold is {view.state.replace('_', ' ')}: there is no lease to extend.", param="id"
            )
        lease_end = self.clock() + view.spec.lease_ms
        k = self.balances.keys.account(account)
        await self.balances.renew([(account, hold_id)], lease_end)
        await self.balances.redis.pexpire(k.operation(hold_id), view.spec.lease_ms + self._keep_ms, gt=True)
        return await self.view(account, hold_id)

    async def estimate(self, account: str, operation: str, units: int) -> dict[str, object]:
        """The worst case a hold would take, and whether the available credits cover it; nothing held."""
        amount = self.price(operation, units)
        available = await self.balances.available(account)
        return {
            "object": "credits.estimate",
            "operation": operation,
            "units": units,
            "hold": amount,
            "hold_credits": format_credits(amount),
            "available": available,
            "available_credits": format_credits(available),
            "fits": amount <= available,
        }


def _ledger_entry(spec: HoldSpec, units: int, claim: EndClaim) -> UsageEvent:
    """The outbox entry (the future ledger row) of a settled operation: route "operation", the operation as
    the model, the units in its tags; its times fixed by the claim, the same on every retry."""
    return UsageEvent(
        route="operation",
        model=spec.operation,
        hold=spec.amount,
        outcome="settled",
        started_ms=spec.created_ms,
        settled_ms=claim.at_ms,
        key_id=spec.key_id,
        tags=[f"operation={spec.operation}", f"units={units}", f"unit={spec.unit}"],
    )


def _text(raw: dict[bytes | str, bytes | str]) -> dict[str, str]:
    return {as_text(k): as_text(v) for k, v in raw.items()}


def _wall_ms() -> int:
    return time.time_ns() // 1_000_000
