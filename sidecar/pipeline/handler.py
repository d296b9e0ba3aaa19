"""The metered request, stage by stage (README: "A request's walk"):

    admit    authenticate; identify the model; plan the worst case and the body
    hold     the cache's part (keying the body), then a cached or Idempotency-Key answer (free), or the
             worst case held in Redis (402 when it does not fit)
    forward  the upstream call, its stream relayed as it arrives or its body read whole
    decide   the outcome and the charge (outcome.py: the charge table)
    settle   debit once, release the hold, store the answer for the cache and an Idempotency-Key
    answer   the body with the charge in its headers, or the error the ending calls for

Each stage returns a value to this module; no stage calls another. Once the hold is taken the rest runs in
a task of its own, shielded from the handler's cancellation, so a client that goes away can never leave a
request unsettled; a stream's settlement goes on in that task after the client has its answer, so the
connection can take its next request at once.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import secrets
import time

import aiohttp
from aiohttp import web

from ..accounts import AccountDirectory
from ..balances import Balances
from ..cache import ResponseCache
from ..config import Settings
from ..errors import NotFound, Unauthorized, UnknownAccount
from ..headers import HeaderNames
from ..idempotency import Replays
from ..observe import RECORD, RequestRecord
from ..own_keys import OwnKeys
from ..pricing import PriceTable, cost
from ..responses import REQUEST_ID
from ..routing import Router
from ..settlements import PendingSettlements
from ..upstream import Upstream, forwarded_extra
from ..wire import ROUTES
from . import admit, keep, record, respond, retry
from .forward import Forwarded, Forwarder, ForwardPolicy
from .hold import Held, Hit, Holder, HoldNotes, HoldPolicy
from .live import Live
from .outcome import Outcome, Tariff, decide
from .replay import Replay, land_replay
from .settle import Settler
from .stream import StreamPolicy

log = logging.getLogger("creditgate.proxy")


class Gateway:
    def __init__(
        self,
        settings: Settings,
        prices: PriceTable,
        balances: Balances,
        accounts: AccountDirectory,
        upstreams: dict[str, Upstream],
        session: aiohttp.ClientSession,
        cache: ResponseCache | None = None,
        own_keys: OwnKeys | None = None,
    ) -> None:
        s = settings
        self.prices, self.accounts, self.cache = prices, accounts, cache
        self.own_keys = own_keys  # the accounts' stored provider keys (the BYOK vault), when there is one
        self.no_usage_charge = s.no_usage_charge
        self.body_read_timeout = s.body_read_timeout_seconds
        self.admit_policy = admit.AdmitPolicy.from_settings(s)
        self.replays = Replays(
            balances.keys,
            enabled=s.idempotency_enabled,
            ttl_seconds=s.idempotency_ttl_seconds,
            wait_seconds=s.idempotency_wait_seconds,
        )
        self.holder = Holder(
            balances,
            cache,
            HoldPolicy(
                s.hold_lease_seconds,
                s.top_up_url,
                s.afford_min_output_tokens,
                retry.reserve(s.reserve_retry_seconds),
            ),
            self.replays,
        )
        self.relayed = HeaderNames.of(s.relay_response_headers)
        drop = (
            s.byok_header,
            s.afford_output_header,
            s.tags_header,
            *([s.account_header] if s.account_header else []),
        )
        stream = StreamPolicy(drain_seconds=s.disconnect_drain_seconds, capture_bytes=s.cache_max_entry_bytes)
        self.router = Router.of(s)  # the process's routing state (routing.py): tests set its clock and RNG
        self.forwarder = Forwarder(
            session,
            upstreams,
            ForwardPolicy(drop, forwarded_extra(s), self.relayed, stream, s.upstream_max_body_bytes),
            self.router,
        )
        self.providers = {name: up.vault_provider for name, up in upstreams.items()}  # for the vault's keys
        for warning in prices.warnings:  # a price below a candidate's provider cost (pricing.below_cost)
            log.warning("%s", warning)
        self.settler = Settler(
            balances, cache, cache_ttl_seconds=s.cache_ttl_seconds, retry=retry.SETTLE, replays=self.replays
        )
        self.kept_bytes = s.cache_max_entry_bytes  # the most an Idempotency-Key's answer keeps
        self.in_flight: set[asyncio.Task[None]] = set()
        self.exchanges: dict[str, Live] = {}  # the requests in flight, by request id
        self.cutting = False  # shutting down past the grace period: every request is cut
        self._usage_warned: dict[tuple[str, str], float] = {}  # (upstream, model) -> last warning

    @property
    def pending(self) -> PendingSettlements:
        return self.settler.pending

    async def handle_metered(self, request: web.Request) -> web.StreamResponse:
        request_id = request[REQUEST_ID] = "req_" + secrets.token_hex(16)
        route = ROUTES[request.path]
        rec = request.get(RECORD) or RequestRecord(route.kind, time.perf_counter())
        rec.request_id = request_id
        caller = await admit.authenticate(request.headers, self.accounts, self.admit_policy)
        rec.account = account = caller.account
        body = await admit.read_body(request, self.body_read_timeout)
        identified = admit.identify(body, self.prices)
        record.identified(rec, identified[1], identified[0])
        own_keys = await self.own_keys.keys_of(account) if self.own_keys is not None else admit.NO_KEYS
        adm = admit.plan(
            request_id,
            account,
            route,
            body,
            identified,
            request.headers,
            self.prices,
            self.admit_policy,
            key_id=caller.key_id,
            own_keys=own_keys,
            providers=self.providers,
        )
        adm = await self.holder.plan_cache(adm, body, request.headers)
        plan = await self.replays.plan(account, adm.route.path, body, request.headers)
        adm = dataclasses.replace(adm, idempotency=plan) if plan else adm
        record.admitted(rec, adm)
        notes = HoldNotes.of(adm)
        try:
            got = await self.holder.hold(adm, notes)
        except BaseException:
            record.held(rec, notes, None)
            raise
        record.held(rec, notes, got.admission if isinstance(got, Held) else None)
        if isinstance(got, Hit):
            return await self._answer_hit(request, adm, got, rec)
        if isinstance(got, Replay):
            record.replayed(rec)
            return await respond.replay_answer(request, adm, got.answer, got.balance)
        live = Live(account, request_id, cut=self.cutting)
        answered: asyncio.Future[web.StreamResponse] = asyncio.get_running_loop().create_future()
        task = asyncio.create_task(
            self._exchange(request, got, live, rec, answered), name=f"exchange-{request_id}"
        )
        rec.exchange = task
        self.in_flight.add(task)
        self.exchanges[request_id] = live
        task.add_done_callback(self.in_flight.discard)
        task.add_done_callback(lambda _: self.exchanges.pop(request_id, None))
        # Not shielded: a cancelled handler cancels `answered`, never this task, which settles on and
        # answers no one (it checks `answered.done()` first).
        return await answered

    async def _answer_hit(
        self, request: web.Request, adm: admit.Admission, hit: Hit, rec: RequestRecord
    ) -> web.StreamResponse:
        """Answer from cache: no hold, no charge; recorded with what it saved."""
        assert self.cache is not None
        outcome = Outcome.CACHE_COLLAPSED if hit.collapsed else Outcome.CACHE_HIT
        saved = cost(adm.price, hit.entry.usage, adm.multiplier)
        provider = self.forwarder.upstreams[adm.price.upstream].name
        plan = adm.idempotency
        replay = self.replays.answer(plan, adm.request_id, hit.entry) if plan is not None else None
        try:
            settlement = await self.settler.record_hit(
                adm, provider, outcome.value, hit.entry.usage, saved, replay
            )
        except UnknownAccount:
            replay = None
            raise Unauthorized("The account behind this key no longer exists.") from None
        except BaseException:
            replay = None
            raise
        finally:
            land_replay(self.replays, adm, hit.replay_flight, replay)
        record.hit(rec, hit.entry.usage, saved, outcome.value)
        if hit.collapsed:
            self.cache.stats.collapsed += 1
        return await respond.hit_answer(request, adm, hit.entry, settlement, collapsed=hit.collapsed)

    async def _exchange(
        self,
        request: web.Request,
        held: Held,
        live: Live,
        rec: RequestRecord,
        answered: asyncio.Future[web.StreamResponse],
    ) -> None:
        """The held request's task: forward, decide (at the serving candidate's price), settle, answer."""
        adm, stored, replay = held.admission, None, None
        try:
            fwd = await self.forwarder.forward(request, adm, live, self.prices.order(adm.price))
            adm = adm.served_by(fwd.choice)
            tariff = Tariff(
                adm.price, adm.multiplier, adm.body_size, self.no_usage_charge, adm.hold, fwd.rates, adm.byok
            )
            verdict = decide(fwd.ending, tariff)
            if verdict.outcome in (Outcome.NO_USAGE, Outcome.NO_USAGE_ESTIMATED):
                self._warn_no_usage(adm, fwd)
            stored = keep.for_cache(self.cache, adm, fwd, verdict)
            replay = keep.for_replay(self.replays, adm, fwd, verdict, self.relayed, self.kept_bytes)
            error = respond.failure(adm, fwd, verdict.charge)
            # An error or a relayed stream is the client's at once, then settled; a body is settled first,
            # as its headers carry the charge.
            if answered.done():  # the handler was cancelled (shutdown): settle all the same
                pass
            elif error is not None:
                answered.set_exception(error)
            elif fwd.response is not None:
                answered.set_result(fwd.response)
            settlement, stored = await self.settler.settle(
                adm, fwd.upstream.name, verdict, stored, replay, attempts=fwd.attempts
            )
            replay = replay if settlement is not None else None  # stored only when Redis took the settle
            if not answered.done():
                try:
                    answer = respond.body_answer(
                        adm, fwd, self.relayed, verdict.charge, settlement, stored=stored is not None
                    )
                except Exception as exc:
                    answered.set_exception(exc)
                else:
                    answered.set_result(answer)
            record.finished(rec, adm, fwd, verdict, settlement)
        except BaseException as exc:
            replay = None
            if not answered.done():
                if isinstance(exc, Exception):
                    answered.set_exception(exc)
                else:
                    answered.cancel()
            raise
        finally:  # whatever happened, the identical requests waiting on this one go on
            self.holder.land(adm, held.flight, stored.entry if stored else None)
            land_replay(self.replays, adm, held.replay_flight, replay)

    def _warn_no_usage(self, adm: admit.Admission, fwd: Forwarded) -> None:
        """A 200 that reported no usage: warned about once a minute per upstream and model (the request
        metrics count it by its outcome, no_usage*)."""
        now = time.monotonic()
        key = (fwd.upstream.name, adm.price.model)
        if self._usage_warned.get(key, -60.0) + 60 <= now:
            self._usage_warned[key] = now
            log.warning(
                "the upstream %r answered %s without usage (request %s); no_usage_charge is %s",
                fwd.upstream.name,
                adm.price.model,
                adm.request_id,
                self.no_usage_charge,
            )

    # ---- shutdown ---------------------------------------------------------------------------------

    def cut_all(self) -> None:
        """Stop every request in flight from waiting on its upstream (and any started from now on). A
        stream already relaying is settled by the disconnect policy; a request whose client got nothing
        yet is charged nothing."""
        self.cutting = True
        for live in self.exchanges.values():
            live.cut_now()

    async def finish(self, grace: float) -> None:
        """At shutdown: let the requests in flight finish for up to `grace` seconds, then cut the rest
        and wait for them to settle."""
        if self.in_flight:
            log.info("waiting up to %.1f s for %d requests in flight", grace, len(self.in_flight))
            await asyncio.wait(set(self.in_flight), timeout=grace)
        if self.in_flight:
            log.warning("cutting %d requests still running after %.1f s", len(self.in_flight), grace)
            self.cut_all()
            await asyncio.wait(set(self.in_flight))

    # ---- models -----------------------------------------------------------------------------------

    async def handle_models(self, request: web.Request) -> web.StreamResponse:
        """The priced models and their aliases, in OpenAI's list format; no upstream is called."""
        request[REQUEST_ID] = "req_" + secrets.token_hex(16)
        rec = request.get(RECORD) or RequestRecord("models", time.perf_counter())
        rec.request_id = request[REQUEST_ID]
        rec.account = (await admit.authenticate(request.headers, self.accounts, self.admit_policy)).account
        listed = self.prices.listing()
        headers = {"x-request-id": request[REQUEST_ID]}
        model_id = request.match_info.get("id")
        if model_id is None:
            return web.json_response({"object": "list", "data": listed}, headers=headers)
        for entry in listed:
            if entry["id"] == model_id:
                return web.json_response(entry, headers=headers)
        raise NotFound(f"The model {model_id!r} does not exist.", param="model", code="model_not_found")
