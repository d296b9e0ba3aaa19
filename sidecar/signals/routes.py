"""Signal delivery over HTTP, and its start: /admin/events (list, one with its delivery log, replay),
/admin/accounts/{account}/contact, and the client's own /v1/credits/events and /v1/credits/contact.
`start` registers the fan-out on the app's event log and, on the node's first process, the worker."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import msgspec
from aiohttp import web
from prometheus_client import Counter

from ..errors import BadRequest, NotFound, ServiceUnavailable
from ..metrics import METRICS
from ..wallet_api import WALLET_OPS
from . import events
from .courier import Courier
from .deliveries import Deliveries
from .settings import plausible_address

if TYPE_CHECKING:
    from ..config import Settings
    from ..features import Running

DELIVERIES = web.AppKey("signal_deliveries", Deliveries)
COURIER = web.AppKey("signal_courier", Courier)
MAX_LIMIT = 500
CLIENT_FIELDS = ("channel", "status", "attempts", "delivered_at")


class ContactBody(msgspec.Struct, forbid_unknown_fields=True):
    email: str | None


async def start(app: web.Application, running: Running) -> None:
    deliveries = running.services.deliveries  # it fans out every process's events (services.py)
    counter = Counter(
        "creditgate_signal_deliveries",
        "Signal delivery attempts, by channel and outcome (delivered, retry, failed: given up)",
        ["channel", "outcome"],
        registry=app[METRICS].registry,
    )
    # Its own HTTP session: a slow receiver never holds the upstreams' connections.
    courier = Courier(deliveries, running.settings, counter=counter)
    app[DELIVERIES], app[COURIER] = deliveries, courier
    running.closers.append(courier.close)
    if running.node_tasks and deliveries.channels:
        interval = running.settings.signal_delivery_interval_seconds
        running.tasks.every("signal-delivery", interval, courier.run)


def _deliveries(request: web.Request) -> Deliveries:
    found = request.config_dict.get(DELIVERIES)
    if found is None:
        raise ServiceUnavailable("Signal delivery is not started yet.")
    return found


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=msgspec.json.encode(data), status=status, content_type="application/json")


def _limit(request: web.Request) -> int:
    raw = request.query.get("limit", "100")
    if not raw.isascii() or not raw.isdigit() or not 1 <= int(raw) <= MAX_LIMIT:
        raise BadRequest(f"limit must be a whole number from 1 to {MAX_LIMIT}.", param="limit")
    return int(raw)


def _contact(body: bytes) -> str | None:
    try:
        email = msgspec.json.decode(body or b"{}", type=ContactBody).email
    except msgspec.MsgspecError as exc:
        raise BadRequest(f"Invalid request body: {exc}", param="email") from None
    if email is not None and not plausible_address(email):
        raise BadRequest("email must be an email address (or null to remove it).", param="email")
    return email


async def _list(request: web.Request, account: str | None) -> web.Response:
    async with _deliveries(request).pool.acquire() as conn:
        found = await events.events_of(conn, account, _limit(request))
    return _json({"object": "list", "data": [e.body() for e in found]})


async def _one(request: web.Request, account: str | None) -> web.Response:
    event_id = request.match_info["event_id"]
    deliveries = _deliveries(request)
    async with deliveries.pool.acquire() as conn:
        found = await events.event(conn, event_id)
        if found is None or (account is not None and found.account != account):
            raise NotFound(f"No event {event_id!r}.", param="event_id")
        log = await deliveries.log_of(conn, event_id)
    if account is not None:  # a client sees how its event went, not the operator's targets or errors
        log = [{k: d[k] for k in CLIENT_FIELDS} for d in log]
    return _json({**found.body(), "deliveries": log})


async def _set_contact(request: web.Request, account: str) -> web.Response:
    email = _contact(await request.read())
    if not await _deliveries(request).set_contact(account, email):
        raise NotFound(f"No account {account!r}.", param="account")
    return _json({"object": "credits.contact", "account": account, "email": email})


async def _get_contact(request: web.Request, account: str) -> web.Response:
    email = await _deliveries(request).contact(account)
    return _json({"object": "credits.contact", "account": account, "email": email})


def add_routes(app: web.Application, settings: Settings) -> None:
    """The client's own: GET /v1/credits/events[/{event_id}], GET and PUT /v1/credits/contact."""

    async def own(request: web.Request) -> str:
        caller = await request.config_dict[WALLET_OPS].caller(request)
        return caller.account

    async def list_events(request: web.Request) -> web.Response:
        return await _list(request, await own(request))

    async def one_event(request: web.Request) -> web.Response:
        return await _one(request, await own(request))

    async def get_contact(request: web.Request) -> web.Response:
        return await _get_contact(request, await own(request))

    async def set_contact(request: web.Request) -> web.Response:
        return await _set_contact(request, await own(request))

    app.router.add_get("/v1/credits/events", list_events)
    app.router.add_get("/v1/credits/events/{event_id}", one_event)
    app.router.add_get("/v1/credits/contact", get_contact)
    app.router.add_put("/v1/credits/contact", set_contact)


def add_admin_routes(admin: web.Application, settings: Settings) -> None:
    """Any account's: /admin/events[?account=&limit=], /events/{id}, /events/{id}/replay, the contact."""

    async def list_events(request: web.Request) -> web.Response:
        return await _list(request, request.query.get("account") or None)

    async def one_event(request: web.Request) -> web.Response:
        return await _one(request, None)

    async def replay(request: web.Request) -> web.Response:
        event_id = request.match_info["event_id"]
        deliveries = _deliveries(request)
        async with deliveries.pool.acquire() as conn:
            found = await events.event(conn, event_id)
        if found is None:
            raise NotFound(f"No event {event_id!r}.", param="event_id")
        return _json({**found.body(), "deliveries": await deliveries.replay(found)})

    async def get_contact(request: web.Request) -> web.Response:
        return await _get_contact(request, request.match_info["account"])

    async def set_contact(request: web.Request) -> web.Response:
        return await _set_contact(request, request.match_info["account"])

    admin.router.add_get("/events", list_events)
    admin.router.add_get("/events/{event_id}", one_event)
    admin.router.add_post("/events/{event_id}/replay", replay)
    admin.router.add_get("/accounts/{account}/contact", get_contact)
    admin.router.add_put("/accounts/{account}/contact", set_contact)
