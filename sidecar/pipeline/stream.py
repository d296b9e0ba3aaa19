"""Relaying an upstream SSE stream to the client, event by event as it arrives.

The client gets every event byte for byte as soon as it is whole, minus the usage chunk asked for on its
behalf. What happens when either side fails is reported in the `Ending`; what it costs is outcome.py's:

- the client goes away: the upstream is read on (up to ``drain_seconds``, to its end) for the usage it
  reports;
- the upstream cuts the stream: the client's stream is cut too (no terminating chunk, so a partial answer
  cannot pass for a whole one);
- shutdown cuts it (``Live.cut``): reported as cut, without waiting.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

from ..usage import SSEReader
from .live import Live, Timings
from .outcome import Ending, Phase


@dataclass(frozen=True, slots=True)
class StreamPolicy:
    drain_seconds: float  # how long to read on for usage after the client left
    capture_bytes: int  # the most of a stream kept for the cache (and an Idempotency-Key's retry)


async def relay_stream(
    request: web.Request,
    upstream: aiohttp.ClientResponse,
    headers: CIMultiDict[str],
    policy: StreamPolicy,
    live: Live,
    timings: Timings,
    *,
    kind: str,
    strip_usage_chunk: bool,
    capture: bool,
) -> tuple[web.StreamResponse, Ending, bytes | None]:
    """Relay the stream; returns the response, how it ended and, with `capture`, the whole stream as the
    upstream sent it when it ran to its end with usage and fits `capture_bytes` (else None)."""
    response = web.StreamResponse(status=200, headers=headers)
    reader = SSEReader(strip_usage_chunk=strip_usage_chunk, kind=kind)
    captured: list[bytes] | None = [] if capture else None  # None once it no longer fits
    captured_size = 0
    complete: bytes | None = None
    client_gone = False
    relayed = 0
    try:
        await response.prepare(request)
    except ConnectionError:
        client_gone = True
    drain_until: float | None = None
    perf = time.perf_counter
    cut = ran_to_end = False
    try:
        async with live.cut_timeout() as live.cutter:
            while True:
                waiting = perf()
                if drain_until is None:
                    chunk = await upstream.content.readany()
                else:
                    async with asyncio.timeout_at(drain_until):
                        chunk = await upstream.content.readany()
                now = perf()
                timings.waited += now - waiting
                if timings.upstream_first_byte is None:
                    timings.upstream_first_byte = now
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
                        await response.write(events[0] if len(events) == 1 else b"".join(events))
                        relayed = reader.data_events
                    except ConnectionError:
                        client_gone = True
                    timings.waited += perf() - now  # a slow client's time is not ours either
                if client_gone:
                    # Drain to the end ([DONE], the final Responses event, EOF or the deadline), keeping
                    # the last usage seen: some upstreams (vLLM's continuous_usage_stats) send a
                    # cumulative usage on every chunk, so the first one seen is not the final one.
                    if reader.done:
                        break
                    if drain_until is None:
                        drain_until = asyncio.get_running_loop().time() + policy.drain_seconds
            timings.upstream_ended = perf()
            ran_to_end = True
            if not client_gone:
                rest = reader.flush()
                if rest:
                    await response.write(rest)
                await response.write_eof()
            # whole: relayed to its end, or drained to its end once the client left (for a retry)
            if captured is not None and reader.usage is not None and (not client_gone or reader.done):
                complete = b"".join(captured)
    except (aiohttp.ClientError, TimeoutError, ConnectionError):
        ran_to_end = False
        complete = None
        cut = live.cut
        if not client_gone and request.transport is not None:
            # Cut the client's stream too (no terminating chunk), so it cannot mistake a partial
            # answer for a whole one.
            request.transport.close()
    finally:
        live.cutter = None
        if timings.upstream_ended is None:
            timings.upstream_ended = perf()
    ending = Ending(
        Phase.STREAMED,
        status=200,
        usage=reader.usage,
        cut=cut,
        client_gone=client_gone,
        ran_to_end=ran_to_end,
        relayed_events=relayed,
    )
    return response, ending, complete
