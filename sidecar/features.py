"""Capabilities beyond the metering core plug into the app here, each as one `Feature`: its /v1 (and
/webhooks) routes, its /admin routes, and what it starts with the app (background tasks on the one
supervisor, objects under its own app keys). `FEATURES` lists them in start order; app.py wires each
the same way, so a new capability touches its own package and one line below.

At shutdown the supervisor's tasks stop first (supervisor.py), then the features' closers run in
reverse start order, then the final flush, then the pools close."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from aiohttp import ClientSession, web

from .signals.events import EventLog

if TYPE_CHECKING:
    from .config import Settings
    from .flusher import Flusher
    from .payments.landing import Payments
    from .pipeline.handler import Gateway
    from .services import Services
    from .supervisor import Supervisor


@dataclass
class Running:
    """What a feature gets when the app starts."""

    settings: Settings
    services: Services
    tasks: Supervisor  # the one owner of background tasks; `tasks.every(name, interval, step)`
    session: ClientSession  # the upstream session's connector settings, for outgoing HTTP
    payments: Payments
    proxy: Gateway
    flusher: Flusher
    node_tasks: bool  # False in every worker process but the first: no node-wide loops there

    @property
    def events(self) -> EventLog:  # every feature emits through the one event log
        return self.services.events

    closers: list[Callable[[], Awaitable[None]]] = field(default_factory=list)


EVENTS = web.AppKey(
    "events", EventLog
)  # services.events  # the running app's event log (set before the features start)

Routes = Callable[[web.Application, "Settings"], None]
Start = Callable[[web.Application, Running], Awaitable[None]]


@dataclass(frozen=True)
class Feature:
    name: str
    routes: Routes | None = None  # on the API app: /v1/*, /webhooks/*
    admin_routes: Routes | None = None  # on the admin sub-app (mounted at /admin/)
    start: Start | None = None  # in the app's lifecycle, after the core is up


def features() -> list[Feature]:
    """Every feature, in start order (imported here, late, so a feature may import app-level modules)."""
    from . import margins
    from .documents import billing_modes_api, invoices_api, plans_api, profiles_api
    from .metering import meters_api, operation_api
    from .portal import routes as portal
    from .signals import alerts_api
    from .signals import routes as signals
    from .vault import api as vault_api

    return [
        Feature("signal-delivery", signals.add_routes, signals.add_admin_routes, signals.start),
        alerts_api.FEATURE,
        Feature("meters", meters_api.routes, meters_api.admin_routes, meters_api.start),
        Feature("operations", routes=operation_api.add_routes, start=operation_api.start),  # holds
        profiles_api.FEATURE,
        plans_api.FEATURE,  # subscription plans: documents/plans_api.py
        billing_modes_api.FEATURE,  # invoice mode, credit limits, blocks: documents/billing_modes_api.py
        invoices_api.FEATURE,  # invoices, receipts, credit notes: documents/invoices_api.py
        margins.FEATURE,  # GET /admin/margins: revenue, provider cost and margin (margins.py)
        vault_api.FEATURE,  # customers' own provider keys (BYOK vault): vault/api.py
        portal.FEATURE,  # the billing portal at /portal (last: its pages use every feature's objects)
    ]
