"""Failover on a Redis Cluster of this module's own (never the session's shared one): a graceful
``CLUSTER FAILOVER`` and a SIGKILLed master under steady load (every answer a 200 or an OpenAI-shaped 503,
no request charged twice, the books balanced afterwards), WAIT after settle (``settle_wait_replicas``),
and what asynchronous replication loses when a master dies before its replica has a settle, and what
reconcile makes of it (docs/scaling.md, *Failover*)."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import signal
import subprocess
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import pytest
import redis
from redis.crc import key_slot

from sidecar.app import PROXY
from sidecar.autopipeline import AutoPipeline
from sidecar.keys import KeySpace
from sidecar.reconcile import reconcile
from sidecar.repair import repair

from .conftest import Sidecar, SidecarFactory, new_key_prefix
from .support import settled
from .support_cluster import LocalCluster

DEADLINE = 30.0  # seconds any cluster state change may take (node timeout 3 s, then the election)
GRANT = 10**12
CLIENTS = 32
BEFORE, AFTER = 60, 100  # requests answered before the failover starts, and after it is over
BODY = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hello world"}], "max_tokens": 8}


@pytest.fixture(scope="module")
def failover_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """A 6-node cluster for this module alone: its tests fail masters over and kill them."""
    cluster = LocalCluster(tmp_path_factory.mktemp("failover-cluster"))
    cluster.start()
    try:
        end = time.monotonic() + DEADLINE
        while not cluster_settled(cluster):  # each replica's first sync done, not only the slots ok
            assert time.monotonic() < end, "the replicas never synced"
            time.sleep(0.05)  # a poll interval
        yield cluster
    finally:
        for process in cluster.processes:  # none may stay stopped: stop() would wait on it
            if process.poll() is None:
                process.send_signal(signal.SIGCONT)
        cluster.stop()


@pytest.fixture
def redis_url(request: pytest.FixtureRequest) -> str:
    """make_sidecar's Redis: this module's cluster, or (parametrized "single") the session's one Redis."""
    if getattr(request, "param", "cluster") == "single":
        return str(request.getfixturevalue("single_redis_url"))
    cluster: LocalCluster = request.getfixturevalue("failover_cluster")
    return cluster.url


# ---- the cluster's state, read from the nodes that are alive --------------------------------------------


def _client(port: int) -> redis.Redis:
    return redis.Redis(port=port, socket_timeout=1, socket_connect_timeout=1)


def _alive(cluster: LocalCluster, port: int) -> bool:
    return cluster.processes[cluster.ports.index(port)].poll() is None


def _process(cluster: LocalCluster, port: int) -> subprocess.Popen[bytes]:
    return cluster.processes[cluster.ports.index(port)]


def _replication(port: int) -> dict[str, Any]:
    with _client(port) as c:
        return dict(c.info("replication"))


def owner_of(cluster: LocalCluster, slot: int) -> int:
    """The port of the master serving `slot`, as the first live node sees it."""
    for port in cluster.ports:
        if not _alive(cluster, port):
            continue
        with _client(port) as c:
            for start, end, primary, *_ in c.execute_command("CLUSTER SLOTS"):
                if int(start) <= slot <= int(end):
                    return int(primary[1])
    raise AssertionError(f"no live node maps slot {slot}")


def replica_of(cluster: LocalCluster, master: int) -> int | None:
    """The port of `master`'s live replica, if it has one."""
    for port in cluster.ports:
        if port != master and _alive(cluster, port):
            info = _replication(port)
            if info["role"] == "slave" and int(info["master_port"]) == master:
                return port
    return None


def cluster_settled(cluster: LocalCluster) -> bool:
    """Every live node says the cluster is ok, every live replica's link to its master is up, and every
    master has its replicas online (a replica's first sync ends with its first ack, up to 1 s later)."""
    for port in cluster.ports:
        if not _alive(cluster, port):
            continue
        try:
            with _client(port) as c:
                info = c.execute_command("CLUSTER INFO")
            if str(info.get("cluster_state")) != "ok" or str(info.get("cluster_slots_ok")) != "16384":
                return False
            replication = _replication(port)
        except redis.RedisError:
            return False
        if replication["role"] == "slave" and replication.get("master_link_status") != "up":
            return False
        links = [v for name, v in replication.items() if name.startswith("slave") and isinstance(v, dict)]
        if any(link.get("state") != "online" or not int(link.get("offset", 0)) for link in links):
            return False  # as the master sees its replicas: online, and acknowledging a real offset
    return True


