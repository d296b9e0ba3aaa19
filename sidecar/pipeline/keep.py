"""What an answer leaves behind for later requests: the response-cache entry, and the answer an
Idempotency-Key's retry is replayed; each only for a whole answer. Builds values; stores nothing (the
settle stage does, in its script)."""

from __future__ import annotations

import time

from ..cache import CachedResponse, ResponseCache
from ..headers import HeaderNames, response_headers
from ..idempotency import IdempotentAnswer, Replays
from ..pricing import Usage
from .admit import Admission
from .forward import Forwarded
from .outcome import Outcome, Phase, Verdict
from .settle import Stored

# The outcomes whose answer a retry is replayed: a whole 200 answer, charged (or free) as it was.
REPLAYED = frozenset({Outcome.OK, Outcome.NO_USAGE, Outcome.NO_USAGE_ESTIMATED, Outcome.CLIENT_GONE})


def whole_answer(adm: Admission, fwd: Forwarded) -> bytes | None:
    """A 200 body read whole, or a stream that ran to its end (its terminating event included) as the
    upstream sent it; None for anything else (a stream that ended early is never kept)."""
    ending = fwd.ending
    if ending.phase is Phase.STREAMED:
        body = fwd.captured
        if body is None or (adm.route.kind != "responses" and not body.rstrip().endswith(b"data: [DONE]")):
            return None
        return body
    if ending.phase is Phase.ANSWERED and ending.status == 200:
        return fwd.body
    return None


def for_cache(cache: ResponseCache | None, adm: Admission, fwd: Forwarded, verdict: Verdict) -> Stored | None:
    """A complete 200 answer with usage, kept for the cache when this request may store one."""
    if adm.cache is None or cache is None or not adm.cache.store or verdict.outcome is not Outcome.OK:
        return None
    body = whole_answer(adm, fwd)
    if body is None or fwd.ending.usage is None:
        return None
    assert fwd.headers is not None
    kept = cache.entry(
        body,
        stream=fwd.ending.phase is Phase.STREAMED,
        headers=fwd.headers,
        usage=fwd.ending.usage,
        now_ms=int(time.time() * 1000),
    )
    return Stored(*kept) if kept is not None else None


def for_replay(
    replays: Replays, adm: Admission, fwd: Forwarded, verdict: Verdict, relayed: HeaderNames, max_bytes: int
) -> IdempotentAnswer | None:
    """The answer of a request with an Idempotency-Key, with the provider headers its client got, when it
    is whole and at most `max_bytes` (cache_max_entry_bytes, which also bounds a stream's capture)."""
    if adm.idempotency is None or verdict.outcome not in REPLAYED:
        return None
    body = whole_answer(adm, fwd)
    if body is None or len(body) > max_bytes or fwd.headers is None:
        return None
    headers = response_headers(fwd.headers, byok=adm.byok, extra=relayed)
    usage, now = verdict.usage or Usage(), int(time.time() * 1000)
    entry = CachedResponse(
        body,
        fwd.ending.phase is Phase.STREAMED,
        [(str(name), value) for name, value in headers.items()],
        now,
        now + replays.ttl_ms,
        usage.prompt_tokens,
        usage.cached_tokens,
        usage.completion_tokens,
    )
    return replays.answer(adm.idempotency, adm.request_id, entry)
