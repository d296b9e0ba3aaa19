"""Stage 3, forwarding: the upstream call, and the relay of its answer.

A stream is relayed as it arrives (stream.py); a body is read whole and returned, for the handler to
answer once it is settled (its headers carry the charge), up to `max_body_bytes` (upstream_max_body_bytes):
a larger one is not read on. The stage never raises for what the upstream
did: it returns a `Forwarded` whose `Ending` says how far it got, and outcome.py decides what that costs.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import aiohttp
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from ..cachekey import miss_headers
from ..headers import HeaderNames, request_headers, response_headers
from ..upstream import Upstream
from ..usage import usage_from_body
from .admit import Admission
from .live import Live, Timings
from .outcome import Ending, Phase
from .stream import StreamPolicy, relay_stream

log = logging.getLogger("creditgate.forward")


@dataclass(frozen=True, slots=True)
class ForwardPolicy:
    drop_headers: tuple[str, ...]  # client headers that are ours (BYOK key, account, fit-output)
    forwarded: HeaderNames  # the operator's extra forwarded headers
    relayed: HeaderNames  # the operator's extra relayed headers
    stream: StreamPolicy
    max_body_bytes: int = 64 * 1024 * 1024  # the most of a non-streamed answer read


@dataclass(slots=True)
class Forwarded:
    """What came back. `body` and `headers` for an answer read whole; `response` for a relayed stream."""

    ending: Ending
    upstream: Upstream
    timings: Timings
    body: bytes = b""
    headers: CIMultiDictProxy[str] | None = None
    response: web.StreamResponse | None = None
    captured: bytes | None = None  # a whole stream with usage, as the upstream sent it, for the cache
    failure: str = field(default="")  # what went wrong, for the client's error message


class Forwarder:
    def __init__(
        self, session: aiohttp.ClientSession, upstreams: Mapping[str, Upstream], policy: ForwardPolicy
    ) -> None:
        self.session = session
        self.upstreams = upstreams
        self.policy = policy
        self._urls: dict[tuple[str, str], URL] = {}
        self._too_large_warned: dict[str, float] = {}  # upstream -> last warning

    def _url(self, upstream: Upstream, path: str) -> URL:
        """The upstream URL of a route, parsed once (aiohttp would parse a string on every call)."""
        url = self._urls.get((upstream.name, path))
        if url is None:
            url = self._urls[(upstream.name, path)] = URL(f"{upstream.base_url}/{path}")
        return url

    async def forward(self, request: web.Request, adm: Admission, live: Live) -> Forwarded:
        up = self.upstreams[adm.price.upstream]
        timings = Timings()
        if live.cut:  # started after shutdown cut everything: the upstream is not called
            return Forwarded(Ending(Phase.NOT_SENT), up, timings)
        headers = request_headers(
            request.headers,
            self.policy.drop_headers,
            adm.byok_key or up.api_key,
            byok=adm.byok,
            organization=up.organization,
            project=up.project,
            extra=self.policy.forwarded,
        )
        timings.upstream_started = time.perf_counter()
        try:
            async with live.cut_timeout() as live.cutter:
                answer = await self.session.post(
                    self._url(up, adm.route.path), data=adm.body, headers=headers, allow_redirects=False
                )
        except (aiohttp.ClientError, TimeoutError) as exc:
            timings.upstream_ended = time.perf_counter()
            failed = Ending(Phase.UNREACHABLE, cut=live.cut)
            return Forwarded(failed, up, timings, failure=type(exc).__name__)
        finally:
            live.cutter = None
            timings.waited += time.perf_counter() - timings.upstream_started
        async with answer:
            if 300 <= answer.status < 400:  # never followed: it would carry the body and key elsewhere
                timings.upstream_ended = time.perf_counter()
                log.warning("upstream %r answered a redirect (HTTP %d)", up.name, answer.status)
                return Forwarded(Ending(Phase.ANSWERED, status=answer.status), up, timings)
            if answer.status == 200 and answer.content_type == "text/event-stream":
                return await self._relay_stream(request, adm, answer, up, live, timings)
            timings.upstream_first_byte = time.perf_counter()  # the status line and headers are in
            return await self._read_body(adm, answer, up, live, timings)

    async def _read_body(
        self, adm: Admission, answer: aiohttp.ClientResponse, up: Upstream, live: Live, timings: Timings
    ) -> Forwarded:
        started = time.perf_counter()
        try:
            async with live.cut_timeout() as live.cutter:
                body, size = await self._read_capped(answer)
        except (aiohttp.ClientError, TimeoutError):
            return Forwarded(Ending(Phase.BODY_FAILED, status=answer.status, cut=live.cut), up, timings)
        finally:
            live.cutter = None
            timings.upstream_ended = time.perf_counter()
            timings.waited += timings.upstream_ended - started
        if body is None:
            answer.close()  # the rest is never read: the connection is dropped, not pooled
            self._warn_too_large(up, answer.status, adm.request_id)
            return Forwarded(Ending(Phase.TOO_LARGE, status=answer.status, answer_bytes=size), up, timings)
        usage = usage_from_body(body) if answer.status == 200 else None
        ending = Ending(Phase.ANSWERED, status=answer.status, usage=usage, answer_bytes=len(body))
        return Forwarded(ending, up, timings, body=body, headers=answer.headers)

    async def _read_capped(self, answer: aiohttp.ClientResponse) -> tuple[bytes | None, int]:
        """(the whole body, its size), or (None, the bytes read) once it is over max_body_bytes: the rest
        is not read. A declared length over it is refused before a byte is read (None, that length)."""
        cap = self.policy.max_body_bytes
        if answer.content_length is not None and answer.content_length > cap:
            return None, answer.content_length
        chunks: list[bytes] = []
        size = 0
        async for chunk in answer.content.iter_any():
            size += len(chunk)
            if size > cap:
                return None, size
            chunks.append(chunk)
        return b"".join(chunks), size

    def _warn_too_large(self, up: Upstream, status: int, request_id: str) -> None:
        now = time.monotonic()
        if self._too_large_warned.get(up.name, -60.0) + 60 <= now:  # once a minute per upstream
            self._too_large_warned[up.name] = now
            log.warning(
                "the upstream %r answered HTTP %d with more than upstream_max_body_bytes (%d) (request %s)",
                up.name,
                status,
                self.policy.max_body_bytes,
                request_id,
            )

    async def _relay_stream(
        self,
        request: web.Request,
        adm: Admission,
        answer: aiohttp.ClientResponse,
        up: Upstream,
        live: Live,
        timings: Timings,
    ) -> Forwarded:
        headers: CIMultiDict[str] = response_headers(answer.headers, byok=adm.byok, extra=self.policy.relayed)
        headers["x-request-id"] = adm.request_id
        headers["x-creditgate-held"] = str(adm.hold)
        headers["x-creditgate-key-source"] = adm.key_source  # as respond.key_headers
        headers["x-creditgate-markup"] = "true" if adm.marked_up else "false"
        if adm.cache is not None:
            headers.update(miss_headers(adm.cache.forward, stored=False))
        response, ending, captured = await relay_stream(
            request,
            answer,
            headers,
            self.policy.stream,
            live,
            timings,
            kind=adm.route.kind,
            strip_usage_chunk=adm.strip_usage_chunk,
            capture=(adm.cache is not None and adm.cache.store) or adm.idempotency is not None,
        )
        return Forwarded(ending, up, timings, headers=answer.headers, response=response, captured=captured)
