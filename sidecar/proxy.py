"""The metered request handler: authenticate → estimate → reserve → forward → relay → settle.

It orchestrates; pricing, usage and header rules live in their own pure modules. Once a hold is taken the
rest of the exchange runs in its own task, shielded from the handler's cancellation, so a client that
goes away can never leave a request unsettled.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import secrets
import time

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from redis.exceptions import RedisError
from yarl import URL

from .accounts import AccountStore
from .afford import affordable_output_tokens, with_output_limit
from .cache import BYPASS, CachedResponse, ResponseCache
from .cachekey import hit_headers, miss_headers
from .config import ACCOUNT_SECRET_HEADER, Settings
from .errors import (
    REQUEST_ID,
    BadRequest,
    Conflict,
    InsufficientCredits,
    NotFound,
    ServiceUnavailable,
    Unauthorized,
    UpstreamUnavailable,
)
from .exchange import Exchange
from .ledger import RedisLedger, Reservation, ReserveStatus, UnknownAccount
from .observe import RECORD, RequestRecord
from .pricing import (
    MAX_CHARGE,
    PriceTable,
    Usage,
    cost,
    estimate_prompt_tokens,
    unseen_prompt_tokens,
    worst_case,
)
from .relay import StreamPolicy, relay_stream
from .settlements import PendingSettlement, PendingSettlements
from .upstream import (
    HeaderNames,
    Upstream,
    forwarded_extra,
    request_headers,
    response_headers,
    scrub_secrets,
)
from .usage import SSEReader, usage_from_body
from .wire import ROUTES, Route, decode_request, prompt_count, unseen_inputs, with_usage_requested

log = logging.getLogger("creditgate.proxy")

# Pauses before retrying a failed settle (seconds): ~6 s of Redis trouble is ridden out.
SETTLE_RETRY_PAUSES = (0.05, 0.2, 0.5, 1.0, 2.0, 2.0)
# Backoff between tries of a reserve whose answer was lost (seconds), until reserve_retry_seconds.
RESERVE_FIRST_PAUSE = 0.05
RESERVE_MAX_PAUSE = 0.5


class Proxy:
    def __init__(
        self,
        settings: Settings,
        prices: PriceTable,
        ledger: RedisLedger,
        accounts: AccountStore,
        upstreams: dict[str, Upstream],
        session: aiohttp.ClientSession,
        cache: ResponseCache | None = None,
    ) -> None:
        self.settings = settings
        self.cache = cache
        self.prices = prices
        self.ledger = ledger
        self.accounts = accounts
        self.upstreams = upstreams
        self.session = session
        self.in_flight: set[asyncio.Task[None]] = set()
        self.exchanges: dict[str, Exchange] = {}  # the live ones, by request id
        self.cutting = False  # shutting down past the grace period: every exchange is cut
        self._urls: dict[tuple[str, str], URL] = {}
        self._usage_warned: dict[tuple[str, str], float] = {}  # (upstream, model) -> last warning
        self.pending = PendingSettlements(ledger)  # settlements Redis has not taken yet
        self.stream_policy = StreamPolicy(
            drain_seconds=settings.disconnect_drain_seconds,
            capture_bytes=settings.cache_max_entry_bytes,
        )
        self._drop_headers = [
            settings.byok_header,
            settings.afford_output_header,
            *([settings.account_header] if settings.account_header else []),
        ]
        self._forwarded = forwarded_extra(settings)
        self._relayed = HeaderNames.of(settings.relay_response_headers)

    def _url(self, upstream: Upstream, route: Route) -> URL:
        """The upstream URL of a route, parsed once (aiohttp would parse a string on every call)."""
        url = self._urls.get((upstream.name, route.path))
        if url is None:
            url = self._urls[(upstream.name, route.path)] = URL(f"{upstream.base_url}/{route.path}")
        return url

    # ---- authentication -------------------------------------------------------------------------

    async def authenticate(self, request: web.Request) -> str:
        header = self.settings.account_header
        if header:
            account = request.headers.get(header)
            if account:
                self._check_account_secret(request, header)
            if account and await self.accounts.exists(account):
                return account
            if account:
                raise Unauthorized(f"Unknown account in the {header} header.")
        auth = request.headers.get("Authorization", "")
        scheme, _, api_key = auth.partition(" ")
        if scheme.lower() != "bearer" or not api_key.strip():
            raise Unauthorized("Missing API key: send `Authorization: Bearer <key>`.")
        found = await self.accounts.account_for_key(api_key.strip(), time.monotonic())
        if found is None:
            raise Unauthorized("Incorrect or revoked API key.")
        return found

    def _check_account_secret(self, request: web.Request, header: str) -> None:
        """With account_header_secret set, naming an account in the header takes the secret too (checked
        before the account is looked up, so that no one without it learns which accounts exist)."""
        secret = self.settings.account_header_secret
        if not secret:
            return
        presented = request.headers.get(ACCOUNT_SECRET_HEADER, "")
        # Header values arrive decoded with surrogateescape: encode them back the same way.
        if not hmac.compare_digest(presented.encode("utf-8", "surrogateescape"), secret.encode()):
            raise Unauthorized(
                f"Missing or wrong {ACCOUNT_SECRET_HEADER} header: a request naming its account in the "
                f"{header} header must carry the account secret.",
                code="invalid_account_secret",
            )

    # ---- metered routes ---------------------------------------------------------------------------

    async def handle_metered(self, request: web.Request) -> web.StreamResponse:
        request_id = "req_" + secrets.token_hex(16)
        request[REQUEST_ID] = request_id
        rec = request.get(RECORD) or RequestRecord(ROUTES[request.path].kind, time.perf_counter())
        rec.request_id = request_id
        account = await self.authenticate(request)
        rec.account = account
        body = await request.read()
        ex = self._plan(request, request_id, account, body, rec)
        fit = request.headers.get(self.settings.afford_output_header, "").lower() in ("1", "true")
        ex.fit_output = fit or self.settings.afford_output_limit
        try:
            cached = await self._cached_or_held(ex)
        except BaseException:
            self._land(ex, None)
            raise
        finally:
            rec.cache = ex.cache_result
        if cached is not None:
            self._land(ex, cached)
            return await self._serve_hit(request, ex, cached)
        rec.hold = ex.hold
        ex.cut = self.cutting
        ex.answered = asyncio.get_running_loop().create_future()
        task = asyncio.create_task(self._run(request, ex), name=f"exchange-{request_id}")
        rec.exchange = task
        self.in_flight.add(task)
        self.exchanges[request_id] = ex
        task.add_done_callback(self.in_flight.discard)
        task.add_done_callback(lambda _: self.exchanges.pop(request_id, None))
        # The answer, once complete: a stream's settlement goes on in the task, so the connection can
        # take its next request at once (aiohttp serves a connection's requests one after another).
        return await asyncio.shield(ex.answered)

    async def _cached_or_held(self, ex: Exchange) -> CachedResponse | None:
        """The cached answer to serve, or None once the worst case is held for an upstream call.
        Identical cacheable requests in flight here wait for the first one's answer (single flight)."""
        plan, cache = ex.cache, self.cache
        if plan is None or cache is None or not plan.lookup:
            await self._hold(ex, None)
            return None
        leader, flight = cache.lead_or_join(plan.digest)
        if leader:
            ex.flight = flight
        else:
            waiting = time.perf_counter()
            try:
                answer = await cache.wait(flight)
            finally:  # waiting on the leader's upstream call is not our own work
                ex.record.waited += time.perf_counter() - waiting
            if answer is not None:
                ex.cache_result = "collapsed"
                return answer
            # The first request got no storable answer (or took too long): go upstream ourselves.
        if not plan.colocated:
            answer = await cache.get(plan.key)
            if answer is not None:
                ex.cache_result = "hit"
                return answer
        reservation = await self._hold(ex, plan.key if plan.colocated else None)
        if reservation.status is ReserveStatus.CACHED:
            answer = cache.decode(reservation.cached)
            if answer is not None:
                ex.cache_result = "hit"
                return answer
            await self._hold(ex, None)  # an entry this version cannot read: answer from upstream
        cache.stats.misses += 1
        return None

    async def _hold(self, ex: Exchange, cache_key: str | None) -> Reservation:
        """Reserve the worst case (looking up `cache_key` in the same step); raises when it cannot."""
        reservation = await self._reserve(ex, cache_key)
        if reservation.status is ReserveStatus.INSUFFICIENT and self._fit_output(ex, reservation):
            reservation = await self._reserve(ex, None)
        if reservation.status is ReserveStatus.INSUFFICIENT:
            raise self._insufficient(ex, reservation.balance - reservation.held)
        if reservation.status is ReserveStatus.NO_ACCOUNT:
            raise Unauthorized("The account behind this key no longer exists.")
        if reservation.status is ReserveStatus.ALREADY_SETTLED:
            raise Conflict("This request id was already settled.")
        return reservation

    def _fit_output(self, ex: Exchange, reservation: Reservation) -> bool:
        """When asked (the afford_output_limit setting or header): lower the forwarded output limit to what
        the available credits afford, if at least afford_min_output_tokens fit; True when it did, and the
        exchange's body and hold now ask for less. The lowered answer is never cached."""
        if not ex.fit_output or not ex.route.has_output:
            return False
        limit, fits = self._affordable(ex, reservation.balance - reservation.held)
        if fits >= limit or fits < self.settings.afford_min_output_tokens:
            return False
        self._land(ex, None)  # identical requests waiting on this one go on by themselves
        ex.cache, ex.cache_result = None, "bypass"
        ex.body = with_output_limit(ex.body, ex.route.kind, fits)
        ex.hold = worst_case(ex.price, ex.prompt_tokens, ex.outputs * fits, ex.multiplier)
        ex.record.hold = ex.hold
        return True

    def _insufficient(self, ex: Exchange, available: int) -> InsufficientCredits:
        """The 402: what was required and available, and how many output tokens the latter affords."""
        if not ex.route.has_output:
            return InsufficientCredits(available, ex.hold, self.settings.top_up_url)
        limit, fits = self._affordable(ex, available)
        return InsufficientCredits(
            available,
            ex.hold,
            self.settings.top_up_url,
            output_limit=limit,
            affordable_output_tokens=fits,
        )

    @staticmethod
    def _affordable(ex: Exchange, available: int) -> tuple[int, int]:
        """(the output limit the hold was figured for, the largest one `available` covers), by the same
        worst case as the hold: the exchange's prompt tokens and completions per unit of limit."""
        limit = ex.request.output_limit or ex.price.max_output_tokens
        fits = affordable_output_tokens(
            available, ex.price, ex.prompt_tokens, ex.outputs, ex.multiplier, limit
        )
        return limit, fits

    async def _reserve(self, ex: Exchange, cache_key: str | None) -> Reservation:
        """The reserve script, sent again with backoff while its answer is lost, for up to
        `reserve_retry_seconds` (it is idempotent by request id: a hold an earlier try took is found, not
        taken twice). If it still fails, any hold it may have taken is released at once (a settle of
        nothing), not left to its lease, and the error goes on (a 503)."""
        lease_end_ms = int(time.time() * 1000) + self.settings.hold_lease_seconds * 1000
        deadline = time.monotonic() + self.settings.reserve_retry_seconds
        pause = RESERVE_FIRST_PAUSE
        attempt = 0
        while True:
            attempt += 1
            try:
                return await self.ledger.reserve(
                    ex.account, ex.request_id, ex.hold, lease_end_ms, cache_key=cache_key
                )
            except RedisError as exc:
                if time.monotonic() + pause >= deadline:
                    log.warning(
                        "reserve of %s failed (attempt %d, %r); giving up", ex.request_id, attempt, exc
                    )
                    with contextlib.suppress(RedisError, UnknownAccount):
                        await self.ledger.settle(ex.account, ex.request_id, 0)
                    raise
                log.warning("reserve of %s failed (attempt %d, %r); retrying", ex.request_id, attempt, exc)
            await asyncio.sleep(pause)
            pause = min(pause * 2, RESERVE_MAX_PAUSE)

    def _land(self, ex: Exchange, answer: CachedResponse | None) -> None:
        """End the single flight this request leads, handing its waiters `answer` (None: go upstream)."""
        if ex.flight is not None and ex.cache is not None and self.cache is not None:
            self.cache.land(ex.cache.digest, ex.flight, answer)
            ex.flight = None

    async def _serve_hit(
        self, request: web.Request, ex: Exchange, entry: CachedResponse
    ) -> web.StreamResponse:
        """Answer from cache: no hold, no charge; recorded as a zero-charge usage entry with what it saved."""
        assert self.cache is not None
        collapsed = ex.cache_result == "collapsed"
        ex.usage = entry.usage
        saved = cost(ex.price, entry.usage, ex.multiplier)
        event = ex.event("cache_collapsed" if collapsed else "cache_hit", hold=0, saved=saved)
        try:
            settlement = await self.ledger.settle(ex.account, ex.request_id, 0, event, record=True)
        except UnknownAccount:
            raise Unauthorized("The account behind this key no longer exists.") from None
        ex.outcome = "settled"
        rec = ex.record
        rec.settled, rec.usage, rec.saved, rec.outcome = True, entry.usage, saved, event.outcome
        if collapsed:
            self.cache.stats.collapsed += 1
        now = int(time.time() * 1000)
        headers = CIMultiDict(entry.headers)
        headers.update(hit_headers(entry.stored_ms, entry.expires_ms, now, collapsed=collapsed))
        headers["x-request-id"] = ex.request_id
        headers["x-creditgate-charged"] = "0"
        headers["x-creditgate-balance"] = str(settlement.balance)
        if not entry.stream:
            return web.Response(status=200, body=entry.body, headers=headers)
        # Replay the upstream's events in their framing, minus the usage chunk unless this client asked.
        reader = SSEReader(strip_usage_chunk=ex.strip_usage_chunk, kind=ex.route.kind)
        events = b"".join(reader.feed(entry.body)) + reader.flush()
        response = web.StreamResponse(status=200, headers=headers)
        with contextlib.suppress(ConnectionError):
            await response.prepare(request)
            await response.write(events)
            await response.write_eof()
        return response

    def _plan(
        self, request: web.Request, request_id: str, account: str, body: bytes, rec: RequestRecord
    ) -> Exchange:
        route = ROUTES[request.path]
        parsed = decode_request(body)
        price = self.prices.resolve(parsed.model)
        rec.model = price.model
        rec.stream = bool(parsed.stream)
        limit = parsed.output_limit
        if limit is not None and limit > price.max_output_tokens:
            field_name = next(
                name
                for name in ("max_completion_tokens", "max_tokens", "max_output_tokens")
                if getattr(parsed, name)
            )
            raise BadRequest(
                f"{field_name} is {limit}, above the {price.max_output_tokens} output tokens allowed for "
                f"{price.model}.",
                param=field_name,
            )
        # Every completion generated is billed: max(n, best_of) per prompt, and /v1/completions takes
        # a list of prompts.
        choices = parsed.choices if route.has_n else 1
        prompts = prompt_count(parsed) if route.kind == "completions" else 1
        outputs = prompts * choices if route.has_output else 0
        byok_key = request.headers.get(self.settings.byok_header)
        multiplier = self.prices.byok if byok_key else self.prices.pooled
        rec.key_source = "byok" if byok_key else "pooled"
        upstream = self.upstreams[price.upstream]
        prompt_tokens = estimate_prompt_tokens(
            len(body), self.settings.prompt_bytes_per_token
        ) + unseen_prompt_tokens(price, unseen_inputs(parsed, route.kind))
        strip = bool(
            parsed.stream
            and route.kind in ("chat", "completions")
            and not (parsed.stream_options and parsed.stream_options.include_usage)
        )
        plan = None
        if self.cache is not None:
            plan = self.cache.plan(
                route.kind,
                parsed,
                price.model,
                body,
                account,
                request.headers.get("Cache-Control"),
                byok=bool(byok_key),
                headers=request.headers,
            )
        return Exchange(
            request_id=request_id,
            account=account,
            route=route,
            request=parsed,
            price=price,
            multiplier=multiplier,
            body=with_usage_requested(body, parsed) if strip else body,
            body_size=len(body),
            hold=worst_case(price, prompt_tokens, outputs * (limit or price.max_output_tokens), multiplier),
            prompt_tokens=prompt_tokens,
            outputs=outputs,
            upstream=upstream,
            credential=byok_key or upstream.api_key,
            byok=bool(byok_key),
            strip_usage_chunk=strip,
            started_ms=int(time.time() * 1000),
            cache=plan,
            record=rec,
            cache_result="off" if plan is None else ("bypass" if plan is BYPASS else "miss"),
        )

    async def _run(self, request: web.Request, ex: Exchange) -> None:
        """The exchange's task: forward and relay, hand the answer (or the error) to the handler, then
        settle, whatever happened."""
        assert ex.answered is not None
        try:
            response = await self._forward_and_relay(request, ex)
        except Exception as exc:  # rendered by the handler's error middleware
            if not ex.answered.done():
                ex.answered.set_exception(exc)
        except BaseException:
            ex.answered.cancel()
            raise
        else:
            ex.answered.set_result(response)
        finally:
            try:
                await self._settle(ex)
            finally:  # whatever the settle did, the identical requests waiting on this one go on
                self._land(ex, ex.stored[0] if ex.stored else None)

    async def _forward_and_relay(self, request: web.Request, ex: Exchange) -> web.StreamResponse:
        """Send the request upstream and relay its answer to the client."""
        up = ex.upstream
        headers = request_headers(
            request.headers,
            self._drop_headers,
            ex.credential,
            byok=ex.byok,
            organization=up.organization,
            project=up.project,
            extra=self._forwarded,
        )
        rec = ex.record
        if ex.cut:  # started after shutdown cut everything: the upstream is not called, nothing charged
            ex.outcome = "shutting_down"
            raise ServiceUnavailable("creditgate is shutting down; retry this request.", code="shutting_down")
        rec.upstream_started = time.perf_counter()
        try:
            async with ex.cut_timeout() as ex.cutter:
                upstream = await self.session.post(
                    self._url(ex.upstream, ex.route), data=ex.body, headers=headers, allow_redirects=False
                )
        except (aiohttp.ClientError, TimeoutError) as exc:
            rec.upstream_ended = time.perf_counter()
            self._shutdown_cut(ex)
            ex.outcome = "upstream_unreachable"
            raise UpstreamUnavailable(
                f"The upstream {ex.upstream.name!r} could not be reached ({type(exc).__name__})."
            ) from None
        finally:
            ex.cutter = None
            rec.waited += time.perf_counter() - rec.upstream_started
        async with upstream:
            if 300 <= upstream.status < 400:  # never followed: it would carry the body and key elsewhere
                rec.upstream_ended = time.perf_counter()
                ex.outcome = f"upstream_{upstream.status}"
                log.warning("upstream %r answered a redirect (HTTP %d)", up.name, upstream.status)
                raise UpstreamUnavailable(
                    f"The upstream {ex.upstream.name!r} answered with a redirect (HTTP {upstream.status}), "
                    "which is not followed.",
                    code="upstream_redirect",
                )
            if upstream.status == 200 and upstream.content_type == "text/event-stream":
                return await self._relay_stream(request, ex, upstream)
            rec.upstream_first_byte = time.perf_counter()  # the status line and headers are in
            return await self._relay_body(ex, upstream)

    def _shutdown_cut(self, ex: Exchange) -> None:
        """When the exchange was cut by shutdown before any of its answer reached the client: nothing is
        charged (the client got nothing) and the answer is 503."""
        if not ex.cut:
            return
        ex.outcome = "shutdown_cut_unanswered"
        ex.usage = None
        raise ServiceUnavailable(
            "creditgate is shutting down and could not finish this request in time; retry it.",
            code="shutting_down",
        )

    async def _relay_body(self, ex: Exchange, upstream: aiohttp.ClientResponse) -> web.Response:
        rec = ex.record
        started = time.perf_counter()
        try:
            async with ex.cut_timeout() as ex.cutter:
                body = await upstream.read()
        except (aiohttp.ClientError, TimeoutError) as exc:
            self._shutdown_cut(ex)
            ex.outcome = "upstream_failed"
            raise UpstreamUnavailable(f"The upstream {ex.upstream.name!r} failed mid-response.") from exc
        finally:
            ex.cutter = None
            rec.upstream_ended = time.perf_counter()
            rec.waited += rec.upstream_ended - started
        if upstream.status in (401, 403) and not ex.byok:
            # The provider refused the pooled key. Its answer may quote part of that key ("Incorrect API
            # key provided: sk-ab***yz"): it is replaced, never relayed. A BYOK caller gets the provider's
            # own answer, which is about the caller's own key.
            ex.outcome = f"upstream_{upstream.status}"
            await self._settle(ex)
            log.error(
                "the upstream %r rejected the pooled provider key (HTTP %d); check its api_key",
                ex.upstream.name,
                upstream.status,
            )
            raise UpstreamUnavailable(
                f"The provider rejected the gateway's credentials (upstream {ex.upstream.name!r}, "
                f"HTTP {upstream.status}).",
                code="upstream_auth_failed",
            )
        headers = response_headers(upstream.headers, byok=ex.byok, extra=self._relayed)
        headers["x-request-id"] = ex.request_id
        if upstream.status != 200 and not ex.byok:  # may quote the pooled key, its org or project
            body = scrub_secrets(body, ex.upstream.secrets)
        if upstream.status == 200:
            ex.usage = usage_from_body(body)
            ex.outcome = "ok" if ex.usage else "no_usage"
            if ex.usage is not None:
                self._keep_for_cache(ex, body, upstream, stream=False)
            else:
                self._missing_usage(ex, len(body))
        else:
            ex.outcome = f"upstream_{upstream.status}"
        settlement = await self._settle(ex)
        if ex.cache is not None:
            headers.update(miss_headers(ex.cache.forward, stored=ex.stored is not None))
        headers["x-creditgate-charged"] = str(ex.charge)
        if settlement is not None:
            headers["x-creditgate-balance"] = str(settlement)
        return web.Response(status=upstream.status, body=body, headers=headers)

    async def _relay_stream(
        self, request: web.Request, ex: Exchange, upstream: aiohttp.ClientResponse
    ) -> web.StreamResponse:
        headers = response_headers(upstream.headers, byok=ex.byok, extra=self._relayed)
        headers["x-request-id"] = ex.request_id
        headers["x-creditgate-held"] = str(ex.hold)
        if ex.cache is not None:
            headers.update(miss_headers(ex.cache.forward, stored=False))

        capture = ex.cache is not None and ex.cache.store
        response, complete = await relay_stream(
            request, ex, upstream, headers, self.stream_policy, capture=capture
        )
        if complete is not None:
            self._keep_for_cache(ex, complete, upstream, stream=True)
        if ex.outcome == "no_usage":  # the stream ran to its end without reporting usage
            self._missing_usage(ex, None)
        return response

    def _missing_usage(self, ex: Exchange, answer_bytes: int | None) -> None:
        """A 200 that reported no usage: warned about (once a minute per upstream and model), counted by
        the request metrics (outcome ``no_usage*``), and charged by ``no_usage_charge``."""
        now = time.monotonic()
        key = (ex.upstream.name, ex.price.model)
        if self._usage_warned.get(key, -60.0) + 60 <= now:
            self._usage_warned[key] = now
            log.warning(
                "the upstream %r answered %s without usage (request %s); no_usage_charge is %s",
                ex.upstream.name,
                ex.price.model,
                ex.request_id,
                self.settings.no_usage_charge,
            )
        if self.settings.no_usage_charge == "estimate":
            ex.usage = ex.estimated_usage(answer_bytes)
            ex.outcome = "no_usage_estimated"

    def _keep_for_cache(
        self,
        ex: Exchange,
        body: bytes,
        upstream: aiohttp.ClientResponse,
        *,
        stream: bool,
    ) -> None:
        """Keep a complete 200 answer with usage for the cache, when this request may store one."""
        if ex.cache is None or self.cache is None or not ex.cache.store:
            return
        if stream and ex.route.kind != "responses" and not body.rstrip().endswith(b"data: [DONE]"):
            return  # a stream that ended early is never stored
        ex.stored = self.cache.entry(
            body,
            stream=stream,
            headers=upstream.headers,
            usage=ex.usage or Usage(),
            now_ms=int(time.time() * 1000),
        )

    async def _settle(self, ex: Exchange) -> int | None:
        """Settle once (later calls are no-ops); returns the balance after, when known."""
        if ex.outcome == "settled":
            return None
        ex.charge = cost(ex.price, ex.usage, ex.multiplier) if ex.usage is not None else 0
        if ex.charge > MAX_CHARGE:  # usage no real request has: billed at the ceiling, never lost
            log.error(
                "request %s reported usage costing %d micro-credits; charged the ceiling of %d",
                ex.request_id,
                ex.charge,
                MAX_CHARGE,
            )
            ex.charge = MAX_CHARGE
        outcome, ex.outcome = ex.outcome, "settled"
        event = ex.event(outcome, hold=ex.hold)
        store = None
        if ex.stored is not None and ex.cache is not None and ex.cache.colocated:
            store = (ex.cache.key, ex.stored[1], self.settings.cache_ttl_seconds * 1000)
        settlement = None
        account_gone = False
        for attempt, pause in enumerate((0.0, *SETTLE_RETRY_PAUSES)):
            if pause:
                await asyncio.sleep(pause)
            try:
                settlement = await self.ledger.settle(
                    ex.account, ex.request_id, ex.charge, event, cache_entry=store
                )
                break
            except RedisError as exc:  # idempotent by request id: retrying cannot charge twice
                log.warning("settle of %s failed (attempt %d): %r", ex.request_id, attempt + 1, exc)
            except UnknownAccount:  # deleted while its request ran: there is nothing left to debit
                log.error("settle of %s: account %s no longer exists", ex.request_id, ex.account)
                account_gone = True
                break
        rec = ex.record
        rec.outcome = outcome
        if settlement is not None:
            rec.settled, rec.charge, rec.usage = True, ex.charge, ex.usage
        else:
            if not account_gone:  # kept, and sent again in the background until Redis takes it
                log.error(
                    "settle of %s (%d micro-credits) failed; kept and retried in the background",
                    ex.request_id,
                    ex.charge,
                )
                self.pending.add(PendingSettlement(ex.account, ex.request_id, ex.charge, event))
            ex.stored = None
            return None
        if ex.stored is not None and ex.cache is not None and not ex.cache.colocated and self.cache:
            try:  # a shared-scope entry, outside the settle script's slot
                await self.cache.put(ex.cache.key, ex.stored[1])
            except RedisError as exc:  # the answer is served all the same; only the entry is lost
                log.warning("storing the cache entry of %s failed: %r", ex.request_id, exc)
                ex.stored = None
        if settlement.first and ex.charge > ex.hold:  # the overdraft is recorded in the ledger row too
            log.warning(
                "request %s on %s cost %d, above its hold of %d",
                ex.request_id,
                ex.account,
                ex.charge,
                ex.hold,
            )
        return settlement.balance

    # ---- shutdown ---------------------------------------------------------------------------------

    def cut_all(self) -> None:
        """Stop every live exchange from waiting on its upstream (and any started from now on). A stream
        already relaying is settled by the disconnect policy (the usage the upstream reported, else the
        estimate); a request whose client got nothing yet is charged nothing."""
        self.cutting = True
        now = asyncio.get_running_loop().time()
        for ex in self.exchanges.values():
            ex.cut = True
            if ex.cutter is not None:
                ex.cutter.reschedule(now)

    async def finish(self, grace: float) -> None:
        """At shutdown: let the exchanges in flight finish for up to `grace` seconds, then cut the rest
        and wait for them to settle."""
        if self.in_flight:
            log.info("waiting up to %.1f s for %d requests in flight", grace, len(self.in_flight))
            await asyncio.wait(set(self.in_flight), timeout=grace)
        if self.in_flight:
            log.warning("cutting %d requests still running after %.1f s", len(self.in_flight), grace)
            self.cut_all()
            await asyncio.wait(set(self.in_flight))

    # ---- pass-through ----------------------------------------------------------------------------

    async def handle_models(self, request: web.Request) -> web.StreamResponse:
        """The priced models and their aliases, in OpenAI's list format; no upstream is called."""
        request[REQUEST_ID] = "req_" + secrets.token_hex(16)
        rec = request.get(RECORD) or RequestRecord("models", time.perf_counter())
        rec.request_id = request[REQUEST_ID]
        rec.account = await self.authenticate(request)
        listed = self.prices.listing()
        headers = {"x-request-id": request[REQUEST_ID]}
        model_id = request.match_info.get("id")
        if model_id is None:
            return web.json_response({"object": "list", "data": listed}, headers=headers)
        for entry in listed:
            if entry["id"] == model_id:
                return web.json_response(entry, headers=headers)
        raise NotFound(f"The model {model_id!r} does not exist.", param="model", code="model_not_found")
