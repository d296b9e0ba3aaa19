"""Alerts and auto-reload, read by the flusher from each settle's outbox entry: a low-balance rule fires
once per crossing and again after a top-up, 100 requests that cross together fire once, a cost rule once
per UTC day, replayed batches add nothing; auto-reload starts exactly one reload per crossing (an operator's
own charge, or an off-session Stripe payment landed by its verified webhook), and failures in a row turn it
off."""

from __future__ import annotations

import asyncio
import datetime as dt
import uuid
from typing import Any

import msgspec
import pytest

from sidecar.outbox import UsageEvent
from sidecar.signals.alerts_api import RELOADS
from sidecar.signals.reloads import Reloads
from sidecar.signals.routes import COURIER, DELIVERIES

from .conftest import Sidecar, SidecarFactory
from .support_signals import WEBHOOK_SECRET, Clock, Receiver, clock, receiver
from .support_stripe import FakeStripe, event, post_event, stripe_settings
from .support_stripe import fake_stripe as fake_stripe  # the fixture

__all__ = ["clock", "receiver"]  # fixtures

pytestmark = pytest.mark.topologies
C = 1_000_000
DAY_MS = 86_400_000
T0 = 1_796_000_000_000  # a settle's time, fixed (the ledger row's and the rule's UTC day)
DAY = dt.datetime.fromtimestamp(T0 // 1000, dt.UTC).date()


@pytest.fixture
async def quiet(make_sidecar: SidecarFactory) -> Sidecar:
    """A sidecar whose flushing the test drives (no background flusher, no reload pass of its own)."""
    return await make_sidecar(flusher_enabled=False, reload_interval_seconds=3600)


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def spend(sc: Sidecar, account: str, micro: int, at_ms: int = T0) -> None:
    """One settled charge, as a request's settle makes it (no hold: the script debits it anyway)."""
    request_id = "req_" + uuid.uuid4().hex
    await sc.balances.settle(account, request_id, micro, UsageEvent(route="chat", settled_ms=at_ms))


async def flush(sc: Sidecar) -> None:
    await sc.services.flusher().drain()


async def grant(sc: Sidecar, account: str, micro: int) -> None:
    await sc.admin(
        "POST", f"/accounts/{account}/grants", {"amount": micro}, **{"Idempotency-Key": uuid.uuid4().hex}
    )


async def events(sc: Sidecar, account: str, kind: str | None = None) -> list[dict[str, Any]]:
    rows = await sc.services.store.pool.fetch(
        "SELECT event_id, type, data FROM signal_events WHERE account_id = $1 AND ($2::text IS NULL"
        " OR type = $2) ORDER BY created_at, event_id",
        account,
        kind,
    )
    return [{"id": r["event_id"], "type": r["type"], **msgspec.json.decode(r["data"])} for r in rows]


async def test_a_low_balance_rule_fires_once_per_crossing_and_again_after_a_top_up(quiet: Sidecar) -> None:
    account, _ = await quiet.account(100 * C)  # the last top-up: 100 credits, so the defaults are 20 and 5
    await spend(quiet, account, 70 * C)  # 30 left: above both
    await flush(quiet)
    assert await events(quiet, account) == []
    await spend(quiet, account, 15 * C)  # 15 left: below 20
    await spend(quiet, account, 5 * C)  # 10 left: still below 20, above 5
    await flush(quiet)
    low = await events(quiet, account, "balance.low")
    assert [(e["rule"]["percent"], e["threshold"], e["balance"]) for e in low] == [(20, 20 * C, 15 * C)]
    await spend(quiet, account, 6 * C)  # 4 left: below 5
    await flush(quiet)
    low = await events(quiet, account, "balance.low")
    assert [e["rule"]["percent"] for e in low] == [20, 5]
    await grant(quiet, account, 100 * C)  # 104: both re-arm (a crossing needs a balance at or above)
    await spend(quiet, account, 90 * C)  # 14: below 20 again
    await flush(quiet)
    low = await events(quiet, account, "balance.low")
    assert [e["rule"]["percent"] for e in low] == [20, 5, 20]
    assert len({e["id"] for e in low}) == 3


async def test_a_crossing_reaches_the_operators_webhook_signed(
    make_sidecar: SidecarFactory, receiver: Receiver
) -> None:
    sc = await make_sidecar(
        flusher_enabled=False,
        signal_webhook_url=receiver.url,
        signal_webhook_secret=WEBHOOK_SECRET,
        signal_delivery_interval_seconds=3600,  # the test steps the courier
    )
    now = Clock(sc.client.app[DELIVERIES].clock())
    sc.client.app[DELIVERIES].clock = receiver.clock = now
    account, _ = await sc.account(10 * C)
    await spend(sc, account, 9 * C)
    await flush(sc)
    await sc.client.app[COURIER].step()
    (body,) = receiver.bodies()
    assert body["type"] == "balance.low"
    assert body["account"] == account
    assert body["data"]["balance"] == 1 * C


async def test_running_dry_tells_the_operator_once_per_time(quiet: Sidecar) -> None:
    account, _ = await quiet.account(10 * C)
    await spend(quiet, account, 4 * C)
    await spend(quiet, account, 6 * C)  # 0: new work now gets a 402
    await spend(quiet, account, 1 * C)  # a settle past its hold may still go below: not a new crossing
    await flush(quiet)
    (dry,) = await events(quiet, account, "balance.depleted")
    assert dry["balance"] == 0
    await grant(quiet, account, 5 * C)  # 4
    await spend(quiet, account, 5 * C)
    await flush(quiet)
    assert [e["balance"] for e in await events(quiet, account, "balance.depleted")] == [0, -1 * C]


async def test_a_replayed_batch_fires_nothing_more(quiet: Sidecar) -> None:
    account, _ = await quiet.account(10 * C)
    await spend(quiet, account, 9 * C)  # 1 left: below 2 (20%) and below 0.5 (5%)? 1 >= 0.5: only 20%
    flusher = quiet.services.flusher()
    seen: list[Any] = []

    async def keep(observed: list[Any]) -> None:
        seen.extend(observed)

    flusher.observers.append(keep)
    await flusher.drain()
    assert len(seen) == 1
    assert seen[0].before == 10 * C
    assert seen[0].after == 1 * C
    assert len(await events(quiet, account, "balance.low")) == 1
    await flusher.observers[0](seen)  # the batch again (committed, not acknowledged, claimed by another)
    await flusher.observers[0](seen)
    assert len(await events(quiet, account, "balance.low")) == 1


async def test_an_accounts_own_rules_and_no_defaults(quiet: Sidecar) -> None:
    account, key = await quiet.account(50 * C)
    rules = {"defaults": False, "rules": [{"kind": "balance_below", "amount": 30 * C}]}
    resp = await quiet.client.put("/v1/credits/alerts", json=rules, headers=auth(key))
    assert resp.status == 200, await resp.text()
    body = await resp.json()
    assert body["rules"] == [{"id": f"balance_below:{30 * C}", "kind": "balance_below", "amount": 30 * C}]
    assert body["default_rules"] == []
    await spend(quiet, account, 25 * C)  # 25 left: below 30; 20% of 50 is 10, off
    await spend(quiet, account, 20 * C)  # 5 left: below 10, but the defaults are off
    await flush(quiet)
    low = await events(quiet, account, "balance.low")
    assert [(e["rule"]["kind"], e["balance"]) for e in low] == [("balance_below", 25 * C)]


async def test_a_hundred_requests_that_cross_together_fire_one_alert(quiet: Sidecar) -> None:
    account, key = await quiet.account(1000 * C)
    one = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hello"}]}
    resp = await quiet.client.post("/v1/chat/completions", json=one, headers=auth(key))
    assert resp.status == 200
    await flush(quiet)
    balance = (await quiet.balance(account))["balance"]
    cost = 1000 * C - balance
    assert cost > 0
    limit = balance - 50 * cost + cost // 2  # the 50th of the next 100 takes the balance below it
    rules = {"defaults": False, "rules": [{"kind": "balance_below", "amount": limit}]}
    await quiet.admin("PUT", f"/accounts/{account}/alerts", rules)

    async def call() -> int:
        r = await quiet.client.post("/v1/chat/completions", json=one, headers=auth(key))
        await r.read()
        return r.status

    assert await asyncio.gather(*(call() for _ in range(100))) == [200] * 100
    await flush(quiet)
    assert (await quiet.balance(account))["balance"] == balance - 100 * cost
    low = await events(quiet, account, "balance.low")
    assert len(low) == 1
    assert low[0]["balance"] < limit <= low[0]["balance"] + cost


async def test_a_cost_rule_fires_once_per_utc_day(quiet: Sidecar) -> None:
    account, key = await quiet.account(100 * C)
    rules = {"defaults": False, "rules": [{"kind": "spend_day", "amount": 10 * C}]}
    assert (await quiet.client.put("/v1/credits/alerts", json=rules, headers=auth(key))).status == 200
    await spend(quiet, account, 6 * C)
    await flush(quiet)
    assert await events(quiet, account, "spend.high") == []
    await spend(quiet, account, 6 * C)  # 12 today
    await flush(quiet)
    await spend(quiet, account, 6 * C)  # 18 today: the same day's alert, not again
    await flush(quiet)
    high = await events(quiet, account, "spend.high")
    assert [(e["period_start"], e["spent"]) for e in high] == [(DAY.isoformat(), 12 * C)]
    await spend(quiet, account, 11 * C, at_ms=T0 + DAY_MS)  # the next day
    await flush(quiet)
    high = await events(quiet, account, "spend.high")
    assert [e["period_start"] for e in high] == [DAY.isoformat(), (DAY + dt.timedelta(days=1)).isoformat()]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"rules": [{"kind": "top_up_share", "percent": 0}]}, "rules[0].percent"),
        ({"rules": [{"kind": "balance_below", "amount": -5}]}, "rules[0].amount"),
        ({"rules": [{"kind": "spend_day", "percent": 5}]}, "rules[0].amount"),
        ({"rules": [{"kind": "sometimes"}]}, "rules"),
        ({"rules": [{"kind": "spend_day", "amount": 5}, {"kind": "spend_day", "amount": 5}]}, "rules"),
        ({"alerts": []}, "alerts"),
    ],
)
async def test_bad_alert_rules_are_refused_naming_the_field(quiet: Sidecar, body: Any, param: str) -> None:
    _account, key = await quiet.account(C)
    resp = await quiet.client.put("/v1/credits/alerts", json=body, headers=auth(key))
    assert resp.status == 400
    error = (await resp.json())["error"]
    assert error["type"] == "invalid_request_error"
    assert (error["param"] or "").startswith(param.split("[")[0])
    assert (await (await quiet.client.get("/v1/credits/alerts", headers=auth(key))).json())["rules"] == []


