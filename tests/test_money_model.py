"""The money operations against a model: a hypothesis state machine drives the real Redis (one node and the
cluster) and the real Postgres ledger through reserve, settle, release, retries, lease expiry on a
controlled clock, grants and their retries, payment orders landing and reversed (refunds, disputes), cache
stores and hits, Idempotency-Key answers stored and replayed, flushes, a flusher killed mid-batch,
reconcile, and Redis lost and rebuilt from the ledger, and compares everything with an in-memory model
after every step.

Invariants, for every account after every step: Redis' balance and held equal the model's; granted =
available + held + Σ settled + expired + reversed (less what a lost Redis took with it, unflushed); a
paid order is one grant; a reversal takes back at most its order's credits, never below what is
available; nothing held is negative and no prepaid balance is below what is held (so none below zero,
and no grant ending under a live hold takes what the hold was admitted against), except after a settle
that came in after its hold was reaped (the documented overdraft); every request id is settled at most
once; reconcile finds no drift; once flushed, the ledger's sum equals Redis' balance and holds one usage
row per settled request id.

``CREDITGATE_MODEL_EXAMPLES`` (default 200) sets the examples per topology, 30 steps each; CI runs them
derandomized (the same examples every run), ``CREDITGATE_MODEL_RANDOM=1`` draws new ones (nightly). A
failure prints the shrunk steps and the blob that replays it (``@reproduce_failure``).
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import os
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

import msgspec
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    initialize,
    invariant,
    multiple,
    precondition,
    rule,
    run_state_machine_as_test,
)

from sidecar.balances import ReserveStatus
from sidecar.caller import Caller
from sidecar.documents import plan_periods
from sidecar.documents.billing_modes import BillingBody, BillingModes
from sidecar.documents.invoices import Invoices
from sidecar.documents.issuing import Draft, Issuer, Line, Payment
from sidecar.documents.plan_invoices import invoice_paid
from sidecar.documents.plan_settings import PlanConfig
from sidecar.documents.plans import Plans, grant_key
from sidecar.documents.tax import TaxTable
from sidecar.documents.tax_settings import default_tax_rules
from sidecar.errors import (
    Conflict,
    CreditgateError,
    InsufficientCredits,
    InvoiceOverdue,
    NotFound,
    SpendCapExceeded,
)
from sidecar.keys import as_text
from sidecar.metering.meters_api import Meters
from sidecar.metering.meters_charges import MeterCharges
from sidecar.metering.operation_holds import hold_id_of
from sidecar.metering.operations import Operations
from sidecar.metering.settings import OperationConfig
from sidecar.money import format_credits
from sidecar.outbox import UsageEvent
from sidecar.payments.landing import Payments
from sidecar.payments.orders import OrderStore
from sidecar.rebuild import rebuild_if_empty
from sidecar.reconcile import reconcile
from sidecar.services import Services, services
from sidecar.signals.events import EventLog
from sidecar.wallet import PERIODS, Grant, GrantTerms, WalletPolicy, cap_scopes, draw, expiring, periods

from .conftest import make_settings
from .support_ledger import delete_every_row

pytestmark = pytest.mark.topologies  # money: on one Redis and on the cluster

T = TypeVar("T")
EXAMPLES = int(os.environ.get("CREDITGATE_MODEL_EXAMPLES", "200"))
STEPS = 30
LEASE_MS = 30_000
# The model's clock (lease ends, the reaper's "now", the wallet's periods and grant ends), not the wall's:
# 2030-03-17, after the wall's, so that the spend counts' expiry (a day after their period) is ahead.
CLOCK_START_MS = 1_900_000_000_000
CACHE_TTL_MS = 3_600_000
METER_PERIOD_MS = 60_000  # the model's meters charge every 60 s of its clock
# Subscription plans: a plan of monthly periods whose first period began in February (28 days), so that
# it ends on the model's clock (minutes ahead) and the next begins.
PLAN = PlanConfig(included_credits=2_000_000)
# A provider-billed plan: its periods are granted by Stripe's invoice.paid only (plan_invoices.py).
STRIPE_PLAN = PlanConfig(included_credits=3_000_000, billing="provider", stripe_price="price_model")
DAY_MS = 86_400_000
IDLE_MS = 4 * LEASE_MS  # free credits expire after 2 minutes of the model's clock without activity
GRANT_KINDS = ["purchase", "promotion", "bonus", "starter", "subscription"]
amounts = st.integers(min_value=0, max_value=5_000_000)
# Who a request is for: (API key id, end user); its model is always "m".
CALLERS = [("k1", "u1"), ("k1", None), ("k2", "u2"), (None, None)]
CAP_SCOPES = ["account", "key:k1", "key:k2", "model:m", "user:u1", "user:*"]
callers = st.sampled_from(CALLERS)
# Operation holds (metering/operations.py): an operation named like the requests' model, so that its
# holds count in the same spend-cap scopes (the account, the key, "model:m"; no end user).
OPERATION = OperationConfig(unit_price=5_000, per_run=1_000, max_units=100)
op_callers = st.sampled_from([("k1", None), ("k2", None), (None, None)])


@dataclass
class StripeSub:
    """A provider-billed subscription: its account, its Stripe subscription, the anchor its first paid
    invoice set (None: none paid yet) and the periods granted."""

    account: str
    ref: str
    anchor: int | None = None
    granted: set[int] = field(default_factory=set)


@dataclass
class OpMeta:
    """What an operation hold's metadata in Redis says (gone with a lost Redis)."""

    units: int
    flagged: bool  # the reserve took the hold: a retried POST does not reserve again
    end: tuple[str, int] | None = None  # (settle or release, units) once one was asked
    charged: int = 0


@dataclass
class Account:
    granted: int = 0
    balance: int = 0
    holds: dict[str, int] = field(default_factory=dict)  # request id -> held
    leases: dict[str, int] = field(default_factory=dict)  # request id -> lease end (model clock)
    charges: dict[str, int] = field(default_factory=dict)  # request id -> charged, once
    reaped: dict[str, int] = field(default_factory=dict)  # request id -> what its reaped hold was
    lost: int = 0  # charges a lost Redis took with it before they were flushed
    forgotten: set[str] = field(default_factory=set)  # settles a lost Redis took with it (their charges)
    overdrawn: bool = False  # a settle after its hold was reaped may take the balance below zero
    cache: set[str] = field(default_factory=set)
    answers: dict[str, bytes] = field(default_factory=dict)  # idempotency key -> the answer stored
    usage_rows: set[str] = field(default_factory=set)  # request ids the ledger should hold once flushed
    unflushed: set[str] = field(default_factory=set)
    # Spend caps: (scope, period) -> limit; what live holds hold per scope and which scopes each hold
    # counts in; what was settled per (period, scope) since the account had caps.
    caps: dict[tuple[str, str], int] = field(default_factory=dict)
    cap_held: dict[str, int] = field(default_factory=dict)
    hold_scopes: dict[str, list[str]] = field(default_factory=dict)
    spend: dict[tuple[str, str], int] = field(default_factory=dict)
    who: dict[str, tuple[str | None, str | None]] = field(default_factory=dict)  # request id -> (key, user)
    # The wallet: grants by id (what is left, what the ledger knows is left), the last activity, and what
    # expired (in all; as the ledger knows it).
    grants: dict[str, Grant] = field(default_factory=dict)
    flushed_grants: dict[str, int] = field(default_factory=dict)
    active_ms: int = 0
    expired: int = 0
    expired_flushed: int = 0
    # Money back out (payment reversals): taken back in all, and the part not flushed yet.
    reversed: int = 0
    reversed_unflushed: int = 0
    # The billing mode (documents/billing_modes.py): on invoice, the credit line (None: unlimited; 0 on
    # prepaid) admits beyond the balance; a blocked account admits no positive hold.
    invoice: bool = False
    credit: int | None = 0
    blocked: bool = False

    def available(self) -> int | None:
        """What a new hold may take: balance - held + the credit line (None: unlimited)."""
        return None if self.credit is None else self.balance - self.held + self.credit

    def refuses(self, amount: int) -> ReserveStatus | None:
        """The reserve's refusal of a new positive hold by the balance rules, or None."""
        if amount <= 0:
            return None
        if self.blocked:
            return ReserveStatus.BLOCKED
        free = self.available()
        return ReserveStatus.INSUFFICIENT if free is not None and free < amount else None

    def live_grants(self) -> list[Grant]:
        return [g for g in self.grants.values() if g.remaining > 0]

    def expire_due(self, now_ms: int) -> int:
        """Expire what ended by now (what the scripts do first): of the grants that ended, what the live
        holds need (balance - held + the credit line kept at 0 or above) is kept, marked ended, and
        expires once they no longer need it; returns the amount expired now."""
        total = 0
        for g, part in expiring(self.live_grants(), now_ms, self.active_ms, IDLE_MS, self.available()):
            end = g.ends_ms(self.active_ms, IDLE_MS)
            self.grants[g.grant_id] = dataclasses.replace(g, remaining=g.remaining - part, ended_ms=end)
            total += part
        self.balance -= total
        self.expired += total
        return total

    def draw(self, charge: int, now_ms: int) -> None:
        self.active_ms = now_ms
        for grant_id, taken in draw(self.live_grants(), charge, self.active_ms, IDLE_MS):
            g = self.grants[grant_id]
            self.grants[grant_id] = dataclasses.replace(g, remaining=g.remaining - taken)

    def cap_over(self, scopes: list[str], amount: int) -> tuple[str, str] | None:
        """The (scope, period) of a cap this hold would overshoot, or None (the reserve script's rule)."""
        if not self.caps or amount == 0:
            return None
        for scope in scopes:
            for period in PERIODS:
                limit = self.caps.get((scope, period))
                named = scope
                if limit is None and scope.startswith("user:"):
                    limit, named = self.caps.get(("user:*", period)), "user:*"
                used = self.spend.get((period, scope), 0) + self.cap_held.get(scope, 0)
                if limit is not None and used + amount > limit:
                    return named, period
        return None

    def take_caps(self, request_id: str, scopes: list[str], amount: int) -> None:
        if self.caps and amount > 0:
            for scope in scopes:
                self.cap_held[scope] = self.cap_held.get(scope, 0) + amount
            self.hold_scopes[request_id] = scopes

    def release_caps(self, request_id: str, hold: int) -> None:
        for scope in self.hold_scopes.pop(request_id, []):
            self.cap_held[scope] -= hold

    def count_spend(self, scopes: list[str], charge: int) -> None:
        if self.caps and charge > 0:
            for scope in scopes:
                for period in PERIODS:
                    self.spend[(period, scope)] = self.spend.get((period, scope), 0) + charge

    @property
    def held(self) -> int:
        return sum(self.holds.values())


