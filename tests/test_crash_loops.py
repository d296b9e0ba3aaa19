"""Crash loops: 50 SIGKILLs of real processes at a seeded random moment of a streamed request, a
non-streamed request, a flush batch and a grant, each process restarted and the money checked after
every kill.

The moment is chosen by a `random.Random(seed)` and reached deterministically: the upstream (a test
aiohttp server) stops after the chosen event or byte and says so; a Postgres trigger on the ledger
blocks the flusher's insert at the chosen row, or a grant's insert or its "applied" update, on an
advisory lock the test holds, until the process is dead. After each kill:

- every hold resolves: its lease ends within `hold_lease_seconds` of the kill (read from Redis) and the
  restarted process's reaper releases it; granted = balance + held + what the ledger charged,
- every grant is credited once: retried with its Idempotency-Key (and, for some seeds, completed first by
  the reconciler's `complete_money_in`), one ledger row, applied, and one credit in Redis,
- a flush batch is written once: one ledger row per settled request id, the outbox drained.

After all runs of a kind: the ledger's sum equals Redis' balance and `reconcile` finds no drift.

One process, Redis prefix and schema per kind; the killed process is restarted and the loop goes on.
A failure names its seed; ``CRASH_LOOP_SEEDS=7,12`` runs only those seeds of every kind.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import msgspec
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from sidecar.app import services
from sidecar.demo_answers import plan as plan_answer
from sidecar.demo_answers import stream_events, whole_body
from sidecar.flusher import GROUP
from sidecar.keys import KeySpace, as_text
from sidecar.outbox import UsageEvent
from sidecar.reconcile import DRIFT_KINDS, complete_money_in, reconcile
from sidecar.redis_client import RedisClient
from sidecar.services import Services

from .conftest import (
    ADMIN_TOKEN,
    Served,
    creditgate_process,
    make_settings,
    new_key_prefix,
    process_env,
)
from .support import creditgate

DEADLINE = 60  # seconds: a guard that fails the test, never a timing assertion
LEASE_SECONDS = 1  # hold_lease_seconds (its least value): a killed request's hold outlives it by this
REAPER_SECONDS = 0.1  # reaper_interval_seconds
RUNS = {"stream": 13, "whole": 13, "flush": 12, "grant": 12}  # 50 kills in all
FIRST_SEED = {"stream": 1000, "whole": 2000, "flush": 3000, "grant": 4000}
GRANTED = 10_000_000_000  # what each request account is granted once, in micro-credits
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
SERVING = r"creditgate listening on (http://[0-9.]+:[0-9]+)"
FLUSHING = r"flusher running as consumer (\S+)"


def seeds(kind: str) -> list[int]:
    chosen = os.environ.get("CRASH_LOOP_SEEDS")
    if chosen:
        return [int(s) for s in chosen.split(",")]
    return list(range(FIRST_SEED[kind], FIRST_SEED[kind] + RUNS[kind]))


async def until(condition: Callable[[], Awaitable[bool]], what: str) -> None:
    """Poll `condition` (another process changes what it reads) until it holds; fails after DEADLINE."""
    try:
        async with asyncio.timeout(DEADLINE):
            while not await condition():  # noqa: ASYNC110
                await asyncio.sleep(0.02)
    except TimeoutError:
        pytest.fail(f"never happened: {what}")


async def guarded(awaitable: Awaitable[Any], what: str) -> Any:
    try:
        async with asyncio.timeout(DEADLINE):
            return await awaitable
    except TimeoutError:
        pytest.fail(f"never happened: {what}")


class Restartable:
    """A real `creditgate COMMAND` process that the test kills (SIGKILL) and starts again."""

    def __init__(self, env: dict[str, str], cwd: Path, command: str, ready: str) -> None:
        self.env, self.cwd, self.command, self.ready = env, cwd, command, ready
        self.served: Served | None = None
        self.found = ""  # the first group of `ready` in the log of the running process
        self._stack: contextlib.AsyncExitStack | None = None

    async def start(self) -> str:
        self._stack = contextlib.AsyncExitStack()
        self.served, self.found = await self._stack.enter_async_context(
            creditgate_process(self.env, self.cwd, self.command, ready=self.ready)
        )
        return self.found

    async def kill(self) -> None:
        """SIGKILL, and wait for the process to be gone."""
        assert self.served is not None
        assert self._stack is not None
        await self.served.kill()
        await self._stack.aclose()
        self.served = None

    async def stop(self) -> int:
        """SIGTERM (the graceful stop: the final flush); the exit code."""
        assert self.served is not None
        assert self._stack is not None
        code = await self.served.stop()
        await self._stack.aclose()
        return code

    async def close(self) -> None:
        if self._stack is not None:
            await self._stack.aclose()


# ---- the upstream that stops at the chosen moment -------------------------------------------------


@dataclass
class KillPoint:
    """Where the upstream stops, drawn by `rng` once it knows its answer: before streamed event `at`
    (0: after the headers), or before byte `at` of a whole answer (-1: before the headers); or, one
    time in four, after the whole answer (`at` == `total`: the kill races the sidecar's settle)."""

    rng: random.Random
    reached: asyncio.Event = field(default_factory=asyncio.Event)
    gate: asyncio.Event = field(default_factory=asyncio.Event)
    at: int = -2  # the event (streamed) or byte (not streamed) it stopped before, once drawn
    total: int = 0  # events or bytes of the answer

    def draw(self, lowest: int, total: int) -> None:
        self.total = total
        self.at = total if self.rng.random() < 0.25 else self.rng.randint(lowest, total - 1)

    @property
    def in_flight(self) -> bool:
        """Whether the sidecar is killed before it has the whole answer (so before it can settle)."""
        return self.at < self.total


POINT = web.AppKey("point", list)  # [KillPoint] of the request in flight


def stopping_upstream() -> web.Application:
    """An OpenAI-style upstream (the demo's answers) that sends its answer up to the current KillPoint,
    sets `reached`, and sends the rest only after `gate` (by then the sidecar is dead)."""

    async def chat(request: web.Request) -> web.StreamResponse:
        point: KillPoint = request.app[POINT][0]
        body = msgspec.json.decode(await request.read())
        plan = plan_answer("chat", request.headers, body)
        if body.get("stream"):
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            chunks = stream_events(plan, include_usage)
            point.draw(0, len(chunks))
            stop_before = point.at  # the chunk to stop before (len(chunks): none)
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        else:
            data = msgspec.json.encode(whole_body(plan))
            point.draw(-1, len(data))
            cut = max(point.at, 0)
            chunks = [data[:cut], data[cut:]]
            stop_before = 1 if 0 <= point.at < len(data) else 2
            response = web.StreamResponse(headers={"Content-Type": "application/json"})
            response.content_length = len(data)
        try:
            if point.at == -1:
                point.reached.set()
                await point.gate.wait()
            await response.prepare(request)
            for i, chunk in enumerate(chunks):
                if i == stop_before:
                    point.reached.set()
                    await point.gate.wait()
                if chunk:
                    await response.write(chunk)
            await response.write_eof()
        except ConnectionError:
            pass  # the sidecar is dead
        point.reached.set()  # the whole answer was sent (the last point)
        return response

    app = web.Application()
    app[POINT] = []
    app.router.add_post("/v1/chat/completions", chat)
    return app


@pytest.fixture
async def stopping() -> AsyncIterator[tuple[TestServer, web.Application]]:
    app = stopping_upstream()
    server = TestServer(app)
    await server.start_server()
    yield server, app
    await server.close()


# ---- reading Redis and the ledger -------------------------------------------------------------------


async def holds_of(redis: RedisClient, keys: KeySpace, account: str) -> dict[str, int]:
    raw = await redis.hgetall(keys.account(account).holds)
    return {as_text(k): int(v) for k, v in raw.items()}


async def balance_of(redis: RedisClient, keys: KeySpace, account: str) -> tuple[int, int]:
    balance, held = await redis.hmget(keys.account(account).balance, ["balance", "held"])
    assert balance is not None, f"{account} is missing from Redis"
    return int(balance), int(held or 0)


async def outbox(redis: RedisClient, keys: KeySpace) -> tuple[int, int]:
    """(entries in the outbox streams, of them read by a flusher and not acknowledged)."""
    length = pending = 0
    for stream in (keys.outbox(p) for p in range(keys.partitions)):
        length += await redis.xlen(stream)
        if await redis.exists(stream):
            with contextlib.suppress(Exception):  # no group yet
                pending += (await redis.xpending(stream, GROUP))["pending"]
    return length, pending


async def drained(redis: RedisClient, keys: KeySpace) -> bool:
    return await outbox(redis, keys) == (0, 0)


@dataclass
class LedgerView:
    total: int  # sum of the account's rows
    charged: int  # of its usage rows, the sum charged
    usage_rows: int
    usage_ids: int  # distinct request ids among them


async def ledger_of(pg: asyncpg.Connection, account: str) -> LedgerView:
    row = await pg.fetchrow(
        "SELECT coalesce(sum(amount), 0) AS total,"
        " coalesce(-sum(amount) FILTER (WHERE kind = 'usage'), 0) AS charged,"
        " count(*) FILTER (WHERE kind = 'usage') AS rows,"
        " count(DISTINCT idempotency_id) FILTER (WHERE kind = 'usage') AS ids"
        " FROM ledger WHERE account_id = $1",
        account,
    )
    assert row is not None
    return LedgerView(int(row["total"]), int(row["charged"]), int(row["rows"]), int(row["ids"]))


async def ledger_equals_redis(
    svc: Services, pg: asyncpg.Connection, accounts: list[str], proc: Restartable
) -> None:
    """After a drain: the ledger's sum is Redis' balance, nothing is held, and reconcile finds nothing,
    called here and as `creditgate reconcile` (a process of its own, with the killed one's settings)."""
    assert await drained(svc.redis, svc.keys), await outbox(svc.redis, svc.keys)
    for account in accounts:
        assert (await ledger_of(pg, account)).total == (await balance_of(svc.redis, svc.keys, account))[0]
        assert await holds_of(svc.redis, svc.keys, account) == {}
    assert await reconcile(svc.redis, svc.keys, svc.store) == []
    done = await asyncio.to_thread(creditgate, proc.env, "reconcile", cwd=proc.cwd)
    assert done.returncode == 0, done.stderr
    report = msgspec.json.decode(done.stdout)
    assert (report["drifting"], report["holds"], report["grants_unapplied"]) == ([], [], [])
    assert {kind: d["items"] for kind, d in report["drift_by_kind"].items()} == dict.fromkeys(DRIFT_KINDS, 0)


# ---- the Postgres hook: a trigger on the ledger that waits on the test's advisory lock -----------------


class LedgerHook:
    """A BEFORE INSERT OR UPDATE trigger on the ledger of this schema: the row it is armed for (an
    operation, an idempotency id or the n-th usage row inserted) waits on an advisory lock the test
    holds, inside the writer's statement, until the test lets it go."""

    def __init__(self, pg: asyncpg.Connection, schema: str) -> None:
        self.pg = pg  # the test's connection: it holds the lock
        self.schema = schema
        self.lock = random.SystemRandom().randrange(1, 2**31)  # one of our own in the shared database

    async def install(self) -> None:
        s = self.schema
        await self.pg.execute(
            f"""
            CREATE TABLE {s}.crash_hook (op text, idempotency_id text, nth bigint, lock bigint);
            CREATE SEQUENCE {s}.crash_hook_rows;
            CREATE FUNCTION {s}.crash_hook() RETURNS trigger LANGUAGE plpgsql AS $$
            DECLARE h record;
            BEGIN
              SELECT * INTO h FROM {s}.crash_hook LIMIT 1;
              IF FOUND AND h.op = TG_OP THEN
                IF h.nth IS NOT NULL AND NEW.kind = 'usage' THEN
                  IF nextval('{s}.crash_hook_rows') = h.nth THEN
                    PERFORM pg_advisory_xact_lock(h.lock);
                  END IF;
                ELSIF h.idempotency_id = NEW.idempotency_id THEN
                  PERFORM pg_advisory_xact_lock(h.lock);
                END IF;
              END IF;
              RETURN NEW;
            END $$;
            CREATE TRIGGER crash_hook BEFORE INSERT OR UPDATE ON {s}.ledger
              FOR EACH ROW EXECUTE FUNCTION {s}.crash_hook();
            """
        )

    async def arm(self, op: str, *, idempotency_id: str | None = None, nth: int | None = None) -> None:
        await self.pg.execute("SELECT pg_advisory_lock($1)", self.lock)
        await self.pg.execute(f"ALTER SEQUENCE {self.schema}.crash_hook_rows RESTART")
        await self.pg.execute(
            f"INSERT INTO {self.schema}.crash_hook VALUES ($1, $2, $3, $4)",
            op,
            idempotency_id,
            nth,
            self.lock,
        )

    async def waiting(self) -> int | None:
        """The backend waiting on the lock (the writer stopped at the armed row), if any."""
        pid = await self.pg.fetchval(
            "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND NOT granted AND classid = 0"
            " AND objid = $1 AND objsubid = 1"
            " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
            self.lock,
        )
        return int(pid) if pid is not None else None

    async def stopped_writer(self) -> int:
        found: list[int] = []

        async def stopped() -> bool:
            pid = await self.waiting()
            if pid is not None:
                found.append(pid)
            return pid is not None

        await until(stopped, "the writer reached the armed ledger row")
        return found[0]

    async def release(self, pid: int, *, terminate: bool) -> None:
        """Disarm; let the stopped writer go on (its statement completes, the dead client's transaction
        commits only if nothing more was to come from it) or end its backend first (it rolls back)."""
        await self.pg.execute(f"DELETE FROM {self.schema}.crash_hook")
        if terminate:
            await self.pg.execute("SELECT pg_terminate_backend($1)", pid)
        await self.pg.execute("SELECT pg_advisory_unlock($1)", self.lock)

        async def gone() -> bool:
            return not await self.pg.fetchval("SELECT true FROM pg_stat_activity WHERE pid = $1", pid)

        if terminate:
            await until(gone, f"backend {pid} ended")


# ---- fixtures ----------------------------------------------------------------------------------------


@dataclass
class World:
    prefix: str
    schema: str
    database_url: str
    svc: Services  # the test's own clients of the same Redis prefix and schema
    pg: asyncpg.Connection


@pytest.fixture
async def world(redis_url: str, database_server: str) -> AsyncIterator[World]:
    prefix, schema = new_key_prefix(), f"t{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(database_server)
    await admin.execute(f"CREATE SCHEMA {schema}")
    database_url = f"{database_server}{'&' if '?' in database_server else '?'}search_path={schema}"
    try:
        settings = make_settings(redis_url, database_url, key_prefix=prefix)
        async with services(settings) as svc:  # migrates the schema
            pg = await asyncpg.connect(database_url)
            try:
                yield World(prefix, schema, database_url, svc, pg)
            finally:
                await pg.close()
    finally:
        await admin.execute(f"DROP SCHEMA {schema} CASCADE")
        await admin.close()


def crash_env(world: World, redis_url: str, upstream_url: str, **settings: str) -> dict[str, str]:
    return process_env(
        redis_url,
        world.database_url,
        world.prefix,
        upstream_url,
        CREDITGATE_ADMIN_TOKEN=ADMIN_TOKEN,
        CREDITGATE_HOLD_LEASE_SECONDS=str(LEASE_SECONDS),
        CREDITGATE_REAPER_INTERVAL_SECONDS=str(REAPER_SECONDS),
        CREDITGATE_FLUSH_CLAIM_IDLE_SECONDS="0.2",  # a dead process's entries are claimed soon
        CREDITGATE_FLUSH_INTERVAL_SECONDS="0.05",
        CREDITGATE_RECONCILE_INTERVAL_SECONDS="0",
        CREDITGATE_FORWARD_REQUEST_HEADERS="x-demo-*",
        CREDITGATE_LOG_REQUESTS="false",
        **settings,
    )


def with_seed(kind: str, seed: int, exc: BaseException, detail: str) -> None:
    exc.add_note(f"crash loop {kind}, seed {seed} ({detail}); rerun it with CRASH_LOOP_SEEDS={seed}")


# ---- requests ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["stream", "whole"])
async def test_sigkill_during_a_request_leaves_no_hold_and_charges_at_most_once(
    kind: str,
    world: World,
    redis_url: str,
    stopping: tuple[TestServer, web.Application],
    tmp_path: Path,
) -> None:
    server, upstream = stopping
    svc, keys = world.svc, world.svc.keys
    account = f"crash-{kind}"
    await svc.admin.create_account(account)
    await svc.admin.grant(account, GRANTED, "funds")
    api_key = (await svc.admin.create_key(account))["key"]
    proc = Restartable(crash_env(world, redis_url, str(server.make_url("/v1"))), tmp_path, "serve", SERVING)
    url = await proc.start()
    try:
        async with aiohttp.ClientSession() as session:
            for seed in seeds(kind):
                rng = random.Random(seed)
                point = KillPoint(rng)
                upstream[POINT][:] = [point]
                tokens = rng.randint(1, 40)
                try:
                    url = await one_request_run(
                        kind, session, url, api_key, tokens, point, proc, world, account
                    )
                except BaseException as exc:
                    with_seed(kind, seed, exc, f"{tokens} tokens, stopped at {point.at} of {point.total}")
                    raise
        assert await proc.stop() == 0
        assert await drained(svc.redis, keys)
        await ledger_equals_redis(svc, world.pg, [account], proc)
        ledger = await ledger_of(world.pg, account)
        assert ledger.usage_rows == ledger.usage_ids  # no request id charged twice
    finally:
        await proc.close()


async def one_request_run(
    kind: str,
    session: aiohttp.ClientSession,
    url: str,
    api_key: str,
    tokens: int,
    point: KillPoint,
    proc: Restartable,
    world: World,
    account: str,
) -> str:
    svc, keys = world.svc, world.svc.keys
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "go"}], "max_tokens": 50}
    if kind == "stream":
        body["stream"] = True
    headers = {"Authorization": f"Bearer {api_key}", "x-demo-tokens": str(tokens)}

    async def call() -> int | None:
        try:
            async with session.post(f"{url}/v1/chat/completions", json=body, headers=headers) as resp:
                await resp.read()
                return resp.status
        except aiohttp.ClientError:
            return None  # the sidecar died under it

    client = asyncio.create_task(call())
    await guarded(point.reached.wait(), "the upstream reached the kill point")
    await proc.kill()
    point.gate.set()
    await guarded(client, "the client's request ended")
    killed_ms = int(time.time() * 1000)
    # At most the request's own hold is left, and its lease ends within hold_lease_seconds of the kill.
    left = await holds_of(svc.redis, keys, account)
    assert len(left) == 1 if point.in_flight else len(left) <= 1, left
    for request_id in left:
        k = keys.account(account)
        lease_end = await svc.redis.zscore(k.hold_expiry, k.expiry_member(request_id))
        assert lease_end is not None
        assert lease_end <= killed_ms + LEASE_SECONDS * 1000
    url = await proc.start()

    async def resolved() -> bool:
        return not await holds_of(svc.redis, keys, account) and await drained(svc.redis, keys)

    await until(resolved, "the restarted process reaped the hold and flushed what was settled")
    balance, held = await balance_of(svc.redis, keys, account)
    ledger = await ledger_of(world.pg, account)
    assert held == 0
    assert balance + held + ledger.charged == GRANTED
    assert ledger.total == balance
    assert ledger.usage_rows == ledger.usage_ids
    return url