async def test_alert_settings_need_the_accounts_key_or_the_admin_token(quiet: Sidecar) -> None:
    assert (await quiet.client.get("/v1/credits/alerts")).status == 401
    resp = await quiet.client.get("/admin/accounts/nobody/alerts", headers=quiet.admin_headers())
    assert resp.status == 404


# ---- auto-reload ---------------------------------------------------------------------------------------


def reloads(sc: Sidecar) -> Reloads:
    return sc.client.app[RELOADS]


async def reload_rows(sc: Sidecar, account: str) -> list[Any]:
    return await sc.services.store.pool.fetch(
        "SELECT reload_id, status, order_id, error FROM reloads WHERE account_id = $1 ORDER BY created_at",
        account,
    )


async def test_webhook_reload_one_per_crossing_landed_by_the_operator(quiet: Sidecar) -> None:
    account, key = await quiet.account(100 * C)
    body = {"enabled": True, "threshold": 20 * C, "credits": 50 * C, "method": "webhook"}
    resp = await quiet.client.put("/v1/credits/auto-reload", json=body, headers=auth(key))
    assert resp.status == 200, await resp.text()
    await spend(quiet, account, 85 * C)  # 15: below the threshold
    await spend(quiet, account, 5 * C)  # 10: no new crossing
    await flush(quiet)
    await flush(quiet)
    assert [r["status"] for r in await reload_rows(quiet, account)] == ["requested"]
    assert await reloads(quiet).run_pass() == 1
    assert await reloads(quiet).run_pass() == 0  # started once
    (row,) = await reload_rows(quiet, account)
    assert row["status"] == "charging"
    (asked,) = await events(quiet, account, "reload.requested")
    assert asked["order_id"] == row["order_id"]
    assert asked["credits"] == 50 * C
    paid = await quiet.admin("POST", f"/orders/{row['order_id']}/paid", {"payment_ref": "inv-1"})
    assert paid["credited"] is True
    assert (await quiet.balance(account))["balance"] == 60 * C
    (done,) = await events(quiet, account, "reload.succeeded")
    assert done["reload_id"] == row["reload_id"]
    await spend(quiet, account, 45 * C)  # 15 again: the next crossing, the next reload
    await flush(quiet)
    assert [r["status"] for r in await reload_rows(quiet, account)] == ["succeeded", "requested"]