@dataclass
class MeterState:
    """A meter as the model knows it: its next period to charge (Postgres' next_period), unpaid, stopped."""

    meter_id: str
    account: str
    amount: int  # micro-credits per period
    started_ms: int
    next_period: int = 0
    unpaid: bool = False
    stopped: bool = False


@dataclass(frozen=True)
class Request:
    account: str
    request_id: str


class MoneyModel(RuleBasedStateMachine):
    """One example: fresh key prefix, fresh Postgres schema, fresh services; the model beside them."""

    loop: asyncio.AbstractEventLoop
    svc: Services

    accounts = Bundle("accounts")
    held = Bundle("held")  # requests holding (or whose hold was reaped): they settle once
    settled = Bundle("settled")  # requests settled: retries move nothing
    grants = Bundle("grants")  # (account, idempotency key, amount): retries credit nothing
    cached = Bundle("cached")  # (account, cache key) stored in the cache
    keyed = Bundle("keyed")  # (account, idempotency key): its answer stored, or its claim released
    orders = Bundle("orders")  # (account, order id): paid orders, landed once
    reversals = Bundle("reversals")  # (account, order id, reversal id, taken): taken back once
    meter_ids = Bundle("meter_ids")  # meters started: each period charged once
    subscription_ids = Bundle("subscription_ids")  # subscriptions started: each period granted once
    stripe_sub_ids = Bundle("stripe_sub_ids")  # provider-billed ones: granted by invoice.paid, once
    op_held = Bundle("op_held")  # (account, idempotency key, units, caller): operation holds taken

    def __init__(self) -> None:
        super().__init__()
        self.run(self._reset())
        self.model: dict[str, Account] = {}
        self.clock = CLOCK_START_MS
        self.round = 0
        # the wallet's clock is the model's: spend caps' periods, grant expiry
        self.svc.balances.wallet = WalletPolicy(IDLE_MS, clock=lambda: self.clock)
        self.payments = Payments(OrderStore(self.svc.store.pool), self.svc.admin, self.svc.balances)
        self.asked: dict[str, int] = {}  # order id -> what its reversals asked back in all
        self.restored: set[str] = set()  # reversals given back
        self.meters: dict[str, MeterState] = {}
        self.subscriptions: dict[str, tuple[str, int, set[int]]] = {}  # id -> (account, anchor, periods)
        self.stripe_subs: dict[str, StripeSub] = {}
        self.ops = Operations(
            self.svc.balances, {"m": OPERATION}, lease_seconds=LEASE_MS // 1000, clock=lambda: self.clock
        )
        self.op_meta: dict[str, OpMeta] = {}  # hold id -> its metadata, as Redis has it
        issuer = Issuer("CG", {}, TaxTable.from_rules(default_tax_rules()), lambda: self.clock)
        self.invoices = Invoices(self.svc.store.pool, issuer, self.svc.admin.grant)
        self.invoiced = 0

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.loop.run_until_complete(coro)

    def run_all(self, *coros: Coroutine[Any, Any, T]) -> list[T]:
        """The calls at once (concurrently, on the loop)."""

        async def together() -> list[T]:
            return list(await asyncio.gather(*coros))

        return self.run(together())

    async def _reset(self) -> None:
        """An empty Redis (our keys) and an empty ledger (every table but the migrations'), rebuilt: the
        services are shared by the examples, their data is not."""
        names = [n async for n in self.svc.redis.scan_iter(match=f"{self.svc.keys.prefix}*")]
        if names:
            await self.svc.redis.delete(*names)
        await delete_every_row(self.svc.store.pool)
        await rebuild_if_empty(
            self.svc.redis,
            self.svc.keys,
            self.svc.store,
            settled_marker_ms=self.svc.balances.settled_marker_ms,
        )

    def new_id(self, kind: str) -> str:
        """An id of the example's own, numbered in the order of its steps: the same steps make the same
        ids (and so the same partitions and the same tie-breaks among grants), in every run and in a
        replay. The examples of a run share one key prefix and one schema, and ids repeat across them:
        `_reset` empties both before each example (and no task or cache outlives it), so no earlier
        example's key, row or ledger id is there to meet."""
        self.round += 1
        return f"{kind}_{self.round:04d}"

    # ---- accounts and money in ----------------------------------------------------------------------

    @initialize(target=accounts, amount=st.integers(min_value=1, max_value=20_000_000))
    def first_account(self, amount: int) -> str:
        """An account with credits to spend (a rule of its own too, but swarm testing may switch that off)."""
        account = self._create_account()
        self._grant(account, amount)
        return account

    @rule(target=accounts)
    def create_account(self) -> str:
        return self._create_account()

    def _create_account(self) -> str:
        account = self.new_id("acct")
        self.run(self.svc.admin.create_account(account))
        self.model[account] = Account()
        return account

    @rule(
        target=grants,
        account=accounts,
        amount=st.integers(min_value=1, max_value=20_000_000),
        kind=st.sampled_from(GRANT_KINDS),
        ends_in=st.none() | st.integers(min_value=1, max_value=3 * LEASE_MS),
        priority=st.none() | st.integers(min_value=0, max_value=3),
    )
    def grant(
        self, account: str, amount: int, kind: str, ends_in: int | None, priority: int | None
    ) -> tuple[str, str, int, str]:
        """A grant of any kind: a fixed end or none (free kinds then expire when the account is idle)."""
        terms = GrantTerms(kind, priority, 0 if ends_in is None else self.clock + ends_in)
        return self._grant(account, amount, terms)

    def _grant(self, account: str, amount: int, terms: GrantTerms | None = None) -> tuple[str, str, int, str]:
        terms = terms or GrantTerms("purchase")
        key = self.new_id("grant")
        result = self.run(self.svc.admin.grant(account, amount, key, terms.kind, terms=terms))
        assert result["credited"] is True
        self._granted(account, key, amount, terms)
        return account, key, amount, terms.kind

    def _granted(self, account: str, key: str, amount: int, terms: GrantTerms) -> None:
        """The model of a grant credited now (a debt is paid off from it first)."""
        acct = self.model[account]
        acct.expire_due(self.clock)
        debt = max(0, sum(g.remaining for g in acct.live_grants()) - acct.balance)
        acct.granted += amount
        acct.balance += amount
        acct.active_ms = self.clock
        grant = Grant(
            key,
            amount - min(amount, debt),
            terms.expires_ms,
            terms.drawn_priority,
            self.clock,
            terms.idle_expiry,
            terms.kind,
        )
        acct.grants[key] = grant
        acct.flushed_grants[key] = amount  # the ledger has the grant, not yet its payoff

    @rule(grant=grants)
    def grant_again(self, grant: tuple[str, str, int, str]) -> None:
        """A retried grant (same idempotency key) credits nothing, whatever happened since."""
        account, key, amount, kind = grant
        result = self.run(self.svc.admin.grant(account, amount, key, kind))
        assert result["credited"] is False

    @rule()
    def sweep(self) -> None:
        """The wallet sweeper expires what ended by now, on every account, once."""
        expired = self.run(self.svc.balances.expire_grants(self.clock))
        assert expired == sum(acct.expire_due(self.clock) for acct in self.model.values())

    # ---- payment orders: landing as purchase grants, money going back as reversals ----------------

    @rule(target=orders, account=accounts, credits=st.integers(min_value=1, max_value=20_000_000))
    def order_paid(self, account: str, credits: int) -> tuple[str, str]:
        """A paid order lands as a purchase grant once, however often (and concurrently) its payment is
        reported."""
        pay = self.payments
        order = self.run(
            pay.orders.create(
                account, "manual", credits=credits, amount_minor=1, currency="usd", order_id=self.new_id("o")
            )
        )
        landed = self.run_all(pay.land(order, "ref"), pay.land(order, "ref"))
        assert sorted(g["credited"] for g in landed) == [False, True]
        self._granted(account, order.order_id, credits, GrantTerms("purchase"))
        self.asked[order.order_id] = 0
        return account, order.order_id

    @precondition(lambda self: self.invoiced < 3)
    @rule(account=accounts, credits=st.integers(min_value=1, max_value=20_000_000), split=st.booleans())
    def invoice_paid(self, account: str, credits: int, split: bool) -> None:
        """An invoice's payments are recorded once per payment id (each reported twice at once); paid in
        full, its credits come back once (grant `invoice:<id>`), not before."""
        self.invoiced += 1
        line = Line("usage", 1, "requests", credits, 100)
        doc = self.run(
            self.invoices.issue(Draft("invoice", account, self.new_id("period"), "usd", (line,), credits))
        )
        parts = [("a", 40), ("b", 60)] if split else [("a", 100)]
        for i, (pid, amount) in enumerate(parts):
            pay = Payment(f"{doc['id']}:{pid}", amount, "manual", self.clock)
            seen = self.run_all(*(self.invoices.pay(doc["id"], pay) for _ in "ab"))
            paid = sum(amount for _, amount in parts[: i + 1])
            assert [v["amount_paid_minor"] for v in seen] == [paid, paid]
            if i + 1 < len(parts):  # part paid: nothing back yet
                self.redis_matches_the_model()
        self._granted(account, f"invoice:{doc['id']}", credits, GrantTerms("purchase"))

    @rule(order=orders)
    def order_paid_again(self, order: tuple[str, str]) -> None:
        paid = self.run(self.payments.orders.get(order[1]))
        assert paid is not None
        assert paid.status == "paid"
        assert self.run(self.payments.land(paid))["credited"] is False

    @rule(
        target=reversals,
        order=orders,
        amount=st.integers(min_value=1, max_value=25_000_000),
        only_grant=st.booleans(),
        reason=st.sampled_from(["refund", "dispute", "operator_refund"]),
    )
    def reverse(self, order: tuple[str, str], amount: int, only_grant: bool, reason: Any) -> Any:
        """Credits taken back because a payment's money went back, once per reversal id (sent twice at
        once): the order's credits at most, in all its reversals; never below what the account has
        available; from the order's grant first (with only_grant only from it), then in draw order."""
        account, order_id = order
        paid = self.run(self.payments.orders.get(order_id))
        assert paid is not None
        rid = self.new_id("rev")
        twice = [self.payments.reverse(paid, rid, reason, amount, only_grant=only_grant) for _ in "ab"]
        results = self.run_all(*twice)
        asked = min(amount, paid.credits - self.asked[order_id])
        taken = self._reversed(account, order_id, max(asked, 0), only_grant)
        self.asked[order_id] += max(asked, 0)
        assert [r.taken for r in results] == [taken, taken], (asked, taken)
        assert sum(r.created for r in results) == (1 if asked > 0 else 0)
        return account, order_id, rid, taken

    def _reversed(self, account: str, order_id: str, asked: int, only_grant: bool) -> int:
        acct = self.model[account]
        if asked == 0:
            return 0
        acct.expire_due(self.clock)
        first = acct.grants.get(order_id)
        left = first.remaining if first is not None else 0
        take = max(0, min(asked, acct.balance - acct.held, left if only_grant else asked))
        rest = take
        if first is not None and left > 0 and rest > 0:
            part = min(left, rest)
            acct.grants[order_id] = dataclasses.replace(first, remaining=left - part)
            rest -= part
        if rest > 0:
            for gid, drawn in draw(acct.live_grants(), rest, acct.active_ms, IDLE_MS):
                acct.grants[gid] = dataclasses.replace(
                    acct.grants[gid], remaining=acct.grants[gid].remaining - drawn
                )
        acct.balance -= take
        acct.reversed += take
        acct.reversed_unflushed += take
        return take

    @rule(reversal=reversals)
    def restore(self, reversal: tuple[str, str, str, int]) -> None:
        """What a reversal took given back (a dispute won), once, however often and concurrently it is
        reported: a refund grant of that amount."""
        account, order_id, rid, taken = reversal
        paid = self.run(self.payments.orders.get(order_id))
        assert paid is not None
        given = self.run_all(self.payments.restore(paid, rid), self.payments.restore(paid, rid))
        first = taken > 0 and rid not in self.restored
        assert sorted(given) == ([0, taken] if first else [0, 0])
        if first:
            self.restored.add(rid)
            self._granted(account, f"restore:{rid}", taken, GrantTerms("refund"))

    @rule(reversal=reversals)
    def reverse_again(self, reversal: tuple[str, str, str, int]) -> None:
        """A reversal sent again takes nothing more, whatever happened since (Redis lost included)."""
        _, order_id, rid, taken = reversal
        paid = self.run(self.payments.orders.get(order_id))
        assert paid is not None
        again = self.run(self.payments.reverse(paid, rid, "refund", 1))
        assert (again.taken, again.created) == (taken, False)

    # ---- the request path ---------------------------------------------------------------------------

    def _reserve(
        self,
        account: str,
        request_id: str,
        amount: int,
        cache_key: str | None = None,
        caller: tuple[str | None, str | None] = (None, None),
        idempotency_key: str | None = None,
    ) -> Any:
        scopes = cap_scopes(caller[0], "m", caller[1])
        lease_end = self.clock + LEASE_MS
        return self.run(
            self.svc.balances.reserve(
                account,
                request_id,
                amount,
                lease_end,
                cache_key=cache_key,
                scopes=scopes,
                idempotency_key=idempotency_key,
            )
        )

    def _expected(self, account: str, amount: int, caller: tuple[str | None, str | None]) -> ReserveStatus:
        """What the reserve of a new hold must answer: the balance first, then the spend caps."""
        acct = self.model[account]
        acct.expire_due(self.clock)  # a new hold's reserve expires what ended first
        refused = acct.refuses(amount)
        if refused is not None:
            return refused
        if acct.cap_over(cap_scopes(caller[0], "m", caller[1]), amount):
            return ReserveStatus.CAPPED
        return ReserveStatus.HELD

    def _refused(
        self, account: str, amount: int, caller: tuple[str | None, str | None], expected: Any
    ) -> None:
        reply = self._reserve(account, self.new_id("req"), amount, caller=caller)
        assert reply.status == expected, (reply, expected)
        if expected == ReserveStatus.CAPPED:
            over = self.model[account].cap_over(cap_scopes(caller[0], "m", caller[1]), amount)
            assert reply.cap is not None
            assert over == (reply.cap.scope, reply.cap.period)

    @rule(target=held, account=accounts, amount=amounts, caller=callers)
    def reserve(self, account: str, amount: int, caller: tuple[str | None, str | None]) -> Any:
        expected = self._expected(account, amount, caller)
        if expected == ReserveStatus.HELD:
            return self._hold(account, amount, caller)
        self._refused(account, amount, caller, expected)
        return multiple()

    def _hold(
        self, account: str, amount: int, caller: tuple[str | None, str | None] = (None, None)
    ) -> Request:
        """A reserve the model says the account covers, within its caps."""
        acct = self.model[account]
        request_id = self.new_id("req")
        reply = self._reserve(account, request_id, amount, caller=caller)
        assert reply.status == ReserveStatus.HELD
        if acct.invoice and acct.credit is not None and amount > 0:  # admitted within the credit limit
            assert reply.held <= reply.balance + acct.credit, (reply, acct.credit)
        self._held(acct, request_id, amount, caller)
        return Request(account, request_id)

    def _held(self, acct: Account, rid: str, amount: int, caller: tuple[str | None, str | None]) -> None:
        acct.holds[rid] = amount
        acct.leases[rid] = self.clock + LEASE_MS
        acct.who[rid] = caller
        acct.take_caps(rid, cap_scopes(caller[0], "m", caller[1]), amount)

    def _charged(self, acct: Account, charge: int) -> None:
        """A settle's money once its hold is released: the charge drawn (on what ended grants kept for
        the holds first), then what those grants kept and the holds left no longer need expires."""
        if charge:
            acct.draw(charge, self.clock)
        acct.balance -= charge
        acct.expire_due(self.clock)

    def _event(self, acct: Account, rid: str) -> UsageEvent:
        key_id, user = acct.who.get(rid, (None, None))
        return UsageEvent(route="chat", model="m", key_id=key_id, user=user)

    @rule(request=held)
    def reserve_again(self, request: Request) -> None:
        """A reserve sent again (a lost reply): the same hold, nothing more; once reaped it holds anew
        only if the account still covers it."""
        acct = self.model[request.account]
        rid = request.request_id
        amount = acct.holds.get(rid, acct.reaped.get(rid, 0))
        caller = acct.who.get(rid, (None, None))
        expected = (
            ReserveStatus.HELD if rid in acct.holds else self._expected(request.account, amount, caller)
        )
        reply = self._reserve(request.account, rid, amount, caller=caller)
        assert reply.status == expected
        if expected == ReserveStatus.HELD and rid not in acct.holds:
            self._held(acct, rid, amount, caller)
            acct.reaped.pop(rid)

    @rule(target=settled, request=consumes(held), data=st.data())
    def settle(self, request: Request, data: st.DataObject) -> Request:
        """Settle at most what was held (the request path's bound); a hold already reaped still pays."""
        acct = self.model[request.account]
        bound = acct.holds.get(request.request_id, acct.reaped.get(request.request_id, 0))
        self._settle(request, data.draw(st.integers(min_value=0, max_value=bound), label="charge"))
        return request

    @rule(target=settled, account=accounts, amount=amounts, caller=callers, data=st.data())
    def request(
        self, account: str, amount: int, caller: tuple[str | None, str | None], data: st.DataObject
    ) -> Any:
        """A whole request: its hold, then its settle at most that."""
        expected = self._expected(account, amount, caller)
        if expected != ReserveStatus.HELD:
            self._refused(account, amount, caller, expected)
            return multiple()
        request = self._hold(account, amount, caller)
        self._settle(request, data.draw(st.integers(min_value=0, max_value=amount), label="charge"))
        return request

    def _settle(
        self, request: Request, charge: int, idempotency: tuple[str, bytes, int] | None = None
    ) -> None:
        acct = self.model[request.account]
        rid = request.request_id
        event = self._event(acct, rid)
        result = self.run(
            self.svc.balances.settle(request.account, rid, charge, event, idempotency=idempotency)
        )
        assert result.first
        assert result.charged == charge
        acct.expire_due(self.clock)  # while the hold still counts
        released = acct.holds.pop(rid, 0)
        assert result.released == released
        acct.release_caps(rid, released)
        acct.count_spend(cap_scopes(*self._caller_scopes(acct, rid)), charge)
        acct.leases.pop(rid, None)
        if rid in acct.reaped:
            acct.reaped.pop(rid)
            acct.overdrawn = acct.overdrawn or charge > 0
        self._charged(acct, charge)
        assert result.balance == acct.balance
        acct.charges[rid] = charge
        if charge:
            acct.usage_rows.add(rid)
            acct.unflushed.add(rid)

    @rule(request=settled, charge=amounts)
    def settle_again(self, request: Request, charge: int) -> None:
        """A retried settle, even with another charge, returns the first and moves nothing."""
        self._settle_retry(request.account, request.request_id, charge)

    @precondition(lambda self: any(acct.charges for acct in self.model.values()))
    @rule()
    def retry_every_settle(self) -> None:
        """Every settle sent again with the charge it was sent with (as pending settlements are retried),
        whatever happened since: flushed, Redis lost and rebuilt, its hold reaped."""
        for account, acct in self.model.items():
            for rid, charge in list(acct.charges.items()):
                self._settle_retry(account, rid, charge)

    def _settle_retry(self, account: str, rid: str, charge: int) -> None:
        """A settle sent again returns the first charge and moves nothing, unless a lost Redis took the
        first with it: then it is the settle (sent with the charge the request path priced)."""
        acct = self.model[account]
        if rid in acct.forgotten:
            charge = acct.charges[rid]
        result = self.run(self.svc.balances.settle(account, rid, charge, self._event(acct, rid)))
        if rid not in acct.forgotten:
            assert not result.first, rid
            assert result.charged == acct.charges[rid], rid
            return
        assert result.first, rid
        acct.expire_due(self.clock)  # while its hold (a reserve sent again took one) still counts
        released = acct.holds.pop(rid, 0)
        assert result.released == released
        acct.release_caps(rid, released)
        acct.count_spend(cap_scopes(*self._caller_scopes(acct, rid)), charge)
        acct.leases.pop(rid, None)
        acct.forgotten.remove(rid)
        acct.overdrawn = acct.overdrawn or charge > 0
        if rid not in acct.usage_rows:  # its charge was lost with Redis: this one restores it
            self._charged(acct, charge)
            acct.lost -= charge
            if charge:
                acct.usage_rows.add(rid)
                acct.unflushed.add(rid)
        else:
            acct.expire_due(self.clock)

    @rule(request=settled)
    def reserve_after_settle(self, request: Request) -> None:
        """A reserve arriving after its request settled holds nothing (unless that settle was lost)."""
        acct = self.model[request.account]
        rid = request.request_id
        caller = acct.who.get(rid, (None, None))
        if rid not in acct.forgotten:
            expected = ReserveStatus.ALREADY_SETTLED
        elif rid in acct.holds:
            expected = ReserveStatus.HELD
        else:
            expected = self._expected(request.account, 1, caller)
        reply = self._reserve(request.account, rid, 1, caller=caller)
        assert reply.status == expected
        if expected == ReserveStatus.HELD and rid not in acct.holds:
            self._held(acct, rid, 1, caller)

    @rule(ms=st.integers(min_value=1, max_value=2 * LEASE_MS))
    def reap(self, ms: int) -> None:
        """The clock moves on and the reaper releases every hold whose lease ended."""
        self.clock += ms
        released = self.run(self.svc.balances.expire_holds(self.clock))
        expected = 0
        for acct in self.model.values():
            for rid, end in list(acct.leases.items()):
                if end <= self.clock:
                    expected += acct.holds[rid]
                    acct.reaped[rid] = acct.holds.pop(rid)
                    acct.release_caps(rid, acct.reaped[rid])
                    acct.leases.pop(rid)
        assert released == expected

    @rule(
        target=held,
        account=accounts,
        amount=st.integers(min_value=1, max_value=20_000_000),
        kind=st.sampled_from(GRANT_KINDS),
        ends_in=st.integers(min_value=1, max_value=LEASE_MS - 1),
        caller=callers,
        after=st.integers(min_value=0, max_value=1_000),
    )
    def hold_across_a_grant_end(
        self,
        account: str,
        amount: int,
        kind: str,
        ends_in: int,
        caller: tuple[str | None, str | None],
        after: int,
    ) -> Any:
        """A grant that ends within a lease, a hold of all the account has available, then the clock moves
        on to just past the grant's end while every live lease still runs (nothing is reaped), and the
        sweeper runs: the ended grant keeps what the hold needs, so its settle cannot overdraw."""
        _, key, _, _ = self._grant(account, amount, GrantTerms(kind, None, self.clock + ends_in))
        request = self.reserve_everything(account, caller)
        acct = self.model[account]
        end = acct.grants[key].ends_ms(acct.active_ms, IDLE_MS)
        leases = [lease - 1 for a in self.model.values() for lease in a.leases.values()]
        self.clock = max(self.clock, min([end + after, *leases]))
        self.sweep()
        return request

    @rule(target=held, account=accounts, caller=callers)
    def reserve_everything(self, account: str, caller: tuple[str | None, str | None]) -> Any:
        """A hold of all the account has available (what a grant ending under the hold must not take)."""
        probe = copy.deepcopy(self.model[account])
        probe.expire_due(self.clock)  # what the reserve expires first
        free = probe.available()
        amount = 1 if free is None or free <= 0 else free
        expected = self._expected(account, amount, caller)
        if expected != ReserveStatus.HELD:
            self._refused(account, amount, caller, expected)
            return multiple()
        return self._hold(account, amount, caller)

    @rule(target=cached, account=accounts, charge=st.integers(min_value=0, max_value=1_000))
    def store_in_cache(self, account: str, charge: int) -> Any:
        """A miss that stores its answer in the account's cache as it settles."""
        acct = self.model[account]
        request_id, cache_key = self.new_id("req"), self.svc.keys.account(account).cache(self.new_id("c"))
        caller = CALLERS[0]
        expected = self._expected(account, charge, caller)
        reply = self._reserve(account, request_id, charge, cache_key, caller)
        assert reply.status == expected
        if expected != ReserveStatus.HELD:
            return multiple()
        self._held(acct, request_id, charge, caller)
        result = self.run(
            self.svc.balances.settle(
                account,
                request_id,
                charge,
                self._event(acct, request_id),
                cache_entry=(cache_key, b"answer", CACHE_TTL_MS),
            )
        )
        assert result.first
        acct.expire_due(self.clock)
        acct.holds.pop(request_id)
        acct.leases.pop(request_id)
        acct.release_caps(request_id, charge)
        acct.count_spend(cap_scopes(*self._caller_scopes(acct, request_id)), charge)
        self._charged(acct, charge)
        acct.charges[request_id] = charge
        if charge:
            acct.usage_rows.add(request_id)
            acct.unflushed.add(request_id)
        acct.cache.add(cache_key)
        return account, cache_key

    @rule(entry=cached)
    def cache_hit(self, entry: tuple[str, str]) -> None:
        """A hit holds nothing and is recorded (a zero usage row), however poor the account is."""
        account, cache_key = entry
        acct = self.model[account]
        request_id = self.new_id("hit")
        reply = self._reserve(account, request_id, 10**9, cache_key)
        acct.expire_due(self.clock)  # the reserve (a miss) or the hit's record settle expires what ended
        if cache_key not in acct.cache:  # lost with Redis
            assert reply.status in (ReserveStatus.HELD, ReserveStatus.INSUFFICIENT, ReserveStatus.CAPPED,
                                    ReserveStatus.BLOCKED)  # fmt: skip
            if reply.status == ReserveStatus.HELD:
                self.run(self.svc.balances.settle(account, request_id, 0))
                acct.expire_due(self.clock)  # what its hold no longer needs
            return
        assert reply.status == ReserveStatus.CACHED
        assert reply.cached == b"answer"
        result = self.run(
            self.svc.balances.settle(account, request_id, 0, UsageEvent(route="chat"), record=True)
        )
        assert result.first
        acct.usage_rows.add(request_id)
        acct.unflushed.add(request_id)

    @rule(
        target=keyed,
        account=accounts,
        amount=amounts,
        caller=callers,
        stored=st.booleans(),
        data=st.data(),
    )
    def keyed_request(
        self,
        account: str,
        amount: int,
        caller: tuple[str | None, str | None],
        stored: bool,
        data: st.DataObject,
    ) -> Any:
        """A request with an Idempotency-Key: its hold claims the key (another request with it is refused
        as in progress and holds nothing; its own reserve sent again finds its hold); its settle stores
        the answer, or (a failed call) releases the claim. A refused reserve claims nothing."""
        acct = self.model[account]
        key = self.svc.keys.account(account).idempotent(self.new_id("idem"))
        request_id = self.new_id("req")
        expected = self._expected(account, amount, caller)
        reply = self._reserve(account, request_id, amount, caller=caller, idempotency_key=key)
        assert reply.status == expected
        if expected != ReserveStatus.HELD:
            assert self.run(self._exists(key)) == 0
            return multiple()
        self._held(acct, request_id, amount, caller)
        other = self._reserve(account, self.new_id("req"), 0, caller=caller, idempotency_key=key)
        assert other.status == ReserveStatus.IN_PROGRESS
        again = self._reserve(account, request_id, amount, caller=caller, idempotency_key=key)
        assert again.status == ReserveStatus.HELD
        answer = f"answer of {request_id}".encode()
        charge = data.draw(st.integers(min_value=0, max_value=amount), label="charge")
        self._settle(Request(account, request_id), charge, (key, answer if stored else b"", CACHE_TTL_MS))
        if stored:
            acct.answers[key] = answer
        return account, key

    @rule(entry=keyed)
    def replay(self, entry: tuple[str, str]) -> None:
        """A retry with the key: its stored answer, with nothing held, charged or recorded, however poor
        the account is; with none (a failed call, or lost with Redis) it is a request of its own."""
        account, key = entry
        acct = self.model[account]
        request_id = self.new_id("retry")
        reply = self._reserve(account, request_id, 0, idempotency_key=key)
        if key in acct.answers:
            assert (reply.status, reply.replay, reply.cached) == (
                ReserveStatus.CACHED,
                True,
                acct.answers[key],
            )
            assert reply.balance == acct.balance
            return
        assert reply.status == ReserveStatus.HELD  # free work, always held: then settled, releasing the claim
        acct.expire_due(self.clock)
        self._held(acct, request_id, 0, (None, None))
        self._settle(Request(account, request_id), 0, (key, b"", CACHE_TTL_MS))
        assert self.run(self._exists(key)) == 0

    async def _exists(self, key: str) -> int:
        return int(await self.svc.redis.exists(key))

    def _caller_scopes(self, acct: Account, rid: str) -> tuple[str | None, str | None, str | None]:
        key_id, user = acct.who.get(rid, (None, None))
        return key_id, "m", user

    @rule(
        account=accounts,
        scope=st.sampled_from(CAP_SCOPES),
        period=st.sampled_from(PERIODS),
        limit=st.integers(min_value=0, max_value=20_000_000),
    )
    def set_cap(self, account: str, scope: str, period: str, limit: int) -> None:
        """A spend cap (possibly below what is already spent or held: it then refuses every new hold)."""

        async def write() -> None:
            await self.svc.redis.hset(self.svc.keys.account(account).caps, f"{scope}|{period}", str(limit))

        self.run(write())
        self.model[account].caps[(scope, period)] = limit

    @precondition(lambda self: any(acct.caps for acct in self.model.values()))
    @rule(target=held, data=st.data(), caller=callers)
    def reserve_up_to_a_cap(self, data: st.DataObject, caller: tuple[str | None, str | None]) -> Any:
        """A hold of exactly a cap's headroom fits (if nothing else is tighter), one micro-credit more not."""
        account = data.draw(st.sampled_from(sorted(a for a, acct in self.model.items() if acct.caps)))
        acct = self.model[account]
        scope, period = data.draw(st.sampled_from(sorted(acct.caps)))
        used = acct.spend.get((period, scope), 0) + acct.cap_held.get(scope, 0)
        headroom = acct.caps[(scope, period)] - used
        if headroom <= 0:
            return multiple()
        over = self._expected(account, headroom + 1, caller)
        if over == ReserveStatus.HELD:  # the cap is not among the caller's scopes
            return multiple()
        self._refused(account, headroom + 1, caller, over)
        expected = self._expected(account, headroom, caller)
        if expected != ReserveStatus.HELD:
            self._refused(account, headroom, caller, expected)
            return multiple()
        return self._hold(account, headroom, caller)

    # ---- billing modes (documents/billing_modes.py) ---------------------------------------------------

    @rule(
        account=accounts,
        invoice=st.booleans(),
        limit=st.one_of(st.none(), st.integers(min_value=0, max_value=10_000_000)),
    )
    def set_billing_mode(self, account: str, invoice: bool, limit: int | None) -> None:
        """On invoice with a credit limit (None: unlimited), or back to prepaid: Postgres, then Redis; new
        holds are admitted against balance - held + the limit (a rebuild keeps it: Postgres has it)."""
        body = BillingBody(mode="invoice" if invoice else "prepaid")
        if invoice and limit is not None:
            body.credit_limit = format_credits(limit)
        view = self.run(self._modes.put(account, body))
        assert (view["mode"], view["credit_limit"]) == (body.mode, limit if invoice else None)
        acct = self.model[account]
        acct.invoice = acct.invoice or invoice  # its balance may stay below zero once it accrued
        acct.credit = limit if invoice else 0

    @rule(account=accounts, blocked=st.booleans())
    def block(self, account: str, blocked: bool) -> None:
        """Blocked (an overdue invoice): no positive hold is admitted, free work still is."""
        done = self.run(self._modes.set_blocked(account, blocked, "overdue" if blocked else None))
        assert done.blocked is blocked
        self.model[account].blocked = blocked

    @property
    def _modes(self) -> BillingModes:
        return BillingModes(self.svc.store.pool, self.svc.redis, self.svc.keys)

    # ---- subscription plans (documents/plans.py) -------------------------------------------------------

    def _plans(self, now: int | None = None) -> Plans:
        at = self.clock if now is None else now
        return Plans(self.svc.store.pool, self.svc.admin, {"m": PLAN, "p": STRIPE_PLAN}, clock=lambda: at)

    def _subscribed(self, account: str) -> bool:
        return any(a == account for a, _, _ in self.subscriptions.values()) or any(
            sub.account == account for sub in self.stripe_subs.values()
        )

    def _period_granted(self, sid: str, index: int, ends_ms: int) -> None:
        account, _, granted = self.subscriptions[sid]
        granted.add(index)
        terms = GrantTerms("subscription", None, ends_ms, idle=False)
        self._granted(account, grant_key(sid, index), PLAN.included_credits, terms)

    @precondition(lambda self: len(self.subscriptions) < 3)
    @rule(
        target=subscription_ids, account=accounts, ends_in=st.integers(min_value=1, max_value=LEASE_MS // 2)
    )
    def subscribe(self, account: str, ends_in: int) -> Any:
        """A subscription whose first period began 28 days (February) before it ends, `ends_in` ahead on
        the model's clock: its grant arrives now and ends with the period."""
        if self._subscribed(account):
            return multiple()
        end = self.clock + ends_in
        anchor = end - 28 * DAY_MS
        view = self.run(self._plans(anchor).start(account, "m"))["subscription"]
        assert view["period"]["index"] == 0
        self.subscriptions[view["id"]] = (account, anchor, set())
        self._period_granted(view["id"], 0, end)
        return view["id"]

    @precondition(lambda self: self.subscriptions or self.stripe_subs)  # (the worker never grants the latter)
    @rule(cross=st.booleans())
    def subscription_periods(self, cross: bool) -> None:
        """Two sidecars run the period pass at once (`cross`: once the clock reached the next period's
        start, seconds ahead): a period begun by now is granted once, the ended one's grant expired."""
        ends = [a + 28 * DAY_MS for _, a, granted in self.subscriptions.values() if 1 not in granted]
        if cross and ends:
            self.clock = max(self.clock, min(ends))
        made = self.run_all(self._plans().run_pass(), self._plans().run_pass())
        expected = 0
        for sid, (_, anchor, granted) in self.subscriptions.items():
            if self.clock >= anchor + 28 * DAY_MS and 1 not in granted:  # period 1 began (March 17)
                self._period_granted(sid, 1, anchor + 28 * DAY_MS + 31 * DAY_MS)
                expected += 1
        assert sum(made) == expected

    @rule(sid=subscription_ids)
    def subscription_grant_again(self, sid: str) -> None:
        """A period's grant made again (a worker that died before recording it) credits nothing."""
        account, _, granted = self.subscriptions[sid]
        index = max(granted)
        key = grant_key(sid, index)
        result = self.run(self.svc.admin.grant(account, PLAN.included_credits, key, "subscription"))
        assert result["credited"] is False

    @invariant()
    def subscription_periods_match_the_model(self) -> None:
        if not self.subscriptions:
            return
        rows = self.run(
            self.svc.store.pool.fetch("SELECT subscription_id, period_index FROM subscription_periods")
        )
        found: dict[str, set[int]] = {}
        for r in rows:
            found.setdefault(r["subscription_id"], set()).add(r["period_index"])
        expected = {sid: granted for sid, (_, _, granted) in self.subscriptions.items()}
        expected |= {sid: sub.granted for sid, sub in self.stripe_subs.items() if sub.granted}
        assert found == expected

    # ---- provider-billed subscriptions (documents/plan_invoices.py) ------------------------------------

    @precondition(lambda self: len(self.stripe_subs) < 2)
    @rule(target=stripe_sub_ids, account=accounts)
    def stripe_subscribe(self, account: str) -> Any:
        """A provider-billed subscription: nothing granted until its invoice is paid."""
        if self._subscribed(account):
            return multiple()
        ref = self.new_id("sub_model")
        view = self.run(self._plans().start(account, "p", ref))["subscription"]
        assert view["period"] is None
        self.stripe_subs[view["id"]] = StripeSub(account, ref)
        return view["id"]

    @rule(
        sid=stripe_sub_ids,
        ends_in=st.integers(min_value=2_000, max_value=LEASE_MS // 2),
        off=st.integers(min_value=-5, max_value=5),
        cross=st.booleans(),
        twice=st.booleans(),
    )
    def stripe_invoice_paid(self, sid: str, ends_in: int, off: int, cross: bool, twice: bool) -> None:
        """Stripe's invoice.paid for the subscription's next period (the first: a February one, ending
        `ends_in` ahead; `cross`: the clock moved on to the next one), its instants `off` seconds from
        ours, delivered once or `twice` at once: a period begun is granted once, anything else nothing."""
        sub = self.stripe_subs[sid]
        if sub.anchor is None:
            anchor = (self.clock + ends_in - 28 * DAY_MS) // 1000 * 1000  # Stripe's: whole seconds
            p, due, off = plan_periods.period(anchor, "UTC", "month", 0), True, 0
        else:
            anchor, last = sub.anchor, max(sub.granted)
            nxt = plan_periods.period(anchor, "UTC", "month", last + 1)
            if cross and nxt.start_ms - self.clock <= LEASE_MS // 2:  # seconds on, never a month
                self.clock = max(self.clock, nxt.start_ms)
            due = self.clock >= nxt.start_ms
            p = nxt if due else plan_periods.period(anchor, "UTC", "month", last)
        raw = self._invoice(sub, p, off)
        outcomes = sorted(
            o for _, o in self.run_all(*(invoice_paid(self._plans(), raw) for _ in range(1 + twice)))
        )
        assert outcomes == sorted(["granted"] * due + ["already_granted"] * (twice + 1 - due)), outcomes
        if due:
            sub.anchor = anchor
            sub.granted.add(p.index)
            terms = GrantTerms("subscription", None, p.end_ms, idle=False)
            self._granted(sub.account, grant_key(sid, p.index), STRIPE_PLAN.included_credits, terms)

    def _invoice(self, sub: StripeSub, p: plan_periods.Period, off: int) -> msgspec.Raw:
        line = {
            "period": {"start": p.start_ms // 1000 + off, "end": p.end_ms // 1000 + off},
            "pricing": {"price_details": {"price": STRIPE_PLAN.stripe_price}},
        }
        invoice = {
            "id": f"in_{sub.ref}_{p.index}",
            "parent": {"subscription_details": {"subscription": sub.ref}},
            "lines": {"data": [line]},
        }
        return msgspec.Raw(msgspec.json.encode(invoice))

    # ---- recurring charges (meters) ------------------------------------------------------------------

    def _meter_worker(self) -> MeterCharges:
        marker_ms = self.svc.settings.meter_marker_seconds * 1000
        pool = self.svc.store.pool
        return MeterCharges(
            self.svc.balances, pool, EventLog(), marker_ms=marker_ms, clock=lambda: self.clock
        )

    def _meter_period(self, meter: MeterState, n: int) -> bool:
        """The model of period `n`'s reserve and settle: True paid (now, or by an earlier try whose
        marker Redis still has), False too little available (nothing moves)."""
        acct = self.model[meter.account]
        rid = f"meter:{meter.meter_id}:{n}"
        if rid in acct.charges and rid not in acct.forgotten:
            return True  # the settled marker: nothing moves again
        acct.expire_due(self.clock)
        if acct.refuses(meter.amount) is not None:
            return False
        self._charged(acct, meter.amount)
        acct.count_spend(["account"], meter.amount)
        if rid in acct.forgotten:  # a lost Redis took the first charge with it: this one restores it
            acct.forgotten.remove(rid)
            acct.lost -= meter.amount
        acct.charges[rid] = meter.amount
        acct.usage_rows.add(rid)
        acct.unflushed.add(rid)
        return True

    def _meter_pass(self, meter: MeterState) -> None:
        """What a pass does to one meter: every period started by now charged in turn, until one is not."""
        while not meter.stopped and meter.started_ms + meter.next_period * METER_PERIOD_MS <= self.clock:
            if not self._meter_period(meter, meter.next_period):
                meter.unpaid = True
                return
            meter.unpaid = False
            meter.next_period += 1

    @precondition(lambda self: len(self.meters) < 4)
    @rule(target=meter_ids, account=accounts, amount=st.integers(min_value=1, max_value=3_000_000))
    def start_meter(self, account: str, amount: int) -> Any:
        """A meter (a period of 60 s on the model's clock): refused when the available credits do not
        cover its first period, else charged for it at once. One meter per account, so the order in
        which a pass charges meters does not matter to the model."""
        if any(m.account == account for m in self.meters.values()):
            return multiple()
        acct = self.model[account]
        meters = Meters(self._meter_worker(), self.svc.settings)
        body = msgspec.json.encode({"resource_id": self.new_id("res"), "price": amount, "period": 60})
        free = acct.available()  # the create checks what is available (with the credit line), not a block
        if free is not None and free < amount:
            with pytest.raises(InsufficientCredits):
                self.run(meters.create(account, body))
            return multiple()
        view, status = self.run(meters.create(account, body))
        assert status == 201
        meter = self.meters[view["id"]] = MeterState(view["id"], account, amount, self.clock)
        self._meter_pass(meter)
        return view["id"]

    @precondition(lambda self: self.meters)
    @rule()
    def charge_meters(self) -> None:
        """Two sidecars run the same pass at once: each period due is charged once, or the meter is unpaid."""
        self.run_all(self._meter_worker().run_pass(self.clock), self._meter_worker().run_pass(self.clock))
        for meter in self.meters.values():
            self._meter_pass(meter)

    @rule(meter_id=meter_ids)
    def crash_mid_charge(self, meter_id: str) -> None:
        """A worker moves a period's money in Redis and dies before Postgres records it (or that it was
        unpaid): the next pass records it without charging again."""
        meter = self.meters[meter_id]
        worker = self._meter_worker()
        claimed = [m for m in self.run(worker._claim(self.clock, set())) if m.meter_id == meter_id]
        if not claimed:
            return
        n = claimed[0].next_period
        row = self.run(self.svc.store.pool.fetchrow(
            "SELECT * FROM meter_charges WHERE meter_id = $1 AND period = $2", meter_id, n
        ))  # fmt: skip
        assert row is not None
        moved = self.run(
            worker._move(claimed[0], n, row["amount"], row["starts_ms"], row["window_end_ms"], 0)
        )
        assert moved == self._meter_period(meter, n)

    @rule(meter_id=meter_ids)
    def stop_meter(self, meter_id: str) -> None:
        meter = self.meters[meter_id]
        view = self.run(Meters(self._meter_worker(), self.svc.settings).stop(meter.account, meter_id))
        self._meter_pass(meter)
        meter.stopped = True
        assert view["status"] == "stopped"

    @invariant()
    def meters_match_the_model(self) -> None:
        if not self.meters:
            return
        rows = self.run(self.svc.store.pool.fetch("SELECT meter_id, status, next_period FROM meters"))
        found = {r["meter_id"]: (r["status"], r["next_period"]) for r in rows}
        assert found == {
            m.meter_id: ("stopped" if m.stopped else "unpaid" if m.unpaid else "running", m.next_period)
            for m in self.meters.values()
        }

    # ---- operation holds (POST /v1/holds and its settle, release, extend) ----------------------------

    def _op_hold(self, account: str, idem: str, units: int, caller: tuple[str | None, None]) -> str | None:
        """A POST of an operation hold as the model expects it: the worst case reserved unless the spec
        says it was held already; the hold id, or None when it was refused (the spec stays)."""
        acct = self.model[account]
        amount = OPERATION.cost(units)
        call = self.ops.hold(Caller(account, caller[0]), "m", units, idem)
        meta = self.op_meta.get(self._op_id(account, idem))
        if meta is not None and (meta.flagged or meta.end is not None):
            view = self.run(call)
            assert view.state == ("held" if view.hold_id in acct.holds else "expired"), view
            return view.hold_id
        expected = self._expected(account, amount, caller)
        refusal = {
            ReserveStatus.INSUFFICIENT: InsufficientCredits,
            ReserveStatus.CAPPED: SpendCapExceeded,
            ReserveStatus.BLOCKED: InvoiceOverdue,
        }
        if expected != ReserveStatus.HELD:
            with pytest.raises(refusal[expected]):
                self.run(call)
            self.op_meta[self._op_id(account, idem)] = OpMeta(units, flagged=False)
            return None
        view = self.run(call)
        assert (view.state, view.spec.amount, view.lease_end_ms) == ("held", amount, self.clock + LEASE_MS)
        self._held(acct, view.hold_id, amount, caller)
        acct.reaped.pop(view.hold_id, None)
        self.op_meta[view.hold_id] = OpMeta(units, flagged=True)
        return view.hold_id

    def _op_id(self, account: str, idem: str) -> str:
        return hold_id_of(account, idem)

    @rule(target=op_held, account=accounts, units=st.integers(min_value=1, max_value=100), caller=op_callers)
    def op_hold(self, account: str, units: int, caller: tuple[str | None, None]) -> Any:
        """An operation's worst case held through the reserve script (its balance and caps rules)."""
        idem = self.new_id("idem")
        rid = self._op_hold(account, idem, units, caller)
        return multiple() if rid is None else (account, idem, units, caller)

    @rule(entry=op_held)
    def op_hold_again(self, entry: tuple[str, str, int, tuple[str | None, None]]) -> None:
        """A retried POST: the same hold, held once; after the reaper it is not held anew (only once its
        metadata is gone with a lost Redis is it a new hold)."""
        account, idem, units, caller = entry
        assert self._op_hold(account, idem, units, caller) in (None, self._op_id(account, idem))

    def _op_end(self, account: str, rid: str, kind: str, units: int) -> Any:
        """A settle (or release) through the operations API; None when its metadata was lost."""
        call = self.ops.settle(account, rid, units) if kind == "settle" else self.ops.release(account, rid)
        meta = self.op_meta.get(rid)
        if meta is None:
            with pytest.raises(NotFound):
                self.run(call)
            return None
        if meta.end is not None and meta.end != (kind, units):
            with pytest.raises(Conflict):
                self.run(call)
            return None
        return self.run(call)

    @rule(target=settled, entry=consumes(op_held), data=st.data(), release=st.booleans())
    def op_settle(self, entry: tuple[str, str, int, Any], data: st.DataObject, release: bool) -> Any:
        """Settle at most the units held (per_run + units × unit_price, once; the rest released), or release
        (nothing charged); after the reaper a settle still charges (the documented overdraft)."""
        account, idem, held_units, _ = entry
        acct, rid = self.model[account], self._op_id(account, idem)
        units = 0 if release else data.draw(st.integers(min_value=0, max_value=held_units), label="units")
        kind = "release" if release else "settle"
        meta = self.op_meta.get(rid)
        if meta is not None and not meta.flagged:  # its POST, retried after a lost Redis, was refused
            with pytest.raises(Conflict):
                self.run(
                    self.ops.settle(account, rid, units)
                    if kind == "settle"
                    else self.ops.release(account, rid)
                )
            return multiple()
        view = self._op_end(account, rid, kind, units)
        if view is None:
            return multiple()
        charge = OPERATION.cost(units) if kind == "settle" else 0
        assert view.result is not None
        assert view.result.charged == charge
        assert view.state == ("settled" if kind == "settle" else "released")
        acct.expire_due(self.clock)  # while the hold still counts
        released = acct.holds.pop(rid, 0)
        assert view.result.released == released
        acct.release_caps(rid, released)
        acct.count_spend(cap_scopes(*self._caller_scopes(acct, rid)), charge)
        acct.leases.pop(rid, None)
        if acct.reaped.pop(rid, None) is not None:
            acct.overdrawn = acct.overdrawn or charge > 0
        self._charged(acct, charge)
        if charge:
            acct.usage_rows.add(rid)
            acct.unflushed.add(rid)
        acct.charges[rid] = charge
        meta = self.op_meta[rid]
        meta.end, meta.charged = (kind, units), charge
        return Request(account, rid)

    @rule(
        target=settled,
        account=accounts,
        units=st.integers(min_value=1, max_value=100),
        caller=op_callers,
        data=st.data(),
        release=st.booleans(),
    )
    def operation(
        self, account: str, units: int, caller: tuple[str | None, None], data: st.DataObject, release: bool
    ) -> Any:
        """A whole operation: its hold, then its settle (or release), sent twice."""
        idem = self.new_id("idem")
        if self._op_hold(account, idem, units, caller) is None:
            return multiple()
        settled = self.op_settle((account, idem, units, caller), data, release)
        self.op_settle_again(data, other=False)
        return settled

    @precondition(lambda self: any(m.end for m in self.op_meta.values()))
    @rule(data=st.data(), other=st.booleans())
    def op_settle_again(self, data: st.DataObject, other: bool) -> None:
        """A settle or release sent again returns the first answer and moves nothing; another one (other
        units, or a release after a settle) is a 409."""
        rid = data.draw(st.sampled_from(sorted(r for r, m in self.op_meta.items() if m.end)))
        meta = self.op_meta[rid]
        assert meta.end is not None
        kind, units = meta.end
        if other:
            kind, units = ("release", 0) if kind == "settle" else ("settle", 0)
        account = next(a for a, acct in self.model.items() if rid in acct.charges)
        view = self._op_end(account, rid, kind, units)
        if view is not None:
            assert view.result is not None
            assert view.result.charged == meta.charged

    @rule(entry=op_held)
    def op_extend(self, entry: tuple[str, str, int, Any]) -> None:
        """A live hold's lease renewed to a lease from now (never earlier); any other is a 4xx."""
        account, idem, _, _ = entry
        acct, rid = self.model[account], self._op_id(account, idem)
        if rid not in acct.holds or rid not in self.op_meta:
            with pytest.raises(CreditgateError):
                self.run(self.ops.extend(account, rid))
            return
        view = self.run(self.ops.extend(account, rid))
        acct.leases[rid] = max(acct.leases[rid], self.clock + LEASE_MS)
        assert view.lease_end_ms == acct.leases[rid]

    # ---- the ledger side ----------------------------------------------------------------------------

    @rule()
    def flush(self) -> None:
        self.run(self.svc.flusher(consumer=self.new_id("f")).drain())
        for acct in self.model.values():
            acct.unflushed.clear()
            acct.flushed_grants = {gid: g.remaining for gid, g in acct.grants.items()}
            acct.expired_flushed = acct.expired
            acct.reversed_unflushed = 0
        self.check_ledger()

    @rule()
    def kill_flusher(self) -> None:
        """A flusher reads a batch and dies before writing it: the entries stay pending, for the next."""
        self.run(self.svc.flusher(consumer=self.new_id("dead")).collect())

    @rule()
    def reconcile_finds_nothing(self) -> None:
        assert self.run(reconcile(self.svc.redis, self.svc.keys, self.svc.store)) == []

    @rule()
    def lose_redis(self) -> None:
        """Redis is lost (every key of ours) and rebuilt from the ledger: what was not flushed is gone with
        it (the documented loss of a Redis without persistence), holds and cache entries too."""

        async def lose() -> None:
            names = [n async for n in self.svc.redis.scan_iter(match=f"{self.svc.keys.prefix}*")]
            if names:
                await self.svc.redis.delete(*names)
            assert await rebuild_if_empty(
                self.svc.redis,
                self.svc.keys,
                self.svc.store,
                settled_marker_ms=self.svc.balances.settled_marker_ms,
                now_ms=self.clock,
            )

        self.run(lose())
        self.op_meta.clear()  # the operations' metadata is Redis' own
        for acct in self.model.values():
            flushed = acct.usage_rows - acct.unflushed
            for rid in acct.unflushed:
                charge = acct.charges.get(rid, 0)
                acct.lost += charge
                acct.balance += charge
                acct.usage_rows.discard(rid)
            # A settle the ledger has is still known as settled; any other (unflushed, or a release that
            # wrote no row) is forgotten: its retry settles again, with the charge it was sent with.
            acct.forgotten |= {rid for rid in acct.charges if rid not in flushed}
            acct.unflushed.clear()
            acct.reaped.update(acct.holds)  # gone: a settle still pays, a retried reserve holds anew
            acct.holds.clear()
            acct.leases.clear()
            acct.cache.clear()
            acct.answers.clear()
            # Expiries and grant draws not flushed are lost too: the grants are the ledger's, lowered to the
            # balance in draw order (a payoff lost with Redis is made again), their last activity now.
            acct.balance += acct.expired - acct.expired_flushed
            acct.expired = acct.expired_flushed
            acct.balance += acct.reversed_unflushed  # a reversal not flushed is lost like a charge
            acct.reversed -= acct.reversed_unflushed
            acct.reversed_unflushed = 0
            # The ledger knows each grant's terms, not that it ended under a live hold: with the holds
            # gone, a fixed end ends it again at once, an idle expiry starts again.
            acct.grants = {
                gid: dataclasses.replace(g, remaining=acct.flushed_grants[gid], ended_ms=0)
                for gid, g in acct.grants.items()
            }
            excess = sum(g.remaining for g in acct.live_grants()) - max(acct.balance, 0)
            if excess > 0:
                for gid, taken in draw(acct.live_grants(), excess, 0, 0):
                    acct.grants[gid] = dataclasses.replace(
                        acct.grants[gid], remaining=acct.grants[gid].remaining - taken
                    )
            acct.active_ms = self.clock
            acct.caps.clear()  # caps, what holds held in them and the spend counts: Redis' own
            acct.cap_held.clear()
            acct.hold_scopes.clear()
            acct.spend.clear()

    # ---- what must hold after every step ------------------------------------------------------------

    def check_ledger(self) -> None:
        async def read() -> None:
            for account, acct in self.model.items():
                assert await self.svc.store.ledger_sum(account) == acct.balance, account
                rows = await self.svc.store.pool.fetch(
                    "SELECT idempotency_id FROM ledger WHERE account_id = $1 AND kind = 'usage'", account
                )
                ids = [r["idempotency_id"] for r in rows]
                assert sorted(ids) == sorted(acct.usage_rows), account

        self.run(read())

    @invariant()
    def redis_matches_the_model(self) -> None:
        for account, acct in self.model.items():
            view = self.run(self.svc.balances.balance(account))
            assert (view.balance, view.held) == (acct.balance, acct.held), account
            assert {h.request_id: h.amount for h in view.holds} == acct.holds, account
            assert acct.granted == (
                view.available
                + view.held
                + sum(acct.charges.values())
                + acct.expired
                - acct.lost
                + acct.reversed
            ), account
            self.check_grants(account, acct)
            assert view.held >= 0
            # Prepaid, nothing is spent beyond what is held, and holds never outgrow the balance (no
            # grant ending under a hold takes what the hold was admitted against), until a settle after
            # its hold was reaped overdraws.
            assert acct.overdrawn or acct.invoice or view.balance >= view.held >= 0, account
            self.check_caps(account, acct)

    def check_grants(self, account: str, acct: Account) -> None:
        """Redis' grants are the model's (what is left of each, and its terms); they sum to the balance."""
        raw = self.run(self._grants_of(account))
        live = {g.grant_id: g for g in acct.live_grants()}
        assert {gid: (g.remaining, g.kind) for gid, g in raw.items()} == {
            gid: (g.remaining, g.kind) for gid, g in live.items()
        }, account
        assert sum(g.remaining for g in live.values()) == max(acct.balance, 0), account

    async def _grants_of(self, account: str) -> dict[str, Grant]:
        raw = await self.svc.redis.hgetall(self.svc.keys.account(account).grants)
        return {as_text(k): Grant.parse(as_text(k), as_text(v)) for k, v in raw.items()}

    def check_caps(self, account: str, acct: Account) -> None:
        """Redis' held-by-scope and spend counts equal the model's."""
        k = self.svc.keys.account(account)
        per = periods(self.clock)
        ids = {"total": "total", "day": per.day_id, "month": per.month_id}

        async def read() -> tuple[dict[str, int], dict[tuple[str, str], int]]:
            held = await self.svc.redis.hgetall(k.cap_held)
            spend = {}
            for period, pid in ids.items():
                for scope, value in (await self.svc.redis.hgetall(k.spend(pid))).items():
                    spend[(period, as_text(scope))] = int(value)
            return {as_text(s): int(v) for s, v in held.items() if int(v)}, spend

        held, spend = self.run(read())
        assert held == {s: v for s, v in acct.cap_held.items() if v}, account
        assert spend == acct.spend, account


def test_money_operations_agree_with_the_model(redis_url: str, database_url: str) -> None:
    loop = asyncio.new_event_loop()
    settings_ = make_settings(
        redis_url,
        database_url,
        partitions=4,
        flush_claim_idle_seconds=0,
        flush_interval_seconds=0.01,  # a killed flusher's read waits no longer than that
        ledger_partitions_ahead=0,
    )
    opened = services(settings_)
    MoneyModel.loop, MoneyModel.svc = loop, loop.run_until_complete(opened.__aenter__())
    try:
        run_state_machine_as_test(
            MoneyModel,
            settings=settings(
                max_examples=EXAMPLES,
                stateful_step_count=STEPS,
                deadline=None,
                derandomize=os.environ.get("CREDITGATE_MODEL_RANDOM") != "1",
                database=None,
                print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
            ),
        )
    finally:
        loop.run_until_complete(opened.__aexit__(None, None, None))
        loop.close()
