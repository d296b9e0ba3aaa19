"""Soak: a bounded mix of traffic over two real sidecars with Redis faults on a schedule, then the money
checks. Exits 1 on a violation.

    python bench/soak.py [--minutes 30] [--fault-every 10] [--concurrency 8] [--accounts 8] [--seed 1]

Starts its own redis-server (so SCRIPT FLUSH touches nobody else), a fresh schema in Postgres
(``SOAK_DATABASE_URL``, default postgresql://postgres@127.0.0.1:5432/test; dropped at the end), the mock
upstream (bench/mock_upstream.py) and two ``creditgate serve`` processes whose Redis connections go
through the fault proxy of tests/support_faults.py. For ``--minutes`` the clients send a mix of
non-streamed and streamed chat requests, repeated bodies (cache hits) and grants (admin API, each
retried with its idempotency key until it is acknowledged) to either sidecar, while faults come every
``--fault-every`` seconds in turn: lost replies (the next 3 EVALSHA run in Redis, their replies never
come back), a cut (every connection dropped), SCRIPT FLUSH, and a sidecar SIGKILLed and restarted.

Then it drains (no traffic, no faults: until the outbox is flushed, every hold is settled or reaped,
no settlement waits for Redis and no money in is pending) and checks, per account:

- conservation: granted (the grants acknowledged to the client) = the ledger's money in
  = available + held + Σ charges (the ledger's usage rows), with nothing held after the drain;
- ledger = Redis: the reconciler's ``inspect`` finds no drift of any kind.

It prints a summary: requests by kind and status, faults injected, drift by kind, the totals.
``--corrupt`` moves one Redis balance by a micro-credit after the drain: the checks must then fail
(tests/test_soak.py proves they can).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import os
import random
import signal
import sys
import tempfile
import time
import uuid
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import msgspec
import redis.asyncio as aioredis

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(ROOT))

from sidecar.config import Settings  # noqa: E402
from sidecar.reconcile import inspect  # noqa: E402
from sidecar.services import services  # noqa: E402
from tests.support_faults import RedisFaultProxy, command  # noqa: E402
from tests.support_redis import free_port, redis_server  # noqa: E402

PY = sys.executable
MODEL = "soak-model"
ADMIN_TOKEN = "soak-admin-token"
FAULTS = ("lost_replies", "cut", "script_flush", "kill_restart")
KINDS = ("plain", "stream", "cache", "grant")
WEIGHTS = (40, 30, 20, 10)
LEASE_SECONDS = 6  # short leases: holds of a killed sidecar are reaped within the drain
DRAIN_SECONDS = 180
PARTITIONS = 16  # the partitions setting's default, which the sidecars use here


@dataclass
class Tally:
    requests: collections.Counter[tuple[str, str]] = field(default_factory=collections.Counter)
    faults: collections.Counter[str] = field(default_factory=collections.Counter)
    granted: collections.Counter[str] = field(default_factory=collections.Counter)  # acknowledged
    grants_given_up: int = 0


class Sidecar:
    """One ``creditgate serve`` on a fixed port (kept across restarts), its log in `logs`."""

    def __init__(self, name: str, env: dict[str, str], logs: Path) -> None:
        self.name, self.port = name, free_port()
        self.env = {**env, "CREDITGATE_PORT": str(self.port)}
        self.log = logs / f"{name}.log"
        self.proc: asyncio.subprocess.Process | None = None
        self.url = f"http://127.0.0.1:{self.port}"

    async def start(self, http: aiohttp.ClientSession) -> None:
        with self.log.open("ab") as log:
            self.proc = await asyncio.create_subprocess_exec(
                PY, "-m", "sidecar", "serve", env=self.env, cwd=ROOT, stdin=asyncio.subprocess.DEVNULL,
                stdout=log, stderr=log,
            )  # fmt: skip
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.returncode is not None:
                raise RuntimeError(f"{self.name} exited {self.proc.returncode}; see {self.log}")
            with contextlib.suppress(aiohttp.ClientError, OSError):
                async with http.get(f"{self.url}/readyz") as resp:
                    if resp.status == 200:
                        return
            await asyncio.sleep(0.1)
        raise RuntimeError(f"{self.name} not ready in 60 s; see {self.log}")

    async def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()

    async def stop(self) -> int:
        """SIGTERM (a clean shutdown: in-flight requests finish, the outbox is flushed); the exit code."""
        assert self.proc is not None
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return await asyncio.wait_for(self.proc.wait(), 60)
        except TimeoutError:
            await self.kill()
            return -9


def _admin_headers(**extra: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {ADMIN_TOKEN}", **extra}


async def _admin(http: aiohttp.ClientSession, sc: Sidecar, method: str, path: str, body: Any = None) -> Any:
    async with http.request(method, f"{sc.url}/admin{path}", json=body, headers=_admin_headers()) as resp:
        data = await resp.json()
        if resp.status >= 300:
            raise RuntimeError(f"{method} {path}: {resp.status} {data}")
        return data


async def grant(
    http: aiohttp.ClientSession, sidecars: list[Sidecar], account: str, micro: int, t: Tally
) -> str:
    """Grant `micro` until a sidecar acknowledges it, always with the same idempotency key."""
    key = uuid.uuid4().hex
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        sc = random.choice(sidecars)
        try:
            async with http.post(
                f"{sc.url}/admin/accounts/{account}/grants",
                json={"amount": micro},
                headers=_admin_headers(**{"Idempotency-Key": key}),
                timeout=aiohttp.ClientTimeout(total=15),
            ) as resp:
                await resp.read()
                if resp.status < 300:
                    t.granted[account] += micro
                    return str(resp.status)
                status = str(resp.status)
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            status = type(exc).__name__
        t.requests["grant_retry", status] += 1
        await asyncio.sleep(0.2)
    t.grants_given_up += 1
    return "given_up"


async def request(http: aiohttp.ClientSession, sc: Sidecar, key: str, kind: str, body: dict[str, Any]) -> str:
    try:
        async with http.post(
            f"{sc.url}/v1/chat/completions",
            data=msgspec.json.encode(body),
            headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
            timeout=aiohttp.ClientTimeout(total=30),
        ) as resp:
            await resp.read()
            status = str(resp.status)
            if kind == "cache" and resp.status == 200:
                status += f"/{resp.headers.get('X-Cache', '?').lower()}"
            return status
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        return type(exc).__name__


async def client(
    http: aiohttp.ClientSession,
    sidecars: list[Sidecar],
    accounts: dict[str, str],
    until: float,
    t: Tally,
    rng: random.Random,
) -> None:
    names = list(accounts)
    while time.monotonic() < until:
        account = rng.choice(names)
        kind = rng.choices(KINDS, WEIGHTS)[0]
        if kind == "grant":
            status = await grant(http, sidecars, account, rng.randint(1_000, 50_000), t)
        else:
            text = f"soak {account} always the same" if kind == "cache" else f"soak {uuid.uuid4().hex}"
            body: dict[str, Any] = {
                "model": MODEL,
                "messages": [{"role": "user", "content": text}],
                "max_tokens": 16,
            }
            if kind == "stream":
                body["stream"] = True
            elif kind == "cache":
                body["temperature"] = 0  # cacheable (cachekey.cacheable)
            status = await request(http, rng.choice(sidecars), accounts[account], kind, body)
        t.requests[kind, status] += 1


async def faults(
    proxy: RedisFaultProxy,
    direct: aioredis.Redis,
    http: aiohttp.ClientSession,
    sidecars: list[Sidecar],
    every: float,
    until: float,
    t: Tally,
) -> None:
    i = 0
    while time.monotonic() + every < until:
        await asyncio.sleep(every)
        fault = FAULTS[i % len(FAULTS)]
        if fault == "lost_replies":
            proxy.lose_replies(3, command("EVALSHA"))
        elif fault == "cut":
            proxy.cut()
        elif fault == "script_flush":
            await direct.script_flush()
        else:
            victim = sidecars[(i // len(FAULTS)) % len(sidecars)]
            await victim.kill()
            await victim.start(http)
        t.faults[fault] += 1
        i += 1


async def drained(direct: aioredis.Redis, pg: asyncpg.Connection, schema: str, prefix: str,
                  http: aiohttp.ClientSession, sidecars: list[Sidecar]) -> dict[str, int]:  # fmt: skip
    """What is still in flight: outbox entries, holds, settlements waiting, money in pending."""
    outbox = 0
    for p in range(PARTITIONS):
        outbox += await direct.xlen(f"{prefix}{{p{p}}}:outbox")
    holds = 0
    async for name in direct.scan_iter(match=f"{prefix}*:holds:*"):
        holds += await direct.hlen(name)
    waiting = 0
    for sc in sidecars:
        waiting += (await _admin(http, sc, "GET", "/ledger"))["settlements_waiting_for_redis"]
    pending = await pg.fetchval(f"SELECT count(*) FROM {schema}.ledger WHERE NOT applied")
    return {"outbox": outbox, "holds": holds, "settlements_waiting": waiting, "money_in_pending": pending}


async def check(settings: Settings, accounts: list[str], t: Tally) -> tuple[list[str], dict[str, Any]]:
    """The violations found (empty: all good) and the figures."""
    violations: list[str] = []
    async with services(settings) as svc:
        report = await inspect(svc.redis, svc.keys, svc.store)
        rows = await svc.store.pool.fetch(
            "SELECT account_id, sum(amount) FILTER (WHERE kind <> 'usage') AS granted,"
            " coalesce(-sum(amount) FILTER (WHERE kind = 'usage'), 0) AS charged"
            " FROM ledger GROUP BY account_id"
        )
        ledger = {r["account_id"]: (int(r["granted"] or 0), int(r["charged"])) for r in rows}
        totals = collections.Counter[str]()
        for account in accounts:
            view = await svc.balances.balance(account)
            granted, charged = ledger.get(account, (0, 0))
            totals.update(granted=granted, charged=charged, available=view.available, held=view.held)
            if t.granted[account] != granted:
                violations.append(f"{account}: grants acknowledged {t.granted[account]}, ledger {granted}")
            if granted != view.available + view.held + charged:
                violations.append(
                    f"{account}: granted {granted} != available {view.available} + held {view.held}"
                    f" + charged {charged}"
                )
            if view.held or view.holds:
                violations.append(f"{account}: still holds {view.held} after the drain")
    drift = {kind: {"items": n, "microcredits": m} for kind, (n, m) in report.by_kind().items()}
    for kind, figures in drift.items():
        if figures["items"]:
            violations.append(f"drift {kind}: {figures}")
    if t.grants_given_up:
        violations.append(f"{t.grants_given_up} grants never acknowledged in 120 s")
    return violations, {"drift": drift, "totals": dict(totals)}


async def soak(args: argparse.Namespace, redis_url: str, logs: Path) -> int:
    rng = random.Random(args.seed)
    random.seed(args.seed)
    database = args.database_url
    schema = f"soak{uuid.uuid4().hex[:10]}"
    prefix = f"soak{uuid.uuid4().hex[:8]}:"
    pg = await asyncpg.connect(database)
    await pg.execute(f"CREATE SCHEMA {schema}")
    schema_url = f"{database}{'&' if '?' in database else '?'}search_path={schema}"
    direct = aioredis.Redis.from_url(redis_url)
    proxy = await RedisFaultProxy(redis_url).start()
    mock = await asyncio.create_subprocess_exec(
        PY, str(BENCH / "mock_upstream.py"), "--token-delay-ms", "2", stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL, cwd=ROOT,
    )  # fmt: skip
    assert mock.stdout is not None
    line = (await asyncio.wait_for(mock.stdout.readline(), 15)).decode()
    mock_url = line.removeprefix("listening on ").strip()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CREDITGATE_")}
    settings_env = {
        "CREDITGATE_HOST": "127.0.0.1",
        "CREDITGATE_REDIS_URL": proxy.url,
        "CREDITGATE_DATABASE_URL": schema_url,
        "CREDITGATE_KEY_PREFIX": prefix,
        "CREDITGATE_UPSTREAM_URL": f"{mock_url}/v1",
        "CREDITGATE_UPSTREAM_API_KEY": "sk-soak-provider-key",
        "CREDITGATE_ADMIN_TOKEN": ADMIN_TOKEN,
        "CREDITGATE_AUTH_CACHE_SECONDS": "0",
        "CREDITGATE_LOG_LEVEL": "WARNING",
        "CREDITGATE_CACHE_ENABLED": "true",
        "CREDITGATE_REDIS_TIMEOUT_SECONDS": "1",
        "CREDITGATE_HOLD_LEASE_SECONDS": str(LEASE_SECONDS),
        "CREDITGATE_REAPER_INTERVAL_SECONDS": "1",
        "CREDITGATE_RECONCILE_INTERVAL_SECONDS": "5",
        "CREDITGATE_FLUSH_CLAIM_IDLE_SECONDS": "2",
        "CREDITGATE_SHUTDOWN_GRACE_SECONDS": "5",
        "CREDITGATE_MODELS": json.dumps(
            {MODEL: {"prompt": "0.00015", "completion": "0.0006", "max_output_tokens": 64}}
        ),
    }
    env.update(settings_env)
    sidecars = [Sidecar(f"sidecar-{i}", env, logs) for i in range(2)]
    t = Tally()
    started = time.monotonic()
    try:
        async with aiohttp.ClientSession() as http:
            for sc in sidecars:
                await sc.start(http)
            accounts: dict[str, str] = {}
            for _ in range(args.accounts):
                account = (await _admin(http, sidecars[0], "POST", "/accounts", {}))["id"]
                accounts[account] = (await _admin(http, sidecars[0], "POST", f"/accounts/{account}/keys"))[
                    "key"
                ]
                await grant(http, sidecars, account, 10_000_000, t)
            seconds = args.minutes * 60
            every = args.fault_every or max(2.0, min(10.0, seconds / 8))
            until = time.monotonic() + seconds
            workers = [
                client(http, sidecars, accounts, until, t, random.Random(rng.random()))
                for _ in range(args.concurrency)
            ]
            await asyncio.gather(faults(proxy, direct, http, sidecars, every, until, t), *workers)
            load_seconds = time.monotonic() - started
            proxy.faults.clear()
            drain_started = time.monotonic()
            left: dict[str, int] = {}
            while time.monotonic() - drain_started < DRAIN_SECONDS:
                left = await drained(direct, pg, schema, prefix, http, sidecars)
                if not any(left.values()):
                    break
                await asyncio.sleep(0.5)
            drain_seconds = time.monotonic() - drain_started
            codes = [await sc.stop() for sc in sidecars]
        if args.corrupt:  # the checks must catch this: one Redis balance a micro-credit off the ledger
            victim = next(iter(accounts))
            partition = zlib.crc32(victim.encode()) % PARTITIONS
            await direct.hincrby(f"{prefix}{{p{partition}}}:account:{victim}", "balance", 1)
        settings = msgspec.convert(
            {
                "redis_url": redis_url,
                "database_url": schema_url,
                "key_prefix": prefix,
                "upstream_url": mock_url,
            },
            Settings,
        )
        violations, figures = await check(settings, list(accounts), t)
        if any(left.values()):
            violations.append(f"not drained in {DRAIN_SECONDS} s: {left}")
        if any(code != 0 for code in codes):
            violations.append(f"sidecar exit codes at SIGTERM: {codes}")
        summary(args, t, figures, violations, load_seconds, drain_seconds)
        return 1 if violations else 0
    finally:
        for sc in sidecars:
            await sc.kill()
        mock.kill()
        await mock.wait()
        await proxy.close()
        await direct.aclose()
        if not args.keep:
            await pg.execute(f"DROP SCHEMA {schema} CASCADE")
        await pg.close()


def summary(
    args: argparse.Namespace,
    t: Tally,
    figures: dict[str, Any],
    violations: list[str],
    load_seconds: float,
    drain_seconds: float,
) -> None:
    print(
        f"## soak: {args.minutes} min, {args.concurrency} clients, {args.accounts} accounts, seed {args.seed}"
    )
    print(f"load {load_seconds:.0f} s, drain {drain_seconds:.1f} s")
    print("\n| kind | status | requests |\n|---|---|---|")
    for (kind, status), n in sorted(t.requests.items()):
        print(f"| {kind} | {status} | {n} |")
    print(f"| all | | {sum(t.requests.values())} |")
    print("\n| fault | injected |\n|---|---|")
    for fault in FAULTS:
        print(f"| {fault} | {t.faults[fault]} |")
    print("\n| drift kind | items | micro-credits |\n|---|---|---|")
    for kind, d in figures["drift"].items():
        print(f"| {kind} | {d['items']} | {d['microcredits']} |")
    tot = figures["totals"]
    print(
        f"\ntotals (micro-credits): granted {tot.get('granted', 0)} = available {tot.get('available', 0)}"
        f" + held {tot.get('held', 0)} + charged {tot.get('charged', 0)}"
    )
    if violations:
        print("\nVIOLATIONS:")
        for v in violations:
            print(f"- {v}")
    else:
        print("\nconservation: ok; ledger = Redis: ok (no drift of any kind)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--minutes", type=float, default=30.0, help="load time (the drain comes after)")
    parser.add_argument(
        "--fault-every", type=float, default=0.0, help="seconds between faults (0: 10, less for short runs)"
    )
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--accounts", type=int, default=8)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--database-url",
        default=os.environ.get("SOAK_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test"),
    )
    parser.add_argument("--keep", action="store_true", help="keep the Postgres schema")
    parser.add_argument(
        "--corrupt",
        action="store_true",
        help="after the drain, move one Redis balance by 1 micro-credit (the checks must then fail)",
    )
    args = parser.parse_args()
    logs = Path(tempfile.mkdtemp(prefix="creditgate-soak-"))
    with redis_server(logs) as redis_url:
        code = asyncio.run(soak(args, redis_url, logs))
    print(f"logs: {logs}")
    return code


if __name__ == "__main__":
    sys.exit(main())