async def test_an_operator_reports_a_failed_reload(quiet: Sidecar) -> None:
    account, _ = await quiet.account(100 * C)
    body = {"enabled": True, "threshold": 20 * C, "credits": 50 * C, "method": "webhook"}
    await quiet.admin("PUT", f"/accounts/{account}/auto-reload", body)
    await spend(quiet, account, 90 * C)
    await flush(quiet)
    await reloads(quiet).run_pass()
    (row,) = await reload_rows(quiet, account)
    failed = await quiet.admin("POST", f"/reloads/{row['reload_id']}/fail", {"reason": "card expired"})
    assert failed["status"] == "failed"
    (event_,) = await events(quiet, account, "reload.failed")
    assert event_["failures"] == 1
    assert "card expired" in event_["error"]
    resp = await quiet.client.post(
        f"/admin/reloads/{row['reload_id']}/fail", json={}, headers=quiet.admin_headers()
    )
    assert resp.status == 404  # not open any more


@pytest.fixture
async def shop(make_sidecar: SidecarFactory, fake_stripe: FakeStripe) -> Sidecar:
    return await make_sidecar(
        **stripe_settings(
            fake_stripe, flusher_enabled=False, reload_interval_seconds=3600, reload_max_failures=2
        )
    )


async def saved_method(sc: Sidecar, account: str, method: str = "pm_card_visa") -> None:
    body = {"enabled": True, "threshold": 20 * C, "credits": 50 * C, "method": "stripe",
            "stripe_customer": "cus_1", "stripe_payment_method": method}  # fmt: skip
    view = await sc.admin("PUT", f"/accounts/{account}/auto-reload", body)
    assert view["payment_method_saved"] is True
    assert "pm_" not in str(view)


