"""Recurring charges (issue 18): meters over real HTTP, Postgres and Redis (one node and the cluster), their
periods driven by a controlled clock (the worker takes `now` from it; nothing sleeps)."""

from __future__ import annotations

import asyncio
import logging
import uuid
from typing import Any

import pytest

from sidecar.app import FLUSHER, create_app
from sidecar.metering import meters_periods as periods
from sidecar.metering.meters_api import METERS, Meters
from sidecar.metering.meters_charges import MeterCharges
from sidecar.signals.events import EventLog, events_of

from .conftest import Sidecar, SidecarFactory, make_settings
from .support_wallet import T0, Clock

pytestmark = pytest.mark.topologies

CREDIT = 1_000_000
HOUR, DAY = periods.HOUR_MS, periods.DAY_MS


class Scene:
    def __init__(self, sc: Sidecar, clock: Clock) -> None:
        self.sc, self.clock = sc, clock
        self.meters: Meters = sc.client.app[METERS]
        self.meters.charges.clock = clock
        self.pool = sc.services.store.pool

    def worker(self) -> MeterCharges:
        """Another sidecar's worker: its own instance on the same Redis and Postgres."""
        c = self.meters.charges
        return MeterCharges(c.balances, self.pool, EventLog(), marker_ms=c.marker_ms, clock=self.clock)

    async def account(self, micro: int) -> tuple[str, dict[str, str]]:
        account, key = await self.sc.account(micro)
        return account, {"Authorization": f"Bearer {key}"}

    async def create(self, headers: dict[str, str], body: dict[str, Any], status: int = 201) -> Any:
        resp = await self.sc.client.post("/v1/meters", json=body, headers=headers)
        data = await resp.json()
        assert resp.status == status, data
        return data

    async def get(self, headers: dict[str, str], meter_id: str) -> Any:
        resp = await self.sc.client.get(f"/v1/meters/{meter_id}", headers=headers)
        assert resp.status == 200
        return await resp.json()

    async def available(self, account: str) -> int:
        return await self.sc.balances.available(account)

    async def charged(self, meter_id: str) -> list[int]:
        rows = await self.pool.fetch(
            "SELECT period FROM meter_charges WHERE meter_id = $1 AND state = 'charged' ORDER BY period",
            meter_id,
        )
        return [r["period"] for r in rows]

    async def events(self, account: str, type_: str) -> list[str]:
        async with self.pool.acquire() as conn:
            return sorted(e.id for e in await events_of(conn, account) if e.type == type_)

    async def top_up(self, account: str, micro: int) -> None:
        path = f"/accounts/{account}/grants"
        await self.sc.admin("POST", path, {"amount": micro}, **{"Idempotency-Key": uuid.uuid4().hex})


@pytest.fixture
async def scene(make_sidecar: SidecarFactory) -> Scene:
    return Scene(await make_sidecar(meter_charge_interval_seconds=0), Clock())


async def test_each_period_is_charged_once_by_two_workers(scene: Scene) -> None:
    account, headers = await scene.account(100 * CREDIT)
    m = await scene.create(headers, {"resource_id": "ctr-1", "price": CREDIT, "period": "day", "quantity": 2})
    assert m["status"] == "running"
    assert m["charged_periods"] == 1
    assert await scene.available(account) == 98 * CREDIT
    scene.clock.now = T0 + 3 * DAY  # periods 1, 2 and 3 have started
    one, two = scene.worker(), scene.worker()
    results = await asyncio.gather(one.run_pass(scene.clock.now), two.run_pass(scene.clock.now))
    assert sum(r["charged"] for r in results) == 3
    await asyncio.gather(one.run_pass(scene.clock.now), two.run_pass(scene.clock.now))  # nothing new
    assert await scene.charged(m["id"]) == [0, 1, 2, 3]
    assert await scene.available(account) == 92 * CREDIT
    got = await scene.get(headers, m["id"])
    assert (got["next_period"], got["next_charge_ms"]) == (4, T0 + 4 * DAY)
    assert got["charged_total"] == 8 * CREDIT
    # The statement: one ledger row per period, naming the meter and the period.
    await scene.sc.client.app[FLUSHER].drain()
    rows = await scene.pool.fetch(
        "SELECT idempotency_id, amount, tags FROM ledger WHERE account_id = $1 AND route = 'meter'"
        " ORDER BY idempotency_id",
        account,
    )
    assert [r["idempotency_id"] for r in rows] == [f"meter:{m['id']}:{n}" for n in range(4)]
    assert {r["amount"] for r in rows} == {-2 * CREDIT}
    assert f"meter={m['id']}" in rows[0]["tags"]
    assert "period=0" in rows[0]["tags"]


