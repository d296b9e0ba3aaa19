"""Which upstream candidate serves a request, in what order, and which to leave alone for a while
(README "Routing and fallback"). No I/O: every decision takes `now` (seconds of a monotonic clock) and
the weighted draw takes the RNG, both injected, so that tests run them on a controlled clock and a seeded
RNG.

- **Order.** Candidates by priority (lower first); within one priority a weighted random order (each
  next one drawn with probability weight ÷ the weights left). With the cost order, the cheapest first
  (this request's worst case at the candidate's price and multiplier), ties in the priority order.
- **Circuit breaker**, per candidate (its upstream and the model sent there), per process, in memory:
  `failures_to_cool` fallback failures in a row open it for `cooldown` seconds (skipped while cooling);
  then it is half-open: one request's trial, whose success closes it and whose failure opens it again.
  A trial whose result never comes (its request vanished) is given up after another cooldown. When every
  candidate of a request is cooling, they are tried all the same, in order: a cooldown is a guess, and a
  request with no healthy candidate is better tried than refused.
- **What falls back.** A connect error, a timeout before the answer's headers, a 429 or a 5xx: the next
  candidate is tried (the attempt cost the customer nothing). Any other answer is the request's.
"""

from __future__ import annotations

import random
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Generic, Protocol, TypeVar

import msgspec

if TYPE_CHECKING:
    from .routing_settings import RoutingSettings

# The result of one upstream attempt, as the metrics label it.
OK = "ok"  # a 2xx (a stream relayed counts here, however it ends)
REDIRECT = "redirect"  # a 3xx, never followed
CLIENT_ERROR = "client_error"  # a 4xx other than 429: the client's answer
RATE_LIMITED = "rate_limited"  # a 429
SERVER_ERROR = "server_error"  # a 5xx
TIMEOUT = "timeout"  # no answer in time (connect, or the headers)
UNREACHABLE = "unreachable"  # the connection failed
BODY_FAILED = "body_failed"  # the answer's body broke off
CUT = "cut"  # the shutdown cut it
RESULTS = (OK, REDIRECT, CLIENT_ERROR, RATE_LIMITED, SERVER_ERROR, TIMEOUT, UNREACHABLE, BODY_FAILED, CUT)
# The failures the next candidate is tried after; they are also what the breaker counts.
FALLBACK = frozenset({RATE_LIMITED, SERVER_ERROR, TIMEOUT, UNREACHABLE})
# Neither a failure nor a success of the upstream: the breaker does not count them.
NEUTRAL = frozenset({BODY_FAILED, CUT})


def status_result(status: int) -> str:
    if status == 429:
        return RATE_LIMITED
    if status >= 500:
        return SERVER_ERROR
    if status >= 400:
        return CLIENT_ERROR
    return REDIRECT if status >= 300 else OK


_members = msgspec.json.Decoder(dict[str, msgspec.Raw])
_encode = msgspec.json.Encoder().encode


def with_model(body: bytes, model: str) -> bytes:
    """The JSON object `body` with its model set to `model` (the name a candidate's upstream knows it
    by): its other members' bytes are copied, never decoded."""
    members = _members.decode(body)
    members["model"] = msgspec.Raw(_encode(model))
    return _encode(members)


Circuit = tuple[str, str]  # (upstream, the model sent to it)


class Routable(Protocol):
    """A candidate as ordering and the breaker see it."""

    @property
    def circuit(self) -> Circuit: ...
    @property
    def priority(self) -> int: ...
    @property
    def weight(self) -> int: ...
    @property
    def position(self) -> int: ...
    @property
    def cost(self) -> int: ...


R = TypeVar("R", bound=Routable)


def ranked(candidates: Sequence[R], rng: random.Random) -> list[R]:
    """By priority (lower first), a weighted random order within each priority."""
    ordered = sorted(candidates, key=lambda c: (c.priority, c.position))
    out: list[R] = []
    start = 0
    while start < len(ordered):
        end = start + 1
        while end < len(ordered) and ordered[end].priority == ordered[start].priority:
            end += 1
        group = ordered[start:end]
        out.extend(group if len(group) == 1 else weighted(group, rng))
        start = end
    return out


def weighted(group: Sequence[R], rng: random.Random) -> list[R]:
    """A random order of `group`: each next one drawn with probability its weight ÷ the weights left
    (integers only)."""
    left = list(group)
    out: list[R] = []
    while left:
        pick = rng.randrange(sum(c.weight for c in left))
        for n, c in enumerate(left):
            pick -= c.weight
            if pick < 0:
                out.append(left.pop(n))
                break
    return out


@dataclass(slots=True)
class State:
    failures: int = 0  # fallback failures in a row
    open_until: float | None = None  # None: closed; cooling while now < it, half-open after
    trial_since: float | None = None  # a half-open trial in flight, since then