async def test_stripe_reload_lands_by_its_verified_webhook(shop: Sidecar, fake_stripe: FakeStripe) -> None:
    account, key = await shop.account(100 * C)
    await saved_method(shop, account)
    await spend(shop, account, 90 * C)
    await flush(shop)
    assert await reloads(shop).run_pass() == 1
    assert await reloads(shop).run_pass() == 0
    (row,) = await reload_rows(shop, account)
    (intent,) = fake_stripe.intents.values()
    assert intent["metadata"]["order_id"] == row["order_id"]
    assert intent["amount"] == 50  # 50 credits at $0.01
    calls = [c for c in fake_stripe.calls if c.path == "/v1/payment_intents"]
    assert [c.headers["Idempotency-Key"] for c in calls] == [row["order_id"]]
    assert (await shop.balance(account))["balance"] == 10 * C  # nothing lands from the create's answer
    status, answer = await post_event(shop.client, event("payment_intent.succeeded", intent))
    assert status == 200, answer
    assert (await shop.balance(account))["balance"] == 60 * C
    status, _ = await post_event(shop.client, event("payment_intent.succeeded", intent))  # again
    assert (await shop.balance(account))["balance"] == 60 * C
    assert [r["status"] for r in await reload_rows(shop, account)] == ["succeeded"]
    assert len(await events(shop, account, "reload.succeeded")) == 1
    view = await (await shop.client.get("/v1/credits/auto-reload", headers=auth(key))).json()
    assert view["enabled"] is True
    assert view["failures"] == 0
    assert "cus_1" not in str(view)