async def test_a_restart_between_redis_and_postgres_charges_once(scene: Scene) -> None:
    account, headers = await scene.account(10 * CREDIT)
    m = await scene.create(headers, {"resource_id": "disk", "price": CREDIT, "period": 3600})
    scene.clock.now = T0 + HOUR
    crashed = scene.worker()
    [claimed] = await crashed._claim(scene.clock.now, set())  # step 1: the pending record, committed
    row = await scene.pool.fetchrow("SELECT * FROM meter_charges WHERE meter_id = $1 AND period = 1", m["id"])
    assert row is not None
    moved = await crashed._move(claimed, 1, row["amount"], row["starts_ms"], row["window_end_ms"], T0)
    assert moved is True  # Redis charged; the process dies before Postgres records it
    assert await scene.available(account) == 8 * CREDIT
    assert await scene.charged(m["id"]) == [0]
    result = await scene.worker().run_pass(scene.clock.now)  # restarted: it finds the settled marker
    assert result["charged"] == 1
    assert await scene.charged(m["id"]) == [0, 1]
    assert await scene.available(account) == 8 * CREDIT  # not twice
    # Past the marker's window the ledger is the witness: a charged period is only recorded.
    scene.clock.now = T0 + 2 * HOUR
    [claimed] = await crashed._claim(scene.clock.now, set())
    row = await scene.pool.fetchrow("SELECT * FROM meter_charges WHERE meter_id = $1 AND period = 2", m["id"])
    assert row is not None
    assert await crashed._move(claimed, 2, row["amount"], row["starts_ms"], row["window_end_ms"], T0)
    await scene.sc.client.app[FLUSHER].drain()
    await scene.pool.execute("UPDATE meter_charges SET window_end_ms = 1 WHERE meter_id = $1", m["id"])
    assert (await scene.worker().run_pass(scene.clock.now))["charged"] == 1
    assert await scene.available(account) == 7 * CREDIT
    # ... and an ended window without a ledger row was never charged: a new window, charged once.
    scene.clock.now = T0 + 3 * HOUR
    await scene.worker()._claim(scene.clock.now, set())
    await scene.pool.execute("UPDATE meter_charges SET window_end_ms = 1 WHERE meter_id = $1", m["id"])
    assert (await scene.worker().run_pass(scene.clock.now))["charged"] == 1
    assert await scene.charged(m["id"]) == [0, 1, 2, 3]
    assert await scene.available(account) == 6 * CREDIT


async def test_stop_charges_no_later_period(scene: Scene) -> None:
    account, headers = await scene.account(10 * CREDIT)
    m = await scene.create(headers, {"resource_id": "vm", "price": CREDIT, "period": "hour"})
    scene.clock.now = T0 + HOUR + HOUR // 2  # in period 1, which no pass charged yet
    resp = await scene.sc.client.post(f"/v1/meters/{m['id']}/stop", headers=headers)
    stopped = await resp.json()
    assert resp.status == 200
    assert stopped["status"] == "stopped"
    assert stopped["charged_periods"] == 2
    scene.clock.now = T0 + 10 * HOUR
    assert (await scene.worker().run_pass(scene.clock.now))["charged"] == 0
    assert await scene.charged(m["id"]) == [0, 1]
    assert await scene.available(account) == 8 * CREDIT
    again = await scene.sc.client.post(f"/v1/meters/{m['id']}/stop", headers=headers)
    assert (await again.json())["stopped_ms"] == stopped["stopped_ms"]


