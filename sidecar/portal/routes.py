"""The portal as a feature (features.py): its pages on a sub-app at /portal/ of the API listener (when
`portal_on`), behind the edge (edge.py); its start gathers the service objects the pages call (desk.py),
after every other feature has started."""

from __future__ import annotations

from aiohttp import web

from ..admin import ADMIN_OPS
from ..config import Settings
from ..documents.invoices_api import DOC_ID, INVOICES
from ..documents.profiles_api import PROFILES
from ..errors import NotFound
from ..features import Feature, Running
from ..payments.context import PAYMENT_CONTEXT
from ..signals.alerts import Alerts
from ..signals.alerts_api import ALERTS
from ..vault.api import VAULT
from ..wallet_api import WALLET_OPS
from . import (
    buy_page,
    documents_page,
    history_page,
    keys_page,
    overview,
    provider_keys_page,
    settings_page,
    signin,
    usage_page,
)
from .attempts import SignInAttempts
from .desk import DESK, Desk
from .edge import edge, security_headers
from .render import Templates
from .sessions import SessionStore
from .settings import portal_on

ACCOUNT = "/accounts/{account}"
TEMPLATES = web.AppKey("portal_templates", Templates)


async def start(app: web.Application, running: Running) -> None:
    if not portal_on(running.settings):
        return
    s, svc = running.settings, running.services
    app[DESK] = Desk(
        settings=s,
        services=svc,
        sessions=SessionStore(svc.redis, svc.keys, s.portal_session_seconds, s.portal_session_max_seconds),
        attempts=SignInAttempts(
            svc.redis, svc.keys, s.portal_signin_attempts, s.portal_signin_window_seconds
        ),
        wallet=app[WALLET_OPS],
        admin=app[ADMIN_OPS],
        alerts=app[ALERTS],
        signals=Alerts(svc.store.pool, svc.events, s.alert_top_up_percents),
        deliveries=svc.deliveries,
        profiles=app[PROFILES],
        invoices=app[INVOICES],
        payments=running.payments,
        payment_context=app[PAYMENT_CONTEXT],
        vault=app[VAULT],
        templates=app[TEMPLATES],
    )


async def static(request: web.Request) -> web.StreamResponse:
    asset = request.config_dict[TEMPLATES].assets.get(request.match_info["name"])
    if asset is None:
        raise NotFound("No such file.")
    return web.Response(
        body=asset.body,
        content_type=asset.content_type.split(";")[0],
        charset="utf-8" if "charset" in asset.content_type else None,
        headers={"Cache-Control": "public, max-age=31536000, immutable"},
    )


def portal_app() -> web.Application:
    portal = web.Application(middlewares=[edge])
    portal.on_response_prepare.append(security_headers)
    r = portal.router
    r.add_get("/", signin.root, name="portal_root")
    r.add_get("/sign-in", signin.sign_in_form, name="portal_signin")
    r.add_post("/sign-in", signin.sign_in, name="portal_signin")
    r.add_post("/sign-out", signin.sign_out)
    r.add_get("/static/{name}", static, name="portal_static")
    r.add_get("/accounts", signin.accounts)
    pages = {
        "/": overview.overview,
        "/usage": usage_page.usage,
        "/history": history_page.history,
        "/history.csv": history_page.history_csv,
        "/keys": keys_page.keys,
        "/provider-keys": provider_keys_page.provider_keys,
        "/settings": settings_page.settings,
        "/buy": buy_page.buy,
        "/documents": documents_page.documents,
        f"/documents/{DOC_ID}.pdf": documents_page.document_pdf,
        f"/documents/{DOC_ID}.csv": documents_page.document_csv,
    }
    for path, handler in pages.items():
        r.add_get(ACCOUNT + path, handler)

    async def overview_slash(request: web.Request) -> web.StreamResponse:
        raise web.HTTPSeeOther(f"/portal/accounts/{request.match_info['account']}/")

    r.add_get(ACCOUNT, overview_slash)
    forms = {
        "/keys": keys_page.create_key,
        "/keys/{key_id}/revoke": keys_page.revoke_key,
        "/keys/{key_id}/name": keys_page.rename_key,
        "/keys/{key_id}/cap": keys_page.key_cap,
        "/provider-keys": provider_keys_page.add_key,
        "/provider-keys/{record_id}/delete": provider_keys_page.delete_key,
        "/caps": settings_page.set_cap,
        "/caps/delete": settings_page.delete_cap,
        "/time-zone": settings_page.set_zone,
        "/alerts": settings_page.set_alerts,
        "/auto-reload": settings_page.set_reload,
        "/contact": settings_page.set_contact,
        "/buy": buy_page.checkout,
        "/billing-profile": documents_page.set_profile,
    }
    for path, handler in forms.items():
        r.add_post(ACCOUNT + path, handler)
    return portal


def routes(app: web.Application, settings: Settings) -> None:
    """/portal/ (a sub-app) and /portal (a redirect to it), when the portal is on."""
    if not portal_on(settings):
        return
    portal = portal_app()
    app[TEMPLATES] = Templates()

    async def bare(request: web.Request) -> web.StreamResponse:
        query = f"?{request.query_string}" if request.query_string else ""
        raise web.HTTPMovedPermanently(f"/portal/{query}")

    app.router.add_get("/portal", bare)
    app.add_subapp("/portal/", portal)


FEATURE = Feature("portal", routes=routes, start=start)
