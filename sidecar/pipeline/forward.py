"""Stage 3, forwarding: the upstream calls, and the relay of the answer.

The request's candidates are tried in the order the router gives (routing.py): one that fails before
anything reached the client (a connect error, a timeout before the headers, a 429, a 5xx) is followed by
the next, within `routing_max_attempts`, unless the shutdown cut it. A stream is relayed as it arrives
(stream.py), and once relayed it never switches upstream; a body is read whole and returned, for the
handler to answer once it is settled (its headers carry the charge), up to `max_body_bytes`
(upstream_max_body_bytes): a larger one is not read on. The stage never raises for what the upstream
did: it returns a `Forwarded` whose `Ending` says how far the last attempt got, and outcome.py decides
what that costs (failed attempts cost nothing).
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

from .. import routing
from ..cachekey import miss_headers
from ..headers import HeaderNames, request_headers, response_headers
from ..pricing import Price
from ..routing import Router
from ..upstream import Upstream
from ..usage import usage_from_body
from .admit import Admission
from .choices import Choice, key_headers
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
    choice: Choice | None = None  # the candidate of this attempt (the last one made)
    result: str = routing.OK  # this attempt's result, as routing.py names it
    attempts: int = 0  # upstream calls made for the request, this one included

    @property
    def rates(self) -> Price | None:
        """The cost rates of the upstream of this attempt (None: unknown)."""
        return self.choice.candidate.rates if self.choice is not None else None


class Forwarder:
    def __init__(
        self,
        session: aiohttp.ClientSession,
        upstreams: Mapping[str, Upstream],
        policy: ForwardPolicy,
        router: Router,
    ) -> None:
        self.session = session
        self.upstreams = upstreams
        self.policy = policy
        self.router = router
        self._urls: dict[tuple[str, str], URL] = {}
        self._too_large_warned: dict[str, float] = {}  # upstream -> last warning

    def _url(self, upstream: Upstream, path: str) -> URL:
        """The upstream URL of a route, parsed once (aiohttp would parse a string on every call)."""
        url = self._urls.get((upstream.name, path))
        if url is None:
            url = self._urls[(upstream.name, path)] = URL(f"{upstream.base_url}/{path}")
        return url

    async def forward(self, request: web.Request, adm: Admission, live: Live, order: str) -> Forwarded:
        """Try the request's candidates (`order`: "priority" or "cost") until one answers with anything
        but a fallback failure, the attempts run out, or the shutdown cuts it."""
        router, timings = self.router, Timings()
        plan = router.plan(adm.choices, order)
        if live.cut:  # started after shutdown cut everything: the upstream is not called
            first = plan.order[0]
            return Forwarded(Ending(Phase.NOT_SENT), self.upstreams[first.upstream], timings, choice=first)
        fwd: Forwarded | None = None
        for choice in plan.order:
            if fwd is not None and fwd.attempts >= router.max_attempts:
                break
            if not router.begin(choice, plan.forced):  # cooled, or its trial taken, since the plan
                continue
            if fwd is not None:
                router.fell_back(adm.price.model, fwd.choice or choice)
            attempts = fwd.attempts + 1 if fwd is not None else 1
            fwd = await self._attempt(request, adm, choice, live, timings)
            fwd.attempts = attempts
            router.done(choice, fwd.result)
            if fwd.result not in routing.FALLBACK or live.cut:
                break
        if fwd is None:  # every healthy one cooled meanwhile: the first is tried all the same
            choice = plan.order[0]
            router.begin(choice, True)
            fwd = await self._attempt(request, adm, choice, live, timings)
            fwd.attempts = 1
            router.done(choice, fwd.result)
        return fwd

    async def _attempt(
        self, request: web.Request, adm: Admission, choice: Choice, live: Live, timings: Timings
    ) -> Forwarded:
        """One upstream call with the candidate's key and model name."""
        up = self.upstreams[choice.upstream]
        own = choice.api_key is not None
        headers = request_headers(
            request.headers,
            self.policy.drop_headers,
            choice.api_key or up.api_key,
            byok=own,
            organization=up.organization,
            project=up.project,
            extra=self.policy.forwarded,
        )
        body = adm.body
        sent = choice.candidate.model
        if sent is not None and sent != adm.request.model:
            body = routing.with_model(body, sent)
        now = time.perf_counter()
        if timings.upstream_started is None:
            timings.upstream_started = now
        timings.upstream_first_byte = None  # the serving attempt's
        try:
            async with live.cut_timeout() as live.cutter:
                answer = await self.session.post(
                    self._url(up, adm.route.path), data=body, headers=headers, allow_redirects=False
                )
        except (aiohttp.ClientError, TimeoutError) as exc:
            timings.upstream_ended = time.perf_counter()
            failed = Ending(Phase.UNREACHABLE, cut=live.cut)
            result = routing.TIMEOUT if isinstance(exc, TimeoutError) else routing.UNREACHABLE
            result = routing.CUT if live.cut else result
            return Forwarded(failed, up, timings, failure=type(exc).__name__, choice=choice, result=result)
        finally:
            live.cutter = None
            timings.waited += time.perf_counter() - now
        async with answer:
            if 300 <= answer.status < 400:  # never followed: it would carry the body and key elsewhere
                timings.upstream_ended = time.perf_counter()
                log.warning("upstream %r answered a redirect (HTTP %d)", up.name, answer.status)
                ending = Ending(Phase.ANSWERED, status=answer.status)
                return Forwarded(ending, up, timings, choice=choice, result=routing.REDIRECT)
            if answer.status == 200 and answer.content_type == "text/event-stream":
                fwd = await self._relay_stream(request, adm, choice, own, answer, up, live, timings)
            else:
                timings.upstream_first_byte = time.perf_counter()  # the status line and headers are in
                fwd = await self._read_body(adm, answer, up, live, timings)
        fwd.choice = choice
        if fwd.ending.phase is Phase.BODY_FAILED:
            fwd.result = routing.CUT if fwd.ending.cut else routing.BODY_FAILED
        elif fwd.ending.status is not None:
            fwd.result = routing.status_result(fwd.ending.status)
        return fwd

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
        choice: Choice,
        own: bool,
        answer: aiohttp.ClientResponse,
        up: Upstream,
        live: Live,
        timings: Timings,
    ) -> Forwarded:
        headers: CIMultiDict[str] = response_headers(answer.headers, byok=own, extra=self.policy.relayed)
        headers["x-request-id"] = adm.request_id
        headers["x-creditgate-held"] = str(adm.hold)
        served = adm.served_by(choice)  # the candidate's key, not the primary's
        headers.update(key_headers(served.key_source, served.marked_up))
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