async def test_a_one_time_fee_is_charged_once(scene: Scene) -> None:
    account, headers = await scene.account(10 * CREDIT)
    m = await scene.create(headers, {"resource_id": "deploy-7", "price_name": "deployment-fee"})
    assert (m["kind"], m["price"], m["next_charge_ms"]) == ("one_time", 5 * CREDIT, None)
    for days in (1, 40, 400):
        scene.clock.now = T0 + days * DAY
        await scene.worker().run_pass(scene.clock.now)
    assert await scene.charged(m["id"]) == [0]
    assert await scene.available(account) == 5 * CREDIT


async def test_unpaid_then_top_up(scene: Scene) -> None:
    account, headers = await scene.account(2 * CREDIT)
    m = await scene.create(headers, {"resource_id": "gb", "price_name": "storage-gb-day", "quantity": 100})
    scene.clock.now = T0 + DAY  # 1 credit a day: the second day empties the account, the third cannot be paid
    await scene.worker().run_pass(scene.clock.now)
    assert (await scene.get(headers, m["id"]))["status"] == "running"
    scene.clock.now = T0 + 2 * DAY + HOUR
    assert (await scene.worker().run_pass(scene.clock.now))["unpaid"] == 1
    assert await scene.available(account) == 0  # not charged partially
    scene.clock.now = T0 + 2 * DAY + 2 * HOUR
    await scene.worker().run_pass(scene.clock.now)  # tried again, still unpaid: no second event
    got = await scene.get(headers, m["id"])
    assert (got["status"], got["next_period"]) == ("unpaid", 2)
    assert await scene.events(account, "meter.unpaid") == [f"meter.unpaid:{m['id']}:2"]
    await scene.top_up(account, 3 * CREDIT // 2)
    assert (await scene.worker().run_pass(scene.clock.now))["charged"] == 1
    got = await scene.get(headers, m["id"])
    assert (got["status"], got["next_period"]) == ("running", 3)
    assert await scene.available(account) == CREDIT // 2


async def test_low_runway_fires_once_per_crossing_and_rearms(scene: Scene) -> None:
    account, headers = await scene.account(100 * CREDIT)
    await scene.create(headers, {"resource_id": "gpu", "price": CREDIT, "period": "hour"})
    worker = scene.worker()
    scene.clock.now = T0 + 10 * HOUR  # 89 left, 48 needed
    await worker.run_pass(scene.clock.now)
    assert await scene.events(account, "balance.low_runway") == []
    for hours in (52, 53, 60):  # the next 48 h cost 47: 46 left at 53 h is below; then lower still
        scene.clock.now = T0 + hours * HOUR
        await worker.run_pass(scene.clock.now)
        await scene.worker().run_pass(scene.clock.now)  # a second sidecar observing the same pass
    assert await scene.events(account, "balance.low_runway") == [f"balance.low_runway:{account}:1"]
    await scene.top_up(account, 100 * CREDIT)
    await worker.run_pass(scene.clock.now + 1)  # re-armed: 139 left
    scene.clock.now = T0 + 160 * HOUR  # 39 left
    await worker.run_pass(scene.clock.now)
    assert await scene.events(account, "balance.low_runway") == [
        f"balance.low_runway:{account}:1",
        f"balance.low_runway:{account}:2",
    ]


async def test_no_meter_without_funds_for_its_first_period(scene: Scene) -> None:
    account, headers = await scene.account(CREDIT // 2)
    refused = await scene.create(headers, {"resource_id": "c", "price": CREDIT}, status=402)
    assert refused["error"]["type"] == "insufficient_quota"
    assert refused["error"]["required"] == CREDIT
    resp = await scene.sc.client.get("/v1/meters", headers=headers)
    assert (await resp.json())["data"] == []
    assert await scene.available(account) == CREDIT // 2


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"price": 1}, "resource_id"),
        ({"resource_id": "", "price": 1}, "resource_id"),
        ({"resource_id": "r"}, "price"),
        ({"resource_id": "r", "price": -5}, "price"),
        ({"resource_id": "r", "price": 1, "period": "week"}, "period"),
        ({"resource_id": "r", "price": 1, "period": 5}, "period"),
        ({"resource_id": "r", "price": 1, "quantity": 0}, "quantity"),
        ({"resource_id": "r", "price": 10**14, "quantity": 10}, "quantity"),
        ({"resource_id": "r", "price_name": "gold-bar"}, "price_name"),
        ({"resource_id": "r", "price_name": "container-day", "price": 3}, "price"),
        ({"resource_id": "r", "price": 1, "kind": "weekly"}, "kind"),
        ({"resource_id": "r", "price": 1, "colour": "red"}, "colour"),
    ],
)
async def test_bad_input_names_the_field(scene: Scene, body: dict[str, Any], field: str) -> None:
    account, headers = await scene.account(10 * CREDIT)
    error = (await scene.create(headers, body, status=400))["error"]
    assert error["param"] == field, error
    assert await scene.available(account) == 10 * CREDIT