class Breaker:
    """The circuit of each candidate (see the module's docstring). Keys are the circuits seen, a bounded
    set: the configured candidates."""

    def __init__(self, failures_to_cool: int, cooldown: float) -> None:
        self.failures_to_cool = failures_to_cool
        self.cooldown = cooldown
        self.states: dict[Circuit, State] = {}

    def available(self, circuit: Circuit, now: float) -> bool:
        """Closed, or half-open with no trial in flight (a stale one is given up)."""
        s = self.states.get(circuit)
        if s is None or s.open_until is None:
            return True
        if now < s.open_until:
            return False
        return s.trial_since is None or now >= s.trial_since + self.cooldown

    def begin(self, circuit: Circuit, now: float) -> None:
        """An attempt starts: on a half-open circuit, it is the trial."""
        s = self.states.get(circuit)
        if s is not None and s.open_until is not None and now >= s.open_until:
            s.trial_since = now

    def record(self, circuit: Circuit, result: str, now: float) -> bool:
        """An attempt's result; True when it opened the circuit (a cooldown began)."""
        if result in NEUTRAL:
            s = self.states.get(circuit)
            if s is not None:
                s.trial_since = None
            return False
        if result not in FALLBACK:
            if circuit in self.states:
                del self.states[circuit]  # closed: no state kept
            return False
        s = self.states.setdefault(circuit, State())
        s.failures += 1
        was_cooling = s.open_until is not None and now < s.open_until
        if s.open_until is not None or s.failures >= self.failures_to_cool:
            s.open_until, s.trial_since = now + self.cooldown, None
            return not was_cooling  # a failure forced through while cooling only extends it
        return False

    def open(self, now: float) -> Counter[str]:
        """The circuits not closed (cooling, or half-open awaiting a successful trial), by upstream."""
        return Counter(c[0] for c, s in self.states.items() if s.open_until is not None)


@dataclass(frozen=True, slots=True)
class Plan(Generic[R]):
    """A request's candidates in the order to try them; `forced`: every one was cooling, so they are
    tried all the same."""

    order: list[R]
    forced: bool


@dataclass
class RoutingStats:
    """What the metrics read at scrape time (bounded labels: configured upstreams and models)."""

    attempts: Counter[tuple[str, str]] = field(default_factory=Counter)  # (upstream, result)
    fallbacks: Counter[tuple[str, str]] = field(default_factory=Counter)  # (model, upstream left)
    cooldowns: Counter[str] = field(default_factory=Counter)  # by upstream
    cooling: Counter[str] = field(default_factory=Counter)  # open circuits now, by upstream


class Router:
    """The process's routing state: the breaker, the RNG and the clock (tests replace them), and the
    counts the metrics read."""

    def __init__(
        self,
        *,
        max_attempts: int,
        failures_to_cool: int,
        cooldown_seconds: float,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_attempts = max_attempts
        self.breaker = Breaker(failures_to_cool, cooldown_seconds)
        self.rng = rng or random.Random()
        self.clock = clock
        self._attempts: Counter[tuple[str, str]] = Counter()
        self._fallbacks: Counter[tuple[str, str]] = Counter()
        self._cooldowns: Counter[str] = Counter()

    @classmethod
    def of(cls, s: RoutingSettings) -> Router:
        return cls(
            max_attempts=s.routing_max_attempts,
            failures_to_cool=s.routing_failures_to_cool,
            cooldown_seconds=s.routing_cooldown_seconds,
        )

    def plan(self, candidates: Sequence[R], order: str) -> Plan[R]:
        """The order to try `candidates` in: the healthy ones (cooling ones skipped), else all."""
        if len(candidates) == 1:  # the usual case: nothing to order, nothing to skip
            return Plan(list(candidates), forced=True)
        ranked_ = ranked(candidates, self.rng)
        if order == "cost":
            ranked_.sort(key=lambda c: c.cost)  # stable: ties keep the priority order
        now = self.clock()
        healthy = [c for c in ranked_ if self.breaker.available(c.circuit, now)]
        return Plan(healthy, forced=False) if healthy else Plan(ranked_, forced=True)

    def begin(self, candidate: Routable, forced: bool) -> bool:
        """Whether to call `candidate` now (it may have cooled since the plan, or another request took its
        trial); if so its attempt starts."""
        now = self.clock()
        if not forced and not self.breaker.available(candidate.circuit, now):
            return False
        self.breaker.begin(candidate.circuit, now)
        return True

    def done(self, candidate: Routable, result: str) -> None:
        circuit = candidate.circuit
        self._attempts[circuit[0], result] += 1
        if self.breaker.record(circuit, result, self.clock()):
            self._cooldowns[circuit[0]] += 1

    def fell_back(self, model: str, left: Routable) -> None:
        self._fallbacks[model, left.circuit[0]] += 1

    def stats(self) -> RoutingStats:
        return RoutingStats(
            Counter(self._attempts),
            Counter(self._fallbacks),
            Counter(self._cooldowns),
            self.breaker.open(self.clock()),
        )