# ---- flush batches ------------------------------------------------------------------------------------


async def test_sigkill_during_a_flush_batch_writes_every_row_once(
    world: World, redis_url: str, tmp_path: Path
) -> None:
    svc, keys = world.svc, world.svc.keys
    account = "crash-flush"
    await svc.admin.create_account(account)
    await svc.admin.grant(account, GRANTED, "funds")
    hook = LedgerHook(world.pg, world.schema)
    await hook.install()
    env = crash_env(
        world,
        redis_url,
        "http://127.0.0.1:9/v1",
        CREDITGATE_FLUSH_BATCH_SIZE="8",
        CREDITGATE_FLUSH_CONCURRENCY="2",
    )
    proc = Restartable(env, tmp_path, "flush", FLUSHING)
    await proc.start()
    charged = 0
    try:
        for seed in seeds("flush"):
            rng = random.Random(seed)
            entries = rng.randint(10, 60)
            nth = rng.randint(1, entries)
            terminate = rng.random() < 0.5
            try:
                await hook.arm("INSERT", nth=nth)
                ids = [f"f{seed}-{i}" for i in range(entries)]
                charges = [rng.randint(1, 5_000) for _ in ids]
                await asyncio.gather(
                    *(settle(svc, account, rid, c) for rid, c in zip(ids, charges, strict=True))
                )
                charged += sum(charges)
                writer = await hook.stopped_writer()  # the flusher is inside the insert of row `nth`
                await proc.kill()
                await hook.release(writer, terminate=terminate)
                await proc.start()
                await until(lambda: drained(svc.redis, keys), "the restarted flusher drained the outbox")
                rows = await world.pg.fetch(
                    "SELECT idempotency_id, -amount AS charge FROM ledger WHERE idempotency_id = ANY($1)",
                    ids,
                )
                assert sorted((r["idempotency_id"], r["charge"]) for r in rows) == sorted(
                    zip(ids, charges, strict=True)
                )
                ledger = await ledger_of(world.pg, account)
                assert ledger.usage_rows == ledger.usage_ids
                assert ledger.charged == charged
                assert ledger.total == (await balance_of(svc.redis, keys, account))[0] == GRANTED - charged
            except BaseException as exc:
                rollback = "terminated" if terminate else "released"
                with_seed("flush", seed, exc, f"{entries} entries, stopped at row {nth}, writer {rollback}")
                raise
        assert await proc.stop() == 0
        await ledger_equals_redis(svc, world.pg, [account], proc)
    finally:
        await proc.close()


