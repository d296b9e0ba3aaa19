"""Relaying an upstream SSE stream to the client, event by event as it arrives.

The client gets every event byte for byte as soon as it is whole, minus the usage chunk the sidecar
asked for on its behalf. What happens when either side fails decides the charge:

- the client goes away: the upstream is read on (up to ``drain_seconds``) for the usage it reports, and
  without one the exchange is charged the disconnect estimate;
- the upstream cuts the stream: the client's stream is cut too (no terminating chunk, so a partial answer
  cannot pass for a whole one) and nothing is charged;
- shutdown cuts it (``Exchange.cut``): settled like a client that left, without waiting.

The hold's lease is renewed for every request in flight by the app's lease-renewal task, not here. The
relay records its outcome and usage on the exchange; settling is the caller's.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

from .exchange import Exchange
from .usage import SSEReader

log = logging.getLogger("creditgate.relay")


@dataclass(frozen=True, slots=True)
class StreamPolicy:
    drain_seconds: float  # how long to read on for usage after the client left
    capture_bytes: int  # the most of a stream kept for the cache


async def relay_stream(
    request: web.Request,
    ex: Exchange,
    upstream: aiohttp.ClientResponse,
    headers: CIMultiDict[str],
    policy: StreamPolicy,
    *,
    capture: bool,
) -> tuple[web.StreamResponse, bytes | None]:
    """Relay the stream; returns the response and, with `capture`, the whole stream as the upstream sent
    it when it ran to its end with usage and fits `capture_bytes` (else None)."""
    response = web.StreamResponse(status=200, headers=headers)
    reader = SSEReader(strip_usage_chunk=ex.strip_usage_chunk, kind=ex.route.kind)
    captured: list[bytes] | None = [] if capture else None  # None once it no longer fits
    captured_size = 0
    complete: bytes | None = None
    client_gone = False
    try:
        await response.prepare(request)
    except ConnectionError:
        client_gone = True
    ex.outcome = "no_usage"
    drain_until: float | None = None
    rec = ex.record
    perf = time.perf_counter
    shutdown_cut = False
    try:
        async with ex.cut_timeout() as ex.cutter:
            while True:
                waiting = perf()
                if drain_until is None:
                    chunk = await upstream.content.readany()
                else:
                    async with asyncio.timeout_at(drain_until):
                        chunk = await upstream.content.readany()
                now = perf()
                rec.waited += now - waiting
                if rec.upstream_first_byte is None:
                    rec.upstream_first_byte = now
                if not chunk:
                    break
                if captured is not None:
                    captured_size += len(chunk)
                    if captured_size > policy.capture_bytes:
                        captured = None  # too large to cache: stop keeping it
                    else:
                        captured.append(chunk)
                events = reader.feed(chunk)
                if events and not client_gone:
                    try:
                        await response.write(b"".join(events))
                        ex.relayed_events = reader.data_events
                    except ConnectionError:
                        client_gone = True
                    rec.waited += perf() - now  # a slow client's time is not ours either
                if client_gone:
                    # Drain to the end ([DONE], the final Responses event, EOF or the deadline), keeping
                    # the last usage seen: some upstreams (vLLM's continuous_usage_stats) send a
                    # cumulative usage on every chunk, so the first one seen is not the final one.
                    if reader.done:
                        break
                    if drain_until is None:
                        drain_until = asyncio.get_running_loop().time() + policy.drain_seconds
            rec.upstream_ended = perf()
            if not client_gone:
                rest = reader.flush()
                if rest:
                    await response.write(rest)
                await response.write_eof()
                if captured is not None and reader.usage is not None:
                    complete = b"".join(captured)
    except (aiohttp.ClientError, TimeoutError, ConnectionError):
        ex.outcome = "stream_cut"
        complete = None
        shutdown_cut = ex.cut
        if not client_gone and request.transport is not None:
            # Cut the client's stream too (no terminating chunk), so it cannot mistake a partial
            # answer for a whole one.
            request.transport.close()
    finally:
        ex.cutter = None
        if rec.upstream_ended is None:
            rec.upstream_ended = perf()
    ex.usage = reader.usage
    if ex.usage is not None:
        ex.outcome = "shutdown_cut" if shutdown_cut else "client_gone" if client_gone else "ok"
    elif client_gone or shutdown_cut:
        # A client that left, or a stream cut by shutdown: charged the estimate (see estimated_usage).
        ex.outcome = "shutdown_cut_estimated" if shutdown_cut else "client_gone_estimated"
        ex.usage = ex.estimated_usage()
    return response, complete
