"""Signal delivery end to end on real Postgres, a real webhook receiver and a real SMTP server: the
fan-out in the emitting transaction, signed POSTs, retries by the schedule on a controlled clock, the
give-up after the window, replay, restart, several workers on one table, email."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging

import asyncpg
import pytest

from sidecar.config import load_settings
from sidecar.errors import ConfigError
from sidecar.logs import formatter, secrets_of
from sidecar.signals.events import Event
from sidecar.signals.schedule import Schedule

from .support_signals import (
    SMTP_PASSWORD,
    SMTP_USER,
    WEBHOOK_SECRET,
    Clock,
    Receiver,
    Smtp,
    attempts_of,
    clock,
    deliveries_of,
    emit,
    low,
    pool,
    receiver,
    signal_settings,
    smtp,
    worker,
)

__all__ = ["clock", "pool", "receiver", "smtp"]  # fixtures


def hooked(receiver: Receiver, **overrides: object) -> dict[str, object]:
    return {"signal_webhook_url": receiver.url, "signal_webhook_secret": WEBHOOK_SECRET, **overrides}


async def test_an_event_is_posted_signed_once(pool: asyncpg.Pool, receiver: Receiver, clock: Clock) -> None:
    w = worker(pool, signal_settings(**hooked(receiver)), clock)
    event = low()
    assert await emit(pool, w.log, event)
    assert not await emit(pool, w.log, event)  # the same cause again: one event, one delivery
    assert len(await deliveries_of(pool, event.id)) == 1

    assert await w.courier.step() == 1
    assert receiver.rejected == []
    assert receiver.event_ids() == [event.id]
    got = receiver.received[0]
    assert got.headers["creditgate-event-type"] == "balance.low"
    assert got.signed_at == int(clock().timestamp())
    body = receiver.bodies()[0]
    assert body["id"] == event.id
    assert body["account"] == "acct-1"
    assert body["data"] == event.data
    assert body["created_at"] is not None
    [row] = await deliveries_of(pool, event.id)
    assert (row["status"], row["attempts"], row["delivered_at"]) == ("delivered", 1, clock())
    [attempt] = await attempts_of(pool, row["delivery_id"])
    assert (attempt["outcome"], attempt["reply"], attempt["error"]) == ("delivered", "200", None)
    assert await w.courier.step() == 0  # nothing more to send


async def test_a_wrong_secret_is_refused_by_the_receiver(
    pool: asyncpg.Pool, receiver: Receiver, clock: Clock
) -> None:
    """The receiver's check is real: a POST signed with another secret is a 400, retried."""
    w = worker(pool, signal_settings(**hooked(receiver, signal_webhook_secret="another-secret-value")), clock)
    await emit(pool, w.log, low())
    await w.courier.step()
    assert receiver.rejected == ["bad_signature"]
    assert receiver.received == []
    [row] = await deliveries_of(pool, low().id)
    assert (row["status"], row["last_error"]) == ("pending", "HTTP 400")


async def test_failures_are_retried_by_the_schedule_until_delivered(
    pool: asyncpg.Pool, receiver: Receiver, clock: Clock
) -> None:
    settings = signal_settings(**hooked(receiver))
    w = worker(pool, settings, clock)
    schedule = Schedule(30, 3600, dt.timedelta(hours=24))
    receiver.statuses = [500, 503]
    event = low()
    await emit(pool, w.log, event)
    start = clock()
    [row] = await deliveries_of(pool, event.id)
    expected = [start]
    for failures in (1, 2):
        assert await w.courier.step() == 1
        [row] = await deliveries_of(pool, event.id)
        due = schedule.after_failure(row["delivery_id"], failures, start, clock())
        assert due is not None
        assert (row["status"], row["attempts"], row["next_attempt_at"]) == ("pending", failures, due)
        # the delay doubles (with jitter: between half and all of 30 s, then of 60 s)
        assert 15 * 2 ** (failures - 1) <= (due - clock()).total_seconds() <= 30 * 2 ** (failures - 1)
        clock.to(due - dt.timedelta(seconds=1))
        assert await w.courier.step() == 0  # not due yet
        clock.to(due)
        expected.append(due)
    assert await w.courier.step() == 1
    [row] = await deliveries_of(pool, event.id)
    assert row["status"] == "delivered"
    assert row["attempts"] == 3
    log = await attempts_of(pool, row["delivery_id"])
    assert [a["reply"] for a in log] == ["500", "503", "200"]
    assert [a["outcome"] for a in log] == ["retry", "retry", "delivered"]
    assert [a["attempted_at"] for a in log] == expected
    assert receiver.event_ids() == [event.id] * 3