async def poll(condition: Callable[[], bool], what: str, deadline: float = DEADLINE) -> None:
    """Wait until `condition()` holds (read in a thread: the event loop keeps serving the load)."""
    end = time.monotonic() + deadline
    while not await asyncio.to_thread(condition):
        if time.monotonic() > end:
            raise AssertionError(f"{what}: not within {deadline} s")
        await asyncio.sleep(0.05)  # a poll interval, not a stand-in for synchronisation


def account_on(cluster: LocalCluster, sc: Sidecar) -> tuple[str, int]:
    """A new account id whose slot a master with a live replica serves: (id, slot)."""
    keys = KeySpace(sc.settings.key_prefix, sc.settings.partitions)
    while True:
        account = f"a{uuid.uuid4().hex[:8]}"
        slot = key_slot(keys.account(account).balance.encode())
        if replica_of(cluster, owner_of(cluster, slot)) is not None:
            return account, slot


# ---- the load ------------------------------------------------------------------------------------------


@dataclass
class Load:
    sc: Sidecar
    key: str
    answers: list[tuple[int, str, Any]] = field(default_factory=list)  # status, request id, body
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def one(self, n: int) -> None:
        streamed = n % 2 == 1
        headers = {"Authorization": f"Bearer {self.key}", "x-demo-delay-ms": "20"}
        body = {**BODY, "stream": True, "stream_options": {"include_usage": True}} if streamed else BODY
        resp = await self.sc.client.post("/v1/chat/completions", json=body, headers=headers)
        if resp.status == 200 and streamed:
            raw = await resp.read()
            assert raw.rstrip().endswith(b"data: [DONE]"), raw[-200:]
            answer: Any = raw
        else:
            answer = await resp.json()
        self.answers.append((resp.status, resp.headers.get("x-request-id", ""), answer))

    async def client(self, offset: int) -> None:
        n = offset
        while not self.stop.is_set():
            await self.one(n)
            n += CLIENTS

    async def during(self, event: Callable[[], Awaitable[None]]) -> None:
        """Run CLIENTS clients; `event` once BEFORE answers are in; stop AFTER answers after it ended."""
        clients = [asyncio.create_task(self.client(i)) for i in range(CLIENTS)]
        try:
            await self._answered(BEFORE)
            await event()
            await self._answered(len(self.answers) + AFTER)
        finally:
            self.stop.set()
            await asyncio.gather(*clients)
        await settled(self.sc)

    async def _answered(self, count: int) -> None:
        end = time.monotonic() + DEADLINE
        while len(self.answers) < count:
            assert time.monotonic() < end, f"only {len(self.answers)} of {count} answers"
            await asyncio.sleep(0.02)  # a poll interval


def check_answer(status: int, body: Any) -> None:
    assert status in (200, 503), (status, body)
    if status == 503:  # OpenAI's error shape, nothing else
        assert set(body) == {"error"}, body
        assert {"message", "type", "code"} <= set(body["error"]), body
        assert (body["error"]["type"], body["error"]["code"]) == ("server_error", "service_unavailable")


async def ledger_rows(sc: Sidecar, account: str) -> dict[str, int]:
    """The account's usage rows: request id -> how many rows (each must be 1)."""
    assert sc.settings.database_url is not None
    conn = await asyncpg.connect(sc.settings.database_url)
    try:
        rows = await conn.fetch(
            "SELECT idempotency_id, count(*) AS n FROM ledger WHERE account_id = $1 AND kind = 'usage'"
            " GROUP BY idempotency_id",
            account,
        )
    finally:
        await conn.close()
    return {r["idempotency_id"]: int(r["n"]) for r in rows}