async def test_declines_in_a_row_turn_auto_reload_off(shop: Sidecar, fake_stripe: FakeStripe) -> None:
    account, _ = await shop.account(100 * C)
    fake_stripe.declines["pm_declines"] = "card_declined"
    await saved_method(shop, account, "pm_declines")
    for _ in range(3):
        await spend(shop, account, (await shop.balance(account))["balance"] - 10 * C)  # 10: a crossing
        await flush(shop)
        await reloads(shop).run_pass()
        await grant(shop, account, 50 * C)  # back above, so the next settle can cross again
    statuses = [r["status"] for r in await reload_rows(shop, account)]
    assert statuses == ["failed", "failed"]  # the third crossing found auto-reload off
    assert [e["failures"] for e in await events(shop, account, "reload.failed")] == [1, 2]
    (off,) = await events(shop, account, "reload.disabled")
    assert off["failures"] == 2
    view = await shop.admin("GET", f"/accounts/{account}/auto-reload")
    assert view["enabled"] is False
    assert view["disabled_reason"] == "2 reloads failed in a row"


async def test_a_failed_payment_webhook_fails_the_reload(shop: Sidecar, fake_stripe: FakeStripe) -> None:
    account, _ = await shop.account(100 * C)
    await saved_method(shop, account)
    await spend(shop, account, 90 * C)
    await flush(shop)
    await reloads(shop).run_pass()
    (intent,) = fake_stripe.intents.values()
    failed = {**intent, "status": "requires_payment_method", "last_payment_error": {"code": "expired_card"}}
    status, _ = await post_event(shop.client, event("payment_intent.payment_failed", failed))
    assert status == 200
    (row,) = await reload_rows(shop, account)
    assert row["status"] == "failed"
    assert "expired_card" in row["error"]
    assert (await shop.balance(account))["balance"] == 10 * C
    # Stripe says the money came after all (a retried payment): money received is credited, once
    status, _ = await post_event(shop.client, event("payment_intent.succeeded", intent))
    assert status == 200
    assert (await shop.balance(account))["balance"] == 60 * C
    assert [r["status"] for r in await reload_rows(shop, account)] == ["succeeded"]


async def test_a_client_cannot_name_a_payment_method(quiet: Sidecar) -> None:
    _, key = await quiet.account(C)
    body = {
        "enabled": True,
        "threshold": C,
        "credits": 5 * C,
        "method": "stripe",
        "stripe_payment_method": "pm_x",
    }
    resp = await quiet.client.put("/v1/credits/auto-reload", json=body, headers=auth(key))
    assert resp.status == 400
    assert (await resp.json())["error"]["param"] == "stripe_payment_method"
    del body["stripe_payment_method"]
    resp = await quiet.client.put("/v1/credits/auto-reload", json=body, headers=auth(key))
    assert resp.status == 400
    assert (await resp.json())["error"]["param"] == "method"


async def test_a_checkout_that_saves_the_card_lets_the_client_turn_on_auto_reload(
    shop: Sidecar, fake_stripe: FakeStripe
) -> None:
    account, key = await shop.account(0)
    reload = {"enabled": True, "threshold": 20 * C, "credits": 50 * C, "method": "stripe"}
    resp = await shop.client.put("/v1/credits/auto-reload", json=reload, headers=auth(key))
    assert resp.status == 400  # no saved card yet
    resp = await shop.client.post(
        "/v1/credits/checkout", json={"package": "starter", "save_payment_method": True}, headers=auth(key)
    )
    assert resp.status == 201
    made = await resp.json()
    session = fake_stripe.sessions[made["session_id"]]
    assert session["setup_future_usage"] == "off_session"
    assert session["customer_creation"] == "always"
    status, _ = await post_event(
        shop.client, event("checkout.session.completed", fake_stripe.pay(made["session_id"]))
    )
    assert status == 200
    resp = await shop.client.put("/v1/credits/auto-reload", json=reload, headers=auth(key))
    assert resp.status == 200, await resp.text()
    view = await resp.json()
    assert view["payment_method_saved"] is True
    await spend(shop, account, (await shop.balance(account))["balance"] - 10 * C)
    await flush(shop)
    await reloads(shop).run_pass()
    paid_with = fake_stripe.intents[fake_stripe.sessions[made["session_id"]]["payment_intent"]]
    (reload_intent,) = [
        i for i in fake_stripe.intents.values() if i["metadata"].get("charge") == "off_session"
    ]
    assert reload_intent["payment_method"] == paid_with["payment_method"]
    assert reload_intent["customer"] == session["customer"]