async def test_a_delivery_is_given_up_after_the_retry_window(
    pool: asyncpg.Pool, receiver: Receiver, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    w = worker(pool, signal_settings(**hooked(receiver)), clock)
    receiver.statuses = [500] * 1000
    event = low()
    await emit(pool, w.log, event)
    start = clock()
    for _ in range(200):  # bounded: a delivery never given up fails the test, not hangs it
        assert await w.courier.step() == 1
        [row] = await deliveries_of(pool, event.id)
        if row["status"] != "pending":
            break
        assert row["next_attempt_at"] <= start + dt.timedelta(hours=24)
        clock.to(row["next_attempt_at"])
    assert row["status"] == "failed"
    log = await attempts_of(pool, row["delivery_id"])
    assert log[-1]["attempted_at"] == start + dt.timedelta(hours=24)  # retried for the whole day
    assert all(a["outcome"] == "retry" for a in log[:-1])
    assert log[-1]["outcome"] == "failed"
    assert 25 <= len(log) <= 60  # doubling to the 1 h cap: about 30 tries in a day
    clock.advance(86_400)
    assert await w.courier.step() == 0  # given up: never sent again
    assert "gave up delivering event balance.low:acct-1:r1:1 by webhook" in caplog.text
    assert WEBHOOK_SECRET not in caplog.text


async def test_replay_queues_again_and_the_log_keeps_history(
    pool: asyncpg.Pool, receiver: Receiver, clock: Clock
) -> None:
    w = worker(pool, signal_settings(**hooked(receiver)), clock)
    event = low()
    await emit(pool, w.log, event)
    await w.courier.step()
    clock.advance(3600)
    stored = await _stored(pool, event.id)
    await w.deliveries.replay(stored)
    await w.deliveries.replay(stored)  # twice: still one delivery queued
    assert await w.courier.step() == 1
    assert await w.courier.step() == 0
    [row] = await deliveries_of(pool, event.id)
    assert (row["status"], row["attempts"], row["delivered_at"]) == ("delivered", 2, clock())
    assert [a["outcome"] for a in await attempts_of(pool, row["delivery_id"])] == ["delivered"] * 2
    assert receiver.event_ids() == [event.id] * 2  # the same event id: a receiver can tell it is a replay


async def _stored(pool: asyncpg.Pool, event_id: str) -> Event:
    from sidecar.signals.events import event

    async with pool.acquire() as conn:
        found = await event(conn, event_id)
    assert found is not None
    return found


async def test_a_new_worker_picks_up_what_a_stopped_one_left(
    pool: asyncpg.Pool, receiver: Receiver, clock: Clock
) -> None:
    settings = signal_settings(**hooked(receiver))
    first = worker(pool, settings, clock)
    await emit(pool, first.log, low(n=1))
    await emit(pool, first.log, low(n=2))
    # the first worker leases one delivery and dies before sending it
    leased = await first.deliveries.claim(clock(), first.courier.lease, 1)
    assert len(leased) == 1
    second = worker(pool, settings, clock)  # a restart: nothing but Postgres is shared
    assert await second.courier.step() == 1  # the one not leased
    clock.advance(first.courier.lease.total_seconds())
    assert await second.courier.step() == 1  # the lease ran out: due again
    assert sorted(receiver.event_ids()) == [low(n=1).id, low(n=2).id]


async def test_two_workers_on_one_table_deliver_each_event_once(
    database_url: str, pool: asyncpg.Pool, receiver: Receiver, clock: Clock
) -> None:
    settings = signal_settings(**hooked(receiver, signal_delivery_batch=7))
    first = worker(pool, settings, clock)
    events = [low(f"acct-{i % 3}", i) for i in range(40)]
    for event in events:
        await emit(pool, first.log, event)
    other_pool = await asyncpg.create_pool(database_url, min_size=1, max_size=4)
    try:
        second = worker(other_pool, settings, clock)
        for _ in range(10):
            await asyncio.gather(first.courier.step(), second.courier.step(), first.courier.step())
    finally:
        await other_pool.close()
    assert sorted(receiver.event_ids()) == sorted(e.id for e in events)
    assert first.courier.sent["delivered"] > 0
    assert second.courier.sent["delivered"] > 0


async def test_a_row_another_worker_holds_is_skipped_not_waited_for(
    pool: asyncpg.Pool, receiver: Receiver, clock: Clock
) -> None:
    w = worker(pool, signal_settings(**hooked(receiver)), clock)
    await emit(pool, w.log, low(n=1))
    await emit(pool, w.log, low(n=2))
    [held] = await deliveries_of(pool, low(n=1).id)
    async with pool.acquire() as other, other.transaction():  # another sidecar mid-claim
        await other.execute(
            "SELECT 1 FROM signal_deliveries WHERE delivery_id = $1 FOR UPDATE", held["delivery_id"]
        )
        async with asyncio.timeout(5):  # a claim that waited for the lock would hang here
            assert await w.courier.step() == 1
    assert receiver.event_ids() == [low(n=2).id]
    assert await w.courier.step() == 1  # released: now it is claimed
    assert receiver.event_ids() == [low(n=2).id, low(n=1).id]


async def test_a_receiver_too_slow_or_gone_is_retried(
    pool: asyncpg.Pool, receiver: Receiver, clock: Clock
) -> None:
    receiver.stall = asyncio.Event()
    w = worker(pool, signal_settings(**hooked(receiver, signal_webhook_timeout_seconds=0.3)), clock)
    await emit(pool, w.log, low())
    assert await w.courier.step() == 1  # the receiver answers nothing in time
    receiver.stall.set()
    [row] = await deliveries_of(pool, low().id)
    assert (row["status"], row["last_error"]) == ("pending", "TimeoutError")
    [attempt] = await attempts_of(pool, row["delivery_id"])
    assert attempt["reply"] is None
    assert attempt["duration_ms"] >= 250

    gone = worker(pool, signal_settings(**hooked(receiver, signal_webhook_url="http://127.0.0.1:9/x")), clock)
    await emit(pool, gone.log, low(n=2))
    assert await gone.courier.step() == 1
    [row] = await deliveries_of(pool, low(n=2).id)
    assert row["status"] == "pending"
    assert row["last_error"].startswith("ClientConnectorError")


async def test_an_event_type_not_chosen_is_not_delivered(
    pool: asyncpg.Pool, receiver: Receiver, clock: Clock
) -> None:
    w = worker(pool, signal_settings(**hooked(receiver, signal_webhook_events=["reload.failed"])), clock)
    await emit(pool, w.log, low())
    await emit(
        pool, w.log, Event(id="reload.failed:acct-1:r9", type="reload.failed", account="acct-1", data={})
    )
    await w.courier.step()
    assert receiver.event_ids() == ["reload.failed:acct-1:r9"]


async def test_email_goes_to_the_operator_and_the_account_contact(
    pool: asyncpg.Pool, smtp: Smtp, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    settings = signal_settings(
        smtp_host="127.0.0.1",
        smtp_port=smtp.port,
        smtp_security="none",
        smtp_username=SMTP_USER,
        smtp_password=SMTP_PASSWORD,
        smtp_from="billing@example.com",
        alert_email_to="ops@example.com",
    )
    w = worker(pool, settings, clock)
    await pool.execute("INSERT INTO accounts (id) VALUES ('acct-1')")
    assert await w.deliveries.set_contact("acct-1", "owner@example.org")
    assert not await w.deliveries.set_contact("nobody", "x@example.org")
    event = low()
    await emit(pool, w.log, event)
    assert await w.courier.step() == 2
    assert sorted(m.rcpt_tos[0] for m in smtp.sink.messages) == ["ops@example.com", "owner@example.org"]
    assert smtp.sink.logins == [SMTP_USER, SMTP_USER]
    text = smtp.sink.messages[0].content
    assert isinstance(text, bytes)
    assert b"Subject: [creditgate] Credit balance is low (account acct-1)" in text
    assert b"available: 4000000" in text
    assert event.id.encode() in text
    rows = await deliveries_of(pool, event.id)
    assert [r["status"] for r in rows] == ["delivered", "delivered"]
    [attempt] = await attempts_of(pool, rows[0]["delivery_id"])
    assert attempt["reply"].startswith("2.0.0 queued") or "queued" in attempt["reply"]
    assert SMTP_PASSWORD not in caplog.text


async def test_a_refused_recipient_is_retried_with_the_servers_reply(
    pool: asyncpg.Pool, smtp: Smtp, clock: Clock
) -> None:
    settings = signal_settings(
        smtp_host="127.0.0.1", smtp_port=smtp.port, smtp_security="none", alert_email_to="ops@example.com"
    )
    smtp.sink.refuse.add("ops@example.com")
    w = worker(pool, settings, clock)
    await emit(pool, w.log, low())
    await w.courier.step()
    [row] = await deliveries_of(pool, low().id)
    assert row["status"] == "pending"
    assert "mailbox unavailable" in row["last_error"]
    smtp.sink.refuse.clear()
    clock.to(row["next_attempt_at"])
    await w.courier.step()
    [row] = await deliveries_of(pool, low().id)
    assert row["status"] == "delivered"
    assert len(smtp.sink.messages) == 1


def test_a_webhook_url_needs_its_secret_and_a_day_of_retries() -> None:
    with pytest.raises(ConfigError) as missing:
        signal_settings(signal_webhook_url="https://hooks.example.com/in")
    assert missing.value.param == "signal_webhook_secret"
    with pytest.raises(ConfigError) as bad_url:
        signal_settings(signal_webhook_url="ftp://x", signal_webhook_secret="s")
    assert bad_url.value.param == "signal_webhook_url"
    with pytest.raises(ConfigError) as half_login:
        signal_settings(smtp_host="mail", smtp_username="u")
    assert half_login.value.param == "smtp_password"
    with pytest.raises(ConfigError) as address:
        signal_settings(alert_email_to="not an address")
    assert address.value.param == "alert_email_to"
    with pytest.raises(ConfigError) as short:
        load_settings(environ={"CREDITGATE_SIGNAL_RETRY_HOURS": "12"})
    assert short.value.param == "signal_retry_hours"
    loaded = load_settings(environ={"CREDITGATE_SIGNAL_WEBHOOK_EVENTS": "balance.low,reload.failed"})
    assert loaded.signal_webhook_events == ["balance.low", "reload.failed"]


def test_the_settings_line_at_debug_shows_no_signal_secret() -> None:
    """At DEBUG the settings in effect are logged; the formatter redacts the webhook secret, the SMTP
    password and a password in the webhook URL."""
    settings = signal_settings(
        signal_webhook_url="https://hooks:url-pass-789@hooks.example.com/in",
        signal_webhook_secret=WEBHOOK_SECRET,
        smtp_host="mail.example.com",
        smtp_username=SMTP_USER,
        smtp_password=SMTP_PASSWORD,
    )
    assert {WEBHOOK_SECRET, SMTP_PASSWORD, "url-pass-789"} <= set(secrets_of(settings))
    line = logging.LogRecord("t", logging.DEBUG, __file__, 1, "settings: %s", (repr(settings),), None)
    out = formatter(settings).format(line)
    assert "signal_webhook_secret" in out
    for secret in (WEBHOOK_SECRET, SMTP_PASSWORD, "url-pass-789"):
        assert secret not in out
