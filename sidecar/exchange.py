"""One metered request, from its hold to its settlement: what the proxy learns of it as it goes, the
ledger entry it becomes, and what it is charged when it does not run to its end. No I/O."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from aiohttp import web

from .cache import CachedResponse, CachePlan
from .observe import RequestRecord
from .outbox import UsageEvent
from .pricing import Multiplier, Price, Usage
from .upstream import Upstream
from .wire import MeteredRequest, Route

# A client that leaves mid-stream without usage is charged the prompt at this many bytes per token
# (the usual English average) plus one completion token per streamed chunk it was sent.
DISCONNECT_ESTIMATE_BYTES_PER_TOKEN = 4


@dataclass(slots=True)
class Exchange:
    """One metered request, from its hold to its settlement."""

    request_id: str
    account: str
    route: Route
    request: MeteredRequest
    price: Price
    multiplier: Multiplier
    body: bytes  # what is forwarded
    body_size: int  # the client's body size, for estimates
    hold: int
    # The worst case the hold was figured from: prompt tokens (body bytes and unseen inputs), and how many
    # completions each unit of output limit generates (prompts × max(n, best_of); 0 without output).
    prompt_tokens: int
    outputs: int
    upstream: Upstream
    credential: str | None
    byok: bool
    strip_usage_chunk: bool
    started_ms: int
    cache: CachePlan | None  # None: the cache is off
    record: RequestRecord
    usage: Usage | None = None
    charge: int = 0
    outcome: str = "pending"
    relayed_events: int = 0
    cache_result: str = "off"  # hit, collapsed, miss, bypass or off
    flight: asyncio.Future[CachedResponse | None] | None = None  # the single flight this request leads
    stored: tuple[CachedResponse, bytes] | None = None  # the answer to store in the cache, encoded
    # Shutdown: `cut` asks the exchange to stop waiting on the upstream; `cutter` is the timeout of the
    # phase waiting now, rescheduled to now by Proxy.cut_all().
    cut: bool = False
    cutter: asyncio.Timeout | None = None
    answered: asyncio.Future[web.StreamResponse] | None = None  # the answer, for the handler to return
    fit_output: bool = False  # lower the output limit to what the balance affords instead of a 402

    def estimated_usage(self, answer_bytes: int | None = None) -> Usage:
        """What a request is charged without usage: the prompt at DISCONNECT_ESTIMATE_BYTES_PER_TOKEN
        bytes per token plus one token per chunk relayed, or, for a whole answer body of `answer_bytes`,
        that many bytes at the same rate."""
        completion = self.relayed_events
        if answer_bytes is not None:
            completion = -(-answer_bytes // DISCONNECT_ESTIMATE_BYTES_PER_TOKEN)
        return Usage(
            prompt_tokens=-(-self.body_size // DISCONNECT_ESTIMATE_BYTES_PER_TOKEN),
            completion_tokens=completion,
        )

    def cut_timeout(self) -> asyncio.Timeout:
        """A timeout for one phase of waiting that Proxy.cut_all() can end at once."""
        return asyncio.timeout(0 if self.cut else None)

    def event(self, outcome: str, *, hold: int, saved: int | None = None) -> UsageEvent:
        """The outbox entry (the future ledger row) of this request."""
        usage = self.usage or Usage()
        return UsageEvent(
            route=self.route.kind,
            model=self.price.model,
            provider=self.upstream.name,
            key_source="byok" if self.byok else "pooled",
            multiplier=f"{self.multiplier.numerator}/{self.multiplier.denominator}",
            prompt_tokens=usage.prompt_tokens,
            cached_tokens=usage.cached_tokens,
            completion_tokens=usage.completion_tokens,
            hold=hold,
            saved=saved,
            outcome=outcome,
            started_ms=self.started_ms,
            settled_ms=int(time.time() * 1000),
        )
