"""What the client is answered: a cache hit, an Idempotency-Key's replay, an upstream's body once
settled, or the error an ending calls for. Builds responses from values; settles nothing."""

from __future__ import annotations

import contextlib
import logging
import time

from aiohttp import web
from multidict import CIMultiDict

from ..balances import Settlement
from ..cache import CachedResponse
from ..cachekey import hit_headers, miss_headers
from ..errors import CreditgateError, ServiceUnavailable, UpstreamUnavailable
from ..headers import HeaderNames, response_headers, scrub_secrets
from ..idempotency import ORIGINAL_HEADER, REPLAY_HEADER, IdempotentAnswer
from ..usage import SSEReader
from .admit import Admission
from .choices import key_headers
from .forward import Forwarded
from .outcome import Phase

log = logging.getLogger("creditgate.respond")
SHUTTING_DOWN = "creditgate is shutting down and could not finish this request in time; retry it."


def failure(adm: Admission, fwd: Forwarded, charge: int = 0) -> CreditgateError | None:
    """The error an ending that has no answer to relay calls for (None when there is an answer); `charge`
    is what the request is charged, for the one error that costs something (a too-large answer)."""
    ending, name = fwd.ending, fwd.upstream.name
    tried = f" (the last of {fwd.attempts} upstreams tried)" if fwd.attempts > 1 else ""
    if ending.phase is Phase.TOO_LARGE:
        return UpstreamUnavailable(
            f"The upstream {name!r} answered (HTTP {ending.status}) with a body larger than "
            f"upstream_max_body_bytes, which is not relayed; charged {charge} micro-credits.",
            code="upstream_body_too_large",
        )
    if ending.phase is Phase.NOT_SENT:
        return ServiceUnavailable("creditgate is shutting down; retry this request.", code="shutting_down")
    if ending.phase in (Phase.UNREACHABLE, Phase.BODY_FAILED) and ending.cut:
        return ServiceUnavailable(SHUTTING_DOWN, code="shutting_down")
    if ending.phase is Phase.UNREACHABLE:
        return UpstreamUnavailable(f"The upstream {name!r} could not be reached ({fwd.failure}){tried}.")
    if ending.phase is Phase.BODY_FAILED:
        return UpstreamUnavailable(f"The upstream {name!r} failed mid-response.")
    if ending.phase is Phase.ANSWERED and ending.status is not None and 300 <= ending.status < 400:
        return UpstreamUnavailable(
            f"The upstream {name!r} answered with a redirect (HTTP {ending.status}), which is not followed.",
            code="upstream_redirect",
        )
    return None


def body_answer(
    adm: Admission,
    fwd: Forwarded,
    relayed: HeaderNames,
    charge: int,
    settlement: Settlement | None,
    *,
    stored: bool,
) -> web.Response:
    """An upstream's whole answer, relayed with our headers (after settlement: they carry the charge)."""
    status = fwd.ending.status or 502
    if status in (401, 403) and not adm.byok:
        # The provider refused the pooled key. Its answer may quote part of that key ("Incorrect API key
        # provided: sk-ab***yz"): it is replaced, never relayed. A BYOK caller gets the provider's own
        # answer, which is about the caller's own key.
        log.error(
            "the upstream %r rejected the pooled provider key (HTTP %d); check its api_key",
            fwd.upstream.name,
            status,
        )
        raise UpstreamUnavailable(
            f"The provider rejected the gateway's credentials (upstream {fwd.upstream.name!r}, "
            f"HTTP {status}).",
            code="upstream_auth_failed",
        )
    assert fwd.headers is not None
    headers = response_headers(fwd.headers, byok=adm.byok, extra=relayed)
    headers["x-request-id"] = adm.request_id
    body = fwd.body
    if status != 200 and not adm.byok:  # may quote the pooled key, its org or project
        body = scrub_secrets(body, fwd.upstream.secrets)
    elif status != 200 and adm.key_source == "vault" and adm.byok_key:
        # The caller's own key, but one it never sent: a stored key is never shown again, not even in
        # the provider's "Incorrect API key provided: ..." (the status and the rest are the provider's).
        body = scrub_secrets(body, (adm.byok_key,))
    if adm.cache is not None:
        headers.update(miss_headers(adm.cache.forward, stored=stored))
    headers["x-creditgate-charged"] = str(charge)
    if settlement is not None:
        headers["x-creditgate-balance"] = str(settlement.balance)
    headers.update(key_headers(adm.key_source, adm.marked_up))
    return web.Response(status=status, body=body, headers=headers)


async def hit_answer(
    request: web.Request, adm: Admission, entry: CachedResponse, settlement: Settlement, *, collapsed: bool
) -> web.StreamResponse:
    """An answer from cache, free: a body, or the stored stream replayed in its framing (minus the usage
    chunk unless this client asked for it)."""
    now = int(time.time() * 1000)
    headers = CIMultiDict(entry.headers)
    headers.update(hit_headers(entry.stored_ms, entry.expires_ms, now, collapsed=collapsed))
    headers["x-request-id"] = adm.request_id
    headers["x-creditgate-charged"] = "0"
    headers["x-creditgate-balance"] = str(settlement.balance)
    return await _stored(request, adm, entry, headers)


async def replay_answer(
    request: web.Request, adm: Admission, replay: IdempotentAnswer, balance: int | None
) -> web.StreamResponse:
    """An Idempotency-Key's retry: the first request's answer as its client got it, free, marked as a
    replay (with the first request's id)."""
    headers = CIMultiDict(replay.answer.headers)
    headers["x-request-id"] = adm.request_id
    headers[REPLAY_HEADER] = "true"
    headers[ORIGINAL_HEADER] = replay.request_id
    headers["x-creditgate-charged"] = "0"
    if balance is not None:
        headers["x-creditgate-balance"] = str(balance)
    return await _stored(request, adm, replay.answer, headers)


async def _stored(
    request: web.Request, adm: Admission, entry: CachedResponse, headers: CIMultiDict[str]
) -> web.StreamResponse:
    if not entry.stream:
        return web.Response(status=200, body=entry.body, headers=headers)
    reader = SSEReader(strip_usage_chunk=adm.strip_usage_chunk, kind=adm.route.kind)
    events = b"".join(reader.feed(entry.body)) + reader.flush()
    response = web.StreamResponse(status=200, headers=headers)
    with contextlib.suppress(ConnectionError):
        await response.prepare(request)
        await response.write(events)
        await response.write_eof()
    return response
