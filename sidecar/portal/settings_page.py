"""Settings: spend caps and the time zone their days follow (`CapOps`), alert thresholds and auto-reload
(`AlertStore`), where events are sent (the contact address, `Deliveries`; the webhook is the operator's),
and the account's referral codes. Each form changes one thing through the object its /v1 route calls;
a bad value re-renders the page with the message and changes nothing."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from ..caps import CapBody
from ..errors import BadRequest, CreditgateError
from ..payments.referrals import referrals_view
from ..responses import status_of
from ..signals.alert_rules import Rule
from ..signals.alert_store import AlertsBody, ReloadBody
from ..signals.settings import plausible_address
from ..wallet import PERIODS
from . import forms
from .edge import desk, viewer
from .pages import done, form_data, form_error, page

RULE_KINDS = {
    "balance_below": "Balance below",
    "top_up_share": "Balance below a share of the last top-up",
    "spend_day": "Spend in a day reaches",
    "spend_month": "Spend in a month reaches",
}


async def settings_view(request: web.Request, *, status: int = 200, **extra: Any) -> web.Response:
    d = desk(request)
    account = viewer(request).of()
    keys = await d.wallet.key_ops.list_keys(account)
    context: dict[str, Any] = {"form": {}, "section": None, **extra}
    return await page(
        request,
        "settings.html",
        active="settings",
        title="Settings",
        status=status,
        caps=await d.wallet.caps.list_caps(account),
        alerts=await d.alerts.alerts(account),
        reload=await d.alerts.reload(account),
        contact=await d.deliveries.contact(account),
        referrals=await referrals_view(d.admin, account),
        webhook_on=d.settings.signal_webhook_url is not None,
        email_on=d.settings.smtp_host is not None,
        live_keys=[k for k in keys["data"] if not k["revoked"]],
        models=sorted(d.settings.models),
        periods=PERIODS,
        rule_kinds=RULE_KINDS,
        **context,
    )


async def settings(request: web.Request) -> web.StreamResponse:
    return await settings_view(request)


async def _failed(
    request: web.Request, err: CreditgateError, form: dict[str, str], section: str
) -> web.Response:
    return await settings_view(request, status=status_of(err), form=form, section=section, **form_error(err))


async def set_cap(request: web.Request) -> web.StreamResponse:
    d = desk(request)
    account = viewer(request).of()
    form = await form_data(request)
    try:
        user = forms.text(form, "user", longest=256)
        scope = f"user:{user}" if user else forms.text(form, "scope", required=True, longest=300) or ""
        period = forms.choice(form, "period", PERIODS)
        limit = forms.credits(form, "limit", positive=False)
        await d.wallet.caps.set_cap(account, CapBody(scope=scope, period=period, limit=limit))
    except CreditgateError as err:
        return await _failed(request, err, form, "caps")
    raise done(account, "settings", "cap-set")


async def delete_cap(request: web.Request) -> web.StreamResponse:
    d = desk(request)
    account = viewer(request).of()
    form = await form_data(request)
    try:
        await d.wallet.caps.delete_cap(account, form.get("scope", ""), form.get("period", ""))
    except CreditgateError as err:
        return await _failed(request, err, form, "caps")
    raise done(account, "settings", "cap-deleted")


async def set_zone(request: web.Request) -> web.StreamResponse:
    d = desk(request)
    account = viewer(request).of()
    form = await form_data(request)
    try:
        await d.wallet.caps.set_time_zone(account, forms.text(form, "time_zone", longest=64))
    except CreditgateError as err:
        return await _failed(request, err, form, "zone")
    raise done(account, "settings", "zone-set")


def _rules_of(view: dict[str, Any]) -> list[Rule]:
    return [Rule(r["kind"], amount=r.get("amount"), percent=r.get("percent")) for r in view["rules"]]


async def set_alerts(request: web.Request) -> web.StreamResponse:
    """action=add (kind, value), remove (rule: its id) or defaults (the checkbox)."""
    d = desk(request)
    account = viewer(request).of()
    form = await form_data(request)
    try:
        current = await d.alerts.alerts(account)
        rules, defaults = _rules_of(current), bool(current["defaults"])
        action = forms.choice(form, "action", ("add", "remove", "defaults"))
        if action == "add":
            kind = forms.choice(form, "kind", tuple(RULE_KINDS))
            if kind == "top_up_share":
                rules.append(Rule("top_up_share", percent=forms.whole(form, "value", 1, 100)))
            else:
                rules.append(Rule(kind, amount=forms.credits(form, "value")))  # type: ignore[arg-type]
        elif action == "remove":
            rules = [r for r in rules if r.id != form.get("rule")]
        else:
            defaults = forms.checkbox(form, "defaults")
        await d.alerts.set_alerts(account, AlertsBody(rules=rules, defaults=defaults))
    except CreditgateError as err:
        return await _failed(request, err, form, "alerts")
    raise done(account, "settings", "alerts-set")


async def set_reload(request: web.Request) -> web.StreamResponse:
    d = desk(request)
    account = viewer(request).of()
    form = await form_data(request)
    try:
        body = ReloadBody(
            enabled=forms.checkbox(form, "enabled"),
            threshold=forms.credits(form, "threshold"),
            credits=forms.credits(form, "credits"),
            method=forms.choice(form, "method", ("stripe", "webhook")),  # type: ignore[arg-type]
        )
        await d.alerts.set_reload(account, body)
    except CreditgateError as err:
        return await _failed(request, err, form, "reload")
    raise done(account, "settings", "reload-set")


async def set_contact(request: web.Request) -> web.StreamResponse:
    d = desk(request)
    account = viewer(request).of()
    form = await form_data(request)
    try:
        email = forms.text(form, "email", longest=254)
        if email is not None and not plausible_address(email):
            raise BadRequest("email must be an email address (or empty to remove it).", param="email")
        await d.deliveries.set_contact(account, email)
    except CreditgateError as err:
        return await _failed(request, err, form, "contact")
    raise done(account, "settings", "contact-set")