async def test_the_same_resource_id_replays_or_conflicts(scene: Scene) -> None:
    account, headers = await scene.account(10 * CREDIT)
    body = {"resource_id": "ctr", "price_name": "container-day"}
    first = await scene.create(headers, body)
    again = await scene.create(headers, body, status=200)
    assert again["id"] == first["id"]
    assert again["charged_periods"] == 1
    conflict = await scene.create(headers, {**body, "quantity": 2}, status=409)
    assert conflict["error"]["param"] == "resource_id"
    assert await scene.available(account) == 9 * CREDIT
    _other, other_headers = await scene.account(0)
    resp = await scene.sc.client.get(f"/v1/meters/{first['id']}", headers=other_headers)
    assert resp.status == 404  # another account's meter is not found


async def test_admin_meters(scene: Scene) -> None:
    account, _ = await scene.account(10 * CREDIT)
    made = await scene.sc.admin("POST", f"/accounts/{account}/meters", {"resource_id": "a", "price": 7})
    listed = await scene.sc.admin("GET", f"/accounts/{account}/meters")
    assert [m["id"] for m in listed["data"]] == [made["id"]]
    stopped = await scene.sc.admin("POST", f"/accounts/{account}/meters/{made['id']}/stop")
    assert stopped["status"] == "stopped"
    resp = await scene.sc.client.get("/admin/accounts/nobody/meters", headers=scene.sc.admin_headers())
    assert resp.status == 404


def test_period_arithmetic() -> None:
    jan31 = 1_801_353_600_000  # 2027-01-31T00:00:00Z
    feb = periods.start_of(jan31, "month", 1)
    mar = periods.start_of(jan31, "month", 2)
    assert (feb - jan31) // DAY == 28
    assert (mar - jan31) // DAY == 59
    assert periods.index_at(jan31, "month", feb - 1) == 0
    assert periods.index_at(jan31, "month", feb) == 1
    assert periods.index_at(jan31, "month", mar) == 2
    assert periods.index_at(T0, "day", T0 - 1) == -1
    assert periods.starts_within("period", T0, "hour", 1, T0 + 48 * HOUR) == 47
    assert periods.starts_within("period", T0, "hour", 1, T0 + 48 * HOUR, stopped_ms=T0 + 3 * HOUR) == 2
    assert periods.starts_within("one_time", T0, "day", 1, T0 + 48 * HOUR) == 0
    assert periods.next_due("period", T0, "90s", 2, None) == T0 + 180_000
    with pytest.raises(ValueError, match="period"):
        periods.period_of("fortnight")


async def test_the_worker_runs_where_node_tasks_run(
    redis_url: str, database_url: str, aiohttp_client: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="creditgate.app")
    for node_tasks in (True, False):
        caplog.clear()
        settings = make_settings(redis_url, database_url, meter_charge_interval_seconds=30)
        client = await aiohttp_client(create_app(settings, node_tasks=node_tasks))
        [started] = [r.getMessage() for r in caplog.records if r.getMessage().startswith("background tasks")]
        assert ("meter-charges" in started.split(", ")) is node_tasks, started
        await client.close()
