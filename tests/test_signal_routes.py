"""Signal delivery in a running sidecar: the feature's worker on the supervisor, the admin event log
(list, one event with its deliveries and attempts, replay), contacts, the client's own events, and no
secret in a response or a log line."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

from sidecar.features import EVENTS
from sidecar.signals.events import Event
from sidecar.signals.routes import COURIER, DELIVERIES

from .conftest import Sidecar, SidecarFactory
from .support_signals import (
    SMTP_PASSWORD,
    WEBHOOK_SECRET,
    Clock,
    Receiver,
    Smtp,
    clock,
    low,
    receiver,
    smtp,
)

__all__ = ["clock", "receiver", "smtp"]  # fixtures


async def shop(make_sidecar: SidecarFactory, receiver: Receiver, clock: Clock, **more: Any) -> Sidecar:
    sidecar = await make_sidecar(
        signal_webhook_url=receiver.url,
        signal_webhook_secret=WEBHOOK_SECRET,
        signal_delivery_interval_seconds=3600,  # the tests step the worker themselves
        **more,
    )
    sidecar.client.app[DELIVERIES].clock = clock
    return sidecar


async def emit(sidecar: Sidecar, event: Event) -> None:
    async with sidecar.services.store.pool.acquire() as conn, conn.transaction():
        assert await sidecar.client.app[EVENTS].emit(conn, event)


async def test_the_worker_runs_on_the_supervisor(make_sidecar: SidecarFactory, receiver: Receiver) -> None:
    sidecar = await make_sidecar(
        signal_webhook_url=receiver.url,
        signal_webhook_secret=WEBHOOK_SECRET,
        signal_delivery_interval_seconds=0.05,
    )
    sidecar.client.app[DELIVERIES].clock = receiver.clock = Clock(sidecar.client.app[DELIVERIES].clock())
    account, _ = await sidecar.account(0)
    await emit(sidecar, low(account))
    async with asyncio.timeout(10):
        await receiver.arrived.wait()
    assert receiver.event_ids() == [low(account).id]


async def test_the_admin_event_log_and_replay(
    make_sidecar: SidecarFactory, receiver: Receiver, clock: Clock
) -> None:
    sidecar = await shop(make_sidecar, receiver, clock)
    account, _ = await sidecar.account(0)
    other, _ = await sidecar.account(0)
    receiver.statuses = [502]
    await emit(sidecar, low(account))
    courier = sidecar.client.app[COURIER]
    assert await courier.step() == 1  # the 502: retried later
    await emit(sidecar, low(other))
    assert await courier.step() == 1  # only the other's is due

    listed = await sidecar.admin("GET", f"/events?account={account}")
    assert [e["id"] for e in listed["data"]] == [low(account).id]
    assert len((await sidecar.admin("GET", "/events?limit=10"))["data"]) == 2
    one = await sidecar.admin("GET", f"/events/{low(account).id}")
    assert one["type"] == "balance.low"
    assert one["data"] == low(account).data
    [delivery] = one["deliveries"]
    assert delivery["channel"] == "webhook"
    assert delivery["target"] == receiver.url
    assert (delivery["status"], delivery["attempts"], delivery["last_error"]) == ("pending", 1, "HTTP 502")
    assert delivery["next_attempt_at"] > clock().isoformat()
    [tried] = delivery["log"]
    assert (tried["outcome"], tried["reply"], tried["at"]) == ("retry", "502", clock().isoformat())

    replayed = await sidecar.admin("POST", f"/events/{low(account).id}/replay")  # due now, not later
    assert replayed["deliveries"][0]["next_attempt_at"] == clock().isoformat()
    assert await courier.step() == 1
    after = await sidecar.admin("GET", f"/events/{low(account).id}")
    [delivery] = after["deliveries"]
    assert (delivery["status"], delivery["attempts"], delivery["last_error"]) == ("delivered", 2, None)
    assert [a["outcome"] for a in delivery["log"]] == ["retry", "delivered"]
    assert receiver.event_ids() == [low(account).id, low(other).id, low(account).id]
    scraped = await (await sidecar.health.get("/metrics")).text()
    assert 'creditgate_signal_deliveries_total{channel="webhook",outcome="retry"} 1.0' in scraped
    assert 'creditgate_signal_deliveries_total{channel="webhook",outcome="delivered"} 2.0' in scraped

    for path, status in [("/events/nope", 404), ("/events/nope/replay", 404), ("/events?limit=0", 400)]:
        method = "POST" if path.endswith("replay") else "GET"
        resp = await sidecar.client.request(method, f"/admin{path}", headers=sidecar.admin_headers())
        assert resp.status == status, path
        assert (await resp.json())["error"]["param"] in {"event_id", "limit"}
    resp = await sidecar.client.get("/admin/events")
    assert resp.status == 401


async def test_a_client_sees_its_own_events_and_sets_its_contact(
    make_sidecar: SidecarFactory, receiver: Receiver, clock: Clock
) -> None:
    sidecar = await shop(make_sidecar, receiver, clock)
    account, key = await sidecar.account(0)
    other, _ = await sidecar.account(0)
    await emit(sidecar, low(account))
    await emit(sidecar, low(other))
    auth = {"Authorization": f"Bearer {key}"}

    resp = await sidecar.client.get("/v1/credits/events", headers=auth)
    assert resp.status == 200
    assert [e["id"] for e in (await resp.json())["data"]] == [low(account).id]
    resp = await sidecar.client.get(f"/v1/credits/events/{low(other).id}", headers=auth)
    assert resp.status == 404  # another account's event is not found, not forbidden
    resp = await sidecar.client.get(f"/v1/credits/events/{low(account).id}", headers=auth)
    assert resp.status == 200
    # how it went, not where it went: the operator's URL (and addresses, errors) are not the client's
    assert (await resp.json())["deliveries"] == [
        {"channel": "webhook", "status": "pending", "attempts": 0, "delivered_at": None}
    ]
    assert (await sidecar.client.get("/v1/credits/events")).status == 401

    resp = await sidecar.client.put("/v1/credits/contact", json={"email": "me@example.org"}, headers=auth)
    assert resp.status == 200
    assert (await resp.json())["email"] == "me@example.org"
    resp = await sidecar.client.put("/v1/credits/contact", json={"email": "no at sign"}, headers=auth)
    assert resp.status == 400
    assert (await resp.json())["error"]["param"] == "email"
    assert (await sidecar.admin("GET", f"/accounts/{account}/contact"))["email"] == "me@example.org"
    await sidecar.admin("PUT", f"/accounts/{other}/contact", {"email": "them@example.org"})
    resp = await sidecar.client.get("/v1/credits/contact", headers=auth)
    assert (await resp.json())["email"] == "me@example.org"
    await sidecar.admin("PUT", f"/accounts/{account}/contact", {"email": None})
    assert (await sidecar.admin("GET", f"/accounts/{account}/contact"))["email"] is None
    resp = await sidecar.client.put(
        "/admin/accounts/missing/contact", json={"email": "a@b.c"}, headers=sidecar.admin_headers()
    )
    assert resp.status == 404


async def test_no_secret_in_a_response_or_a_log_line(
    make_sidecar: SidecarFactory,
    receiver: Receiver,
    clock: Clock,
    smtp: Smtp,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    sidecar = await shop(
        make_sidecar,
        receiver,
        clock,
        smtp_host="127.0.0.1",
        smtp_port=smtp.port,
        smtp_security="none",
        smtp_username="wrong-user",
        smtp_password=SMTP_PASSWORD,  # refused by the server: the failure is logged, the password not
        alert_email_to="ops@example.com",
    )
    account, key = await sidecar.account(0)
    receiver.statuses = [500]
    await emit(sidecar, low(account))
    assert await sidecar.client.app[COURIER].step() == 2
    seen = [
        await sidecar.admin("GET", "/events"),
        await sidecar.admin("GET", f"/events/{low(account).id}"),
        await sidecar.admin("POST", f"/events/{low(account).id}/replay"),
    ]
    resp = await sidecar.client.get(
        f"/v1/credits/events/{low(account).id}", headers={"Authorization": f"Bearer {key}"}
    )
    seen.append(await resp.json())
    text = repr(seen) + caplog.text
    statuses = {d["channel"]: d for d in seen[1]["deliveries"]}
    assert statuses["email"]["status"] == "pending"
    assert statuses["email"]["last_error"]
    assert "delivering event" in caplog.text  # the failures were logged
    assert WEBHOOK_SECRET not in text
    assert SMTP_PASSWORD not in text
