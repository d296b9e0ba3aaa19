"""The portal's one authority, decided once per request at its edge (a middleware of the portal app):

- the session: the cookie's token names a session in Redis, within its idle and absolute lifetimes; a
  customer's session lives only while the client key it was opened with does (looked up again on every
  page: revoked or expired ends it);
- the account: a page under /portal/accounts/{account}/ is served only when the session may see that
  account: a customer's own (any other id is a 404, the same as an account that does not exist), any
  existing account for an operator. Handlers read the account from `viewer(request)`, never from a form;
- a POST carries the session's CSRF token (and, when the browser sends one, an Origin of this host).

Errors become HTML pages here (the status of the error tree's class, as the JSON API answers it)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

import asyncpg
from aiohttp import web
from redis.exceptions import RedisError

from ..errors import CreditgateError, Forbidden, NotFound, ServiceUnavailable
from ..responses import Handler, status_of
from .desk import DESK, Desk
from .sessions import Session

log = logging.getLogger("creditgate.portal")
COOKIE = "creditgate_portal"
SIGNIN_COOKIE = "creditgate_portal_signin"  # the sign-in form's own CSRF token (no session yet)
PUBLIC = frozenset({"portal_root", "portal_signin", "portal_static"})  # route names: no session needed
HEADERS = {
    # No script at all; styles and images from the portal only; forms post here (a checkout's 303 then
    # goes on to the payment provider's https page); never framed.
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'self'; img-src 'self' data:; form-action 'self' https:;"
        " frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
}


@dataclass(frozen=True, slots=True)
class Viewer:
    session: Session
    account: str | None  # the account the page is about, authorised (None: a page about none)

    @property
    def operator(self) -> bool:
        return self.session.operator

    @property
    def csrf(self) -> str:
        return self.session.csrf

    def of(self) -> str:
        """The page's account (the edge routed an account page here only with one)."""
        assert self.account is not None
        return self.account


VIEWER = web.RequestKey("portal_viewer", Viewer)


def viewer(request: web.Request) -> Viewer:
    return request[VIEWER]


def desk(request: web.Request) -> Desk:
    return request.config_dict[DESK]


def cookie_secure(request: web.Request) -> bool:
    chosen = desk(request).settings.portal_secure_cookie
    return request.secure if chosen is None else chosen


def set_cookie(response: web.StreamResponse, request: web.Request, name: str, value: str) -> None:
    response.set_cookie(
        name, value, path="/portal", httponly=True, samesite="Strict", secure=cookie_secure(request)
    )


def clear_cookie(response: web.StreamResponse, name: str) -> None:
    response.del_cookie(name, path="/portal")


async def current_session(request: web.Request) -> Session | None:
    """The request's live session, or None (no cookie, expired, or its key revoked: then it is closed)."""
    d = desk(request)
    session = await d.sessions.find(request.cookies.get(COOKIE, ""), d.now_ms())
    if session is None:
        return None
    if session.operator:
        return session if operator_sign_in(d) else None  # (it may have been turned off since)
    accounts = d.services.accounts
    caller = await accounts.caller_for_hash(session.key_hash, time.monotonic(), d.now_ms())
    if caller is None or caller.account != session.account:
        await d.sessions.close(session)
        return None
    return session


def operator_sign_in(d: Desk) -> bool:
    """Whether the admin token opens operator sessions: it is set and the admin API is on."""
    return bool(d.settings.admin_api and d.settings.admin_token)


def same_origin(request: web.Request) -> bool:
    origin = request.headers.get("Origin")
    return origin is None or urlsplit(origin).netloc == request.host


async def _authorise(request: web.Request) -> Viewer:
    session = await current_session(request)
    if session is None:
        if request.method == "GET":
            raise web.HTTPSeeOther("/portal/sign-in?ended=1")
        raise Forbidden("Your session has ended: sign in again.", code="session_ended")
    if request.method == "POST":
        form = await request.post()
        token = form.get("csrf")
        if not same_origin(request) or not isinstance(token, str) or not session.csrf_ok(token):
            raise Forbidden(
                "This form is out of date or was not sent from this portal: reload the page and try again.",
                code="csrf_failed",
            )
    account = request.match_info.get("account")
    if account is not None:
        mine = session.account == account
        if not (mine or (session.operator and await desk(request).account_exists(account))):
            raise NotFound(f"No account {account!r}.", param="account")
    return Viewer(session, account)


@web.middleware
async def edge(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        route = request.match_info.route.name
        if route not in PUBLIC:
            request[VIEWER] = await _authorise(request)
        return await handler(request)
    except CreditgateError as err:
        return error_page(request, err)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return error_page(request, _http_error(exc))
    except RedisError as exc:
        log.error("Redis failed on %s %s: %r", request.method, request.path, exc)
        return error_page(request, ServiceUnavailable("The credit store is unavailable; retry shortly."))
    except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as exc:
        log.error("Postgres failed on %s %s: %r", request.method, request.path, exc)
        return error_page(request, ServiceUnavailable("The ledger database is unavailable; retry shortly."))
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return error_page(request, CreditgateError("Internal error in creditgate."))


def _http_error(exc: web.HTTPException) -> CreditgateError:
    if exc.status == 404:
        return NotFound("There is no such page in the portal.")
    if exc.status == 405:
        return NotFound("This page does not take that method.")
    err = CreditgateError(exc.reason)
    err.code = str(exc.status)
    return err


def error_page(request: web.Request, err: CreditgateError) -> web.Response:
    status = int(err.code) if err.code and err.code.isdigit() else status_of(err)
    found = request.get(VIEWER)
    context = {
        "title": "Something went wrong" if status >= 500 else "That did not work",
        "status": status,
        "message": err.message,
        "viewer": found,
        "account": found.account if found else None,
    }
    html = desk(request).templates.render("error.html", context)
    return web.Response(text=html, status=status, content_type="text/html")


async def security_headers(request: web.Request, response: web.StreamResponse) -> None:
    for name, value in HEADERS.items():
        response.headers.setdefault(name, value)
    if not request.path.startswith("/portal/static/"):
        response.headers.setdefault("Cache-Control", "no-store")