async def books_balance(sc: Sidecar, account: str, load: Load) -> None:
    """Once every settlement reached Redis and the ledger: each 200 charged once, each 503 never; the
    grant = balance + held + Σ charges; Redis' debits are the ledger's; reconcile finds no drift."""
    svc, proxy = sc.services, sc.client.app[PROXY]
    end = time.monotonic() + DEADLINE
    while proxy.pending.pending:  # settlements the request path could not settle: retried every 5 s
        assert time.monotonic() < end, f"{len(proxy.pending.pending)} settlements still wait for Redis"
        await asyncio.sleep(0.1)  # a poll interval
    served = {rid for status, rid, _ in load.answers if status == 200}
    refused = {rid for status, rid, _ in load.answers if status == 503}
    assert len(served) == sum(1 for status, _, _ in load.answers if status == 200)  # ids are unique
    end = time.monotonic() + DEADLINE
    while True:  # the sidecar's flusher moves the outbox to the ledger; reconcile counts what is left
        try:
            rows = await ledger_rows(sc, account)
            drifts: list[Any] | None = await reconcile(svc.redis, svc.keys, svc.store)
        except redis.RedisError as exc:  # redis-py's cluster client still finding the new master
            rows, drifts = {}, [exc]
        if drifts == [] and set(rows) >= served:
            break
        assert time.monotonic() < end, f"ledger rows {len(rows)} of {len(served)} served, drifts {drifts}"
        await asyncio.sleep(0.1)  # a poll interval
    assert max(rows.values()) == 1, {rid: n for rid, n in rows.items() if n > 1}  # never charged twice
    assert set(rows) == served  # every 200 charged, no 503 charged
    assert not refused & set(rows)
    view = await svc.balances.balance(account)
    leaked = {h.request_id for h in view.holds}
    assert leaked <= refused, leaked - refused  # a 503's hold that survived its release try only
    if leaked:  # the lease reaper releases them
        await svc.balances.expire_holds(int(time.time() * 1000) + sc.settings.hold_lease_seconds * 1000 + 1)
        view = await svc.balances.balance(account)
    assert (view.held, view.holds) == (0, [])
    charged = -(await svc.store.ledger_sum(account) - GRANT)
    assert charged > 0
    assert view.balance + view.held + charged == GRANT
    assert await svc.store.ledger_sum(account) == view.balance  # ledger = Redis debits
    assert await reconcile(svc.redis, svc.keys, svc.store) == []


# ---- WAIT after settle ----------------------------------------------------------------------------------


async def chat(sc: Sidecar, key: str) -> tuple[int, str]:
    resp = await sc.client.post("/v1/chat/completions", json=BODY, headers={"Authorization": f"Bearer {key}"})
    assert resp.status == 200, await resp.text()
    return resp.status, resp.headers["x-request-id"]


async def unreplicated_metric(sc: Sidecar) -> float:
    text = await (await sc.health.get("/metrics")).text()
    line = next(x for x in text.splitlines() if x.startswith("creditgate_settle_unreplicated_total "))
    return float(line.split()[1])