async def settle(svc: Services, account: str, request_id: str, charge: int) -> None:
    """A request as the serving process settles it: hold, then settle (debit and outbox entry)."""
    lease_end = int(time.time() * 1000) + 60_000
    reservation = await svc.balances.reserve(account, request_id, charge, lease_end)
    assert reservation.status == 1
    event = UsageEvent(route="chat", model="gpt-4o-mini", hold=charge, outcome="ok")
    settlement = await svc.balances.settle(account, request_id, charge, event)
    assert settlement.first


# ---- grants -----------------------------------------------------------------------------------------


async def test_sigkill_during_a_grant_credits_it_once(world: World, redis_url: str, tmp_path: Path) -> None:
    svc, keys = world.svc, world.svc.keys
    account = "crash-grant"
    await svc.admin.create_account(account)
    hook = LedgerHook(world.pg, world.schema)
    await hook.install()
    proc = Restartable(crash_env(world, redis_url, "http://127.0.0.1:9/v1"), tmp_path, "serve", SERVING)
    url = await proc.start()
    expected = 0
    try:
        async with aiohttp.ClientSession(headers=ADMIN) as session:
            for seed in seeds("grant"):
                rng = random.Random(seed)
                amount = rng.randint(1, 1_000_000)
                # insert: inside the ledger insert (before Postgres commits); applied: after the Redis
                # credit, inside "mark applied"; committed: as soon as the committed row is visible.
                where = rng.choice(["insert", "applied", "committed"])
                terminate = rng.random() < 0.5
                reconciler = rng.random() < 0.5
                try:
                    url = await one_grant_run(
                        session, url, seed, amount, where, terminate, reconciler, proc, hook, world, account
                    )
                    expected += amount
                    assert (await balance_of(svc.redis, keys, account))[0] == expected
                    assert (await ledger_of(world.pg, account)).total == expected
                except BaseException as exc:
                    how = f"killed at {where}, writer {'terminated' if terminate else 'released'}"
                    with_seed("grant", seed, exc, how + (", reconciler first" if reconciler else ""))
                    raise
        assert await proc.stop() == 0
        await ledger_equals_redis(svc, world.pg, [account], proc)
    finally:
        await proc.close()


async def one_grant_run(
    session: aiohttp.ClientSession,
    url: str,
    seed: int,
    amount: int,
    where: str,
    terminate: bool,
    reconciler: bool,
    proc: Restartable,
    hook: LedgerHook,
    world: World,
    account: str,
) -> str:
    svc = world.svc
    key = f"grant-{seed}"
    ledger_id = f"in:{account}:{key}"
    headers = {"Idempotency-Key": key}

    async def grant(base: str) -> tuple[int, Any]:
        async with session.post(
            f"{base}/admin/accounts/{account}/grants", json={"amount": amount}, headers=headers
        ) as resp:
            return resp.status, await resp.json()

    async def first_try() -> None:
        with contextlib.suppress(aiohttp.ClientError):
            await grant(url)

    async def rows() -> list[asyncpg.Record]:
        return await world.pg.fetch("SELECT applied FROM ledger WHERE idempotency_id = $1", ledger_id)

    before = (await balance_of(svc.redis, svc.keys, account))[0]
    if where != "committed":
        await hook.arm("INSERT" if where == "insert" else "UPDATE", idempotency_id=ledger_id)
    client = asyncio.create_task(first_try())
    writer = None
    if where == "committed":
        await until(lambda: rows_exist(rows), "the grant's ledger row is committed")
    else:
        writer = await hook.stopped_writer()
    await proc.kill()
    if writer is not None:
        await hook.release(writer, terminate=terminate)
    await guarded(client, "the first try ended")
    committed = await rows()
    assert len(committed) <= 1
    balance = (await balance_of(svc.redis, svc.keys, account))[0]
    assert balance in (before, before + amount)  # credited at most once so far
    if where == "insert":
        assert committed == []  # it died before Postgres committed
        assert balance == before
    if where == "applied":
        assert [r["applied"] for r in committed] == [False]  # it died after the Redis credit
        assert balance == before + amount
    if reconciler:  # the reconciler's step: complete money in the ledger has and Redis may not
        await complete_money_in(svc.store, svc.balances)
        assert (await balance_of(svc.redis, svc.keys, account))[0] == before + (amount if committed else 0)
    url = await proc.start()
    status, body = await grant(url)  # the client retries with the same Idempotency-Key
    assert status == 200, body
    assert body["credited"] is (not committed)  # the retry wrote the row only if the first try had not
    assert body["balance"] == before + amount
    again = await rows()
    assert [r["applied"] for r in again] == [True]
    status, body = await grant(url)  # and once more: nothing moves
    assert (status, body["credited"], body["balance"]) == (200, False, before + amount)
    return url


async def rows_exist(rows: Callable[[], Awaitable[list[asyncpg.Record]]]) -> bool:
    return bool(await rows())