async def test_wait_after_settle_counts_the_settles_no_replica_acknowledged(
    failover_cluster: LocalCluster, make_sidecar: SidecarFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """settle_wait_replicas 1: with the account's replica up, every settle is acknowledged (none
    counted); with it stopped (SIGSTOP), the request is still a 200 and charged, and its settle is
    counted and logged (request and account, no key)."""
    sc = await make_sidecar(settle_wait_replicas=1, settle_wait_timeout_ms=1000)  # ample for a busy host
    account, slot = account_on(failover_cluster, sc)
    _, key = await sc.account(GRANT, account)
    for _ in range(3):
        await chat(sc, key)
    assert sc.balances.replicas is not None
    assert sc.balances.replicas.short == 0
    assert await unreplicated_metric(sc) == 0
    master = owner_of(failover_cluster, slot)
    replica = replica_of(failover_cluster, master)
    assert replica is not None
    stopped = _process(failover_cluster, replica)
    before = (await sc.balance(account))["balance"]
    stopped.send_signal(signal.SIGSTOP)
    try:
        with caplog.at_level(logging.WARNING, logger="creditgate.replicas"):
            _, request_id = await chat(sc, key)
    finally:
        stopped.send_signal(signal.SIGCONT)
    assert sc.balances.replicas.short == 1
    assert await unreplicated_metric(sc) == 1
    assert (await sc.balance(account))["balance"] < before  # the debit stands
    warned = [r.getMessage() for r in caplog.records if r.name == "creditgate.replicas"]
    assert len(warned) == 1, warned
    assert request_id in warned[0]
    assert account in warned[0]
    assert "0 of 1 replicas" in warned[0]
    assert key not in warned[0]
    await poll(lambda: cluster_settled(failover_cluster), "the replica back in sync")
    await chat(sc, key)
    assert sc.balances.replicas.short == 1


async def test_writes_sent_before_a_wait_share_its_answer(single_redis_url: str) -> None:
    """Twenty scripts sent at once on the write lane, each then asking how many replicas have it: one
    WAIT is sent (it covers every write before it on its connection) and all twenty share its answer;
    a write sent after that WAIT needs a WAIT of its own."""
    pipeline = AutoPipeline(single_redis_url)
    key = f"{new_key_prefix()}w"
    script = "return redis.call('INCR', KEYS[1])"
    sha = hashlib.sha1(script.encode()).hexdigest()
    try:
        await pipeline.lane.execute("SCRIPT", "LOAD", script)  # the lane's connection open
        results = await asyncio.gather(
            *(pipeline.evalsha_replicated(sha, script, [key], [], 1, 20) for _ in range(20))
        )
        assert sorted(reply for reply, _ in results) == list(range(1, 21))
        assert [acked for _, acked in results] == [0] * 20  # the shared Redis has no replica
        assert pipeline.lane.waits == 1
        assert await pipeline.evalsha_replicated(sha, script, [key], [], 1, 20) == (21, 0)
        assert pipeline.lane.waits == 2
    finally:
        await pipeline.execute("DEL", key)
        await pipeline.aclose()


@pytest.mark.parametrize("redis_url", ["single"], indirect=True)
async def test_on_one_redis_without_replicas_every_settle_is_counted(make_sidecar: SidecarFactory) -> None:
    """On one Redis the WAIT goes on the settle's own connection; with no replica none acknowledges:
    every settle is counted, every request still a 200 and charged."""
    sc = await make_sidecar(settle_wait_replicas=1, settle_wait_timeout_ms=10)
    account, key = await sc.account(GRANT)
    for _ in range(2):
        await chat(sc, key)
    assert sc.balances.replicas is not None
    assert sc.balances.replicas.short == 2
    assert (await sc.balance(account))["balance"] < GRANT


# ---- failover under load --------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["graceful", "killed"])
async def test_a_failover_under_load_answers_200_or_503_and_charges_once(
    failover_cluster: LocalCluster, make_sidecar: SidecarFactory, how: str
) -> None:
    """CLIENTS clients (half streamed) on an account whose master fails over: gracefully (CLUSTER
    FAILOVER on its replica), or killed (SIGKILL; the replica takes over after the node timeout). Every
    answer is a 200 or an OpenAI-shaped 503; afterwards each 200 is charged exactly once and no 503 is,
    and the grant = balance + held + Σ charges, with the ledger equal to Redis. The killed case runs
    with settle_wait_replicas 1 (a settle the replica acknowledged survives the promotion)."""
    wait = {"settle_wait_replicas": 1} if how == "killed" else {}
    # Entries the flusher had read when their master died stay pending until claimed (after this idle
    # time; 30 s by default): sooner here.
    sc = await make_sidecar(flush_claim_idle_seconds=1, **wait)
    account, slot = account_on(failover_cluster, sc)
    _, key = await sc.account(GRANT, account)
    master = owner_of(failover_cluster, slot)
    replica = replica_of(failover_cluster, master)
    assert replica is not None
    load = Load(sc, key)

    async def fail_over() -> None:
        if how == "graceful":
            with _client(replica) as c:
                assert c.execute_command("CLUSTER FAILOVER") in (b"OK", True)
        else:
            _process(failover_cluster, master).kill()
        await poll(lambda: _replication(replica)["role"] == "master", f"{replica} promoted")
        await poll(lambda: owner_of(failover_cluster, slot) == replica, "the slot served by the replica")
        await poll(lambda: cluster_settled(failover_cluster), "the cluster ok again")

    await load.during(fail_over)
    statuses = [status for status, _, _ in load.answers]
    for status, _, body in load.answers:
        check_answer(status, body)
    assert statuses.count(200) >= BEFORE + AFTER // 2, statuses.count(200)
    if how == "graceful":
        assert _replication(master)["role"] == "slave"  # the old master follows its replica now
    if how == "killed":  # the promoted replica has no replica of its own: each settle there is counted
        assert sc.balances.replicas is not None
        assert sc.balances.replicas.short >= 1
    await books_balance(sc, account, load)


# ---- what asynchronous replication loses ----------------------------------------------------------------


async def test_a_settle_the_replica_never_got_is_lost_with_its_outbox_entry_and_reconcile_repairs_it(
    failover_cluster: LocalCluster, make_sidecar: SidecarFactory
) -> None:
    """Two requests held while the replica is in sync; then the replica stopped (SIGSTOP) and its link
    cut, both settled
    on the master, the first one's outbox entry flushed to the ledger, the second's not; the master
    killed and the stale replica promoted (CLUSTER FAILOVER TAKEOVER). Both debits are gone from Redis
    with their outbox entries and markers, and both holds are back. The second request is unbilled and
    reconcile cannot see it (Redis and ledger agree); the first is in the ledger only: reconcile reports
    the account's drift, exactly its charge, and repair debits Redis to the ledger. The holds' lease
    reaper releases both."""
    sc = await make_sidecar(flusher_enabled=False, reconcile_interval_seconds=0)
    svc = sc.services
    account, slot = account_on(failover_cluster, sc)
    await sc.account(GRANT, account)
    master = owner_of(failover_cluster, slot)
    replica = replica_of(failover_cluster, master)
    assert replica is not None
    lease_end = int(time.time() * 1000) + 900_000
    first, second = f"req_{uuid.uuid4().hex}", f"req_{uuid.uuid4().hex}"
    for request_id in (first, second):
        assert (await svc.balances.reserve(account, request_id, 5_000, lease_end)).status == 1
    offset = int(_replication(master)["master_repl_offset"])
    await poll(lambda: int(_replication(replica)["slave_repl_offset"]) >= offset, "the replica in sync")
    stopped = _process(failover_cluster, replica)
    stopped.send_signal(signal.SIGSTOP)
    try:
        # A stopped process' kernel still takes what its master sends: the link is cut too (the stopped
        # replica cannot reconnect), so what the master writes next reaches no replica.
        with _client(master) as c:
            assert c.client_kill_filter(_type="replica") == 1
        assert (await svc.balances.settle(account, first, 1_200)).first
        assert await svc.flusher().drain() == 1  # the first debit is in the ledger now
        assert (await svc.balances.settle(account, second, 3_400)).first
        assert (await svc.balances.balance(account)).balance == GRANT - 4_600  # as the master saw it
        _process(failover_cluster, master).kill()
    finally:
        stopped.send_signal(signal.SIGCONT)
    with _client(replica) as c:
        c.execute_command("CLUSTER FAILOVER TAKEOVER")
    await poll(lambda: _replication(replica)["role"] == "master", "the stale replica promoted")
    await poll(lambda: cluster_settled(failover_cluster), "the cluster ok again")

    async def view() -> Any:
        end = time.monotonic() + DEADLINE
        while True:  # redis-py's cluster client finds the new master on a retry
            try:
                return await svc.balances.balance(account)
            except redis.RedisError:
                assert time.monotonic() < end
                await asyncio.sleep(0.1)  # a poll interval

    after = await view()
    assert after.balance == GRANT  # both debits lost
    assert [h.request_id for h in after.holds] == sorted([first, second])  # both holds back
    assert await svc.redis.xlen(svc.keys.outbox(svc.keys.partition_of(account))) == 0
    assert await ledger_rows(sc, account) == {first: 1}  # the second request is unbilled
    drifts = await reconcile(svc.redis, svc.keys, svc.store)
    assert [(d.account, d.redis_balance, d.expected, d.amount, d.held_amount) for d in drifts] == [
        (account, GRANT, GRANT - 1_200, 1_200, 0)
    ]
    await repair(svc.redis, svc.keys, svc.store, svc.balances)
    assert await reconcile(svc.redis, svc.keys, svc.store) == []
    assert await svc.balances.expire_holds(lease_end + 1) == 10_000
    final = await svc.balances.balance(account)
    assert (final.balance, final.held, final.holds) == (GRANT - 1_200, 0, [])
    assert await svc.store.ledger_sum(account) == GRANT - 1_200
