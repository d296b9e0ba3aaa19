"""What Redis spends per request: commands, server CPU per script, memory per account (run by hand).

    python bench/redis_cost.py [--part commands,cpu,memory] [--requests 300] [--pairs 200000]
        [--procs 3] [--concurrency 256] [--accounts 100000] [--redis-server PATH]

Every part runs against a throwaway ``redis-server`` of its own (as bench/marker_memory.py starts one:
a free loopback port, no persistence), so no other traffic is counted.

- **commands**: the real sidecar app (``create_app``) in-process on a real port, in front of the fast
  mock upstream (bench/mock_upstream.py, a subprocess), with a fresh Postgres schema (dropped at the end)
  and the flusher, reaper and reconciler off while requests are counted. For each request kind,
  ``CONFIG RESETSTAT``, ``--requests`` sequential requests, then ``INFO commandstats``: calls per
  request of every command. ``MONITOR`` during the same requests splits them into what the sidecar sent
  (top level) and what the scripts ran inside Redis (``[… lua]``). A second pass of the same requests
  without ``MONITOR`` reads the server's CPU (``INFO cpu``) per request. Then the background work: one
  flusher ``drain`` of the rows the requests left (XREADGROUP/XACK/XDEL per row at
  ``flush_batch_size``), the idle flusher's polling per second, one lease renewal of 1,000 holds, one
  reaper pass.
- **cpu**: ``--procs`` client processes, each with its own auto-pipeline (``sidecar.autopipeline``) and
  ``--concurrency`` requests in flight over 10,000 accounts, drive the real reserve, then settle, then
  reserve + settle pairs through ``Balances``; the server's ``used_cpu_user + used_cpu_sys`` delta per
  call is its CPU per script. Cross-checked with ``redis-benchmark`` running EVALSHA of the real
  reserve.lua and settle.lua with ``__rand_int__`` in keys and request ids.
- **memory**: ``used_memory`` added by ``--accounts`` accounts created as the sidecar creates them
  (``AccountDirectory.add_account`` + ``add_key``: balance hash, account set member, key records), by
  as many in-flight holds (``reserve``), and by response-cache entries of a 1 KB and a 4 KB answer
  (``ResponseCache.entry`` encodings stored as the settle script stores them).

Environment: BENCH_DATABASE_URL (postgresql://postgres@127.0.0.1:5432/test), for the commands part.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import platform
import re
import secrets
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import msgspec
import redis
from aiohttp.test_utils import TestServer
from multidict import CIMultiDict, CIMultiDictProxy
from redis.asyncio import Redis

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))
sys.path.insert(0, str(BENCH))
from marker_memory import cpu_model, throwaway_redis  # noqa: E402

from sidecar.accounts import AccountDirectory, new_key  # noqa: E402
from sidecar.app import FLUSHER, PROXY, SERVICES, create_app  # noqa: E402
from sidecar.autopipeline import AutoPipeline  # noqa: E402
from sidecar.balances import Balances, load_lua  # noqa: E402
from sidecar.cache import CachePolicy, ResponseCache  # noqa: E402
from sidecar.config import Settings  # noqa: E402
from sidecar.keys import KeySpace  # noqa: E402
from sidecar.outbox import UsageEvent, encode_event  # noqa: E402
from sidecar.pricing import Usage  # noqa: E402

PARTITIONS = 16
MODEL = "bench-model"
ADMIN = "bench-admin-token"
IGNORED = {"config", "config|resetstat", "info", "echo", "monitor", "ping", "client|setname", "hello"}


# ---- helpers ---------------------------------------------------------------------------------------


def server_cpu(client: redis.Redis) -> float:
    info = client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def command_calls(client: redis.Redis) -> Counter[str]:
    stats = client.info("commandstats")
    return Counter(
        {
            name.removeprefix("cmdstat_"): int(v["calls"])
            for name, v in stats.items()
            if name.removeprefix("cmdstat_") not in IGNORED
        }
    )


class Monitor:
    """``MONITOR`` on a raw socket in a thread: counts commands sent by clients and run by scripts."""

    LINE = re.compile(rb'^\+?\d+\.\d+ \[\d+ ([^\]]+)\] "([^"]+)"')

    def __init__(self, url: str) -> None:
        host, port = url.removeprefix("redis://").split("/")[0].split(":")
        self.sock = socket.create_connection((host, int(port)))
        self.sock.sendall(b"MONITOR\r\n")
        self.top: Counter[str] = Counter()
        self.lua: Counter[str] = Counter()
        self.stop_word = "creditgate-bench-" + uuid.uuid4().hex
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        buf = b""
        while True:
            data = self.sock.recv(1 << 16)
            if not data:
                return
            buf += data
            *lines, buf = buf.split(b"\r\n")
            for line in lines:
                if self.stop_word.encode() in line:
                    self.done.set()
                    return
                m = self.LINE.match(line)
                if not m:
                    continue
                cmd = m.group(2).decode().lower()
                if cmd in IGNORED:
                    continue
                (self.lua if m.group(1).startswith(b"lua") else self.top)[cmd] += 1

    def finish(self, client: redis.Redis) -> None:
        client.echo(self.stop_word)
        if not self.done.wait(30):
            raise RuntimeError("MONITOR never saw the end marker")
        self.sock.close()


def machine_line(client: redis.Redis) -> str:
    info = client.info("server")
    return (
        f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {cpu_model()}; "
        f"load average {Path('/proc/loadavg').read_text().split()[:3]}; Redis {info['redis_version']}; "
        f"Python {platform.python_version()}"
    )


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


# ---- part a: commands per request ------------------------------------------------------------------


def chat(prompt: str, *, stream: bool, temperature: float) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": MODEL,
        "temperature": temperature,
        "max_tokens": 16,
        "messages": [{"role": "user", "content": prompt}],
    }
    if stream:
        body["stream"] = True
    return body


async def commands_part(url: str, database_url: str, requests: int) -> None:
    sync = redis.Redis.from_url(url)
    mock = subprocess.Popen(  # noqa: ASYNC220 (started once, before any request)
        [sys.executable, str(BENCH / "mock_upstream.py"), "--token-delay-ms", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    schema = f"bench_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(database_url)
    await admin.execute(f"CREATE SCHEMA {schema}")
    try:
        assert mock.stdout is not None
        mock_url = mock.stdout.readline().decode().removeprefix("listening on ").strip()
        raw: dict[str, Any] = {
            "redis_url": url,
            "database_url": f"{database_url}{'&' if '?' in database_url else '?'}search_path={schema}",
            "key_prefix": "cg:",
            "upstream_url": f"{mock_url}/v1",
            "upstream_api_key": "sk-bench-provider-key",
            "admin_token": ADMIN,
            "flusher_enabled": False,  # counted apart, below
            "reconcile_interval_seconds": 0,
            "reaper_interval_seconds": 3600,
            "log_requests": False,
            "models": {MODEL: {"prompt": "0.00015", "completion": "0.0006", "max_output_tokens": 4096}},
        }
        settings = msgspec.convert(raw, Settings)
        app = create_app(settings)
        server = TestServer(app, host="127.0.0.1")
        await server.start_server()
        try:
            await drive_requests(app, str(server.make_url("")), url, sync, settings, requests)
        finally:
            await server.close()
    finally:
        await admin.execute(f"DROP SCHEMA {schema} CASCADE")
        await admin.close()
        mock.terminate()
        mock.wait(10)


async def drive_requests(
    app: Any, base: str, url: str, sync: redis.Redis, settings: Settings, n: int
) -> None:
    auth = {"Authorization": f"Bearer {ADMIN}"}
    async with aiohttp.ClientSession(base) as http:

        async def new_account(credits: str | None) -> str:
            async with http.post("/admin/accounts", json={}, headers=auth) as r:
                account = (await r.json())["id"]
            if credits:
                headers = auth | {"Idempotency-Key": uuid.uuid4().hex}
                async with http.post(
                    f"/admin/accounts/{account}/grants", json={"credits": credits}, headers=headers
                ) as r:
                    assert r.status < 300, await r.text()
            async with http.post(f"/admin/accounts/{account}/keys", headers=auth) as r:
                key: str = (await r.json())["key"]
            return key

        funded, broke = await new_account("1000000"), await new_account(None)
        run_id = uuid.uuid4().hex[:8]
        counter = iter(range(10**9))
        kinds: list[tuple[str, str, Callable[[], dict[str, Any]], int]] = [
            (
                "non-streamed, not cacheable (temperature 1)",
                funded,
                lambda: chat(f"{run_id} {next(counter)}", stream=False, temperature=1),
                200,
            ),
            (
                "streamed, not cacheable (temperature 1)",
                funded,
                lambda: chat(f"{run_id} {next(counter)}", stream=True, temperature=1),
                200,
            ),
            (
                "non-streamed cache miss that stores (temperature 0)",
                funded,
                lambda: chat(f"{run_id} {next(counter)}", stream=False, temperature=0),
                200,
            ),
            (
                "streamed cache miss that stores (temperature 0)",
                funded,
                lambda: chat(f"{run_id} {next(counter)}", stream=True, temperature=0),
                200,
            ),
            (
                "cache hit (non-streamed)",
                funded,
                lambda: chat(f"{run_id} the repeated question", stream=False, temperature=0),
                200,
            ),
            (
                "402, nothing available (temperature 1)",
                broke,
                lambda: chat(f"{run_id} {next(counter)}", stream=False, temperature=1),
                402,
            ),
        ]
        proxy = app[PROXY]

        async def send(key: str, body: dict[str, Any], status: int) -> None:
            headers = {"Authorization": f"Bearer {key}"}
            async with http.post("/v1/chat/completions", json=body, headers=headers) as r:
                await r.read()
                assert r.status == status, (r.status, await r.text())

        async def settled() -> None:
            deadline = time.monotonic() + 30
            while proxy.in_flight:  # a stream settles after the client has its answer
                if time.monotonic() > deadline:
                    raise RuntimeError("requests still in flight after 30 s")
                await asyncio.sleep(0.005)

        idle = idle_cpu(sync)
        print(
            f"\n## Commands per request ({n} sequential requests per kind; auth_cache_seconds "
            f"{settings.auth_cache_seconds:g}, so each key's HGET is counted once per that many seconds)"
        )
        print(f"load average {loadavg()}; server idle CPU {idle * 1e6:.0f} µs/s, subtracted\n")
        print(
            "| request kind | scripts (EVALSHA) | other commands sent | commands run inside scripts | "
            "all commands (commandstats) | Redis CPU µs/request (no MONITOR) |"
        )
        print("|---|--:|--:|---|--:|--:|")
        for title, key, body, status in kinds:
            for _ in range(5):  # warm: the key's auth lookup, the hit's stored entry
                await send(key, body(), status)
            await settled()
            sync.config_resetstat()
            monitor = Monitor(url)
            for _ in range(n):
                await send(key, body(), status)
            await settled()
            monitor.finish(sync)
            calls = command_calls(sync)
            # the same again without MONITOR, for the server's CPU
            cpu0, wall0 = server_cpu(sync), time.perf_counter()
            for _ in range(n):
                await send(key, body(), status)
            await settled()
            cpu = server_cpu(sync) - cpu0 - idle * (time.perf_counter() - wall0)
            scripts = monitor.top.get("evalsha", 0) + monitor.top.get("eval", 0)
            others = {c: k for c, k in monitor.top.items() if c not in ("evalsha", "eval")}
            assert sum(monitor.top.values()) + sum(monitor.lua.values()) == sum(calls.values()), (
                monitor.top,
                monitor.lua,
                calls,
            )
            print(
                f"| {title} | {scripts / n:.2f} | "
                f"{fmt(others, n) or '0'} | {fmt(dict(monitor.lua), n)} | "
                f"{sum(calls.values()) / n:.2f} | {cpu / n * 1e6:.0f} |"
            )
        clients = int(sync.info("clients")["connected_clients"]) - 1  # less this bench's own
        print(f"\nRedis connections of the sidecar process after these requests: {clients}")
        await background(app, url, sync, settings, n)
        pool = app[SERVICES].store.pool
        print(
            f"\nPostgres connections of the sidecar process after the drain: {pool.get_size()} "
            f"(pool max_size {pool.get_max_size()})"
        )


def idle_cpu(client: redis.Redis, seconds: float = 3.0) -> float:
    """The server's CPU seconds per second with no traffic (its cron), subtracted from per-request CPU."""
    cpu0, wall0 = server_cpu(client), time.perf_counter()
    time.sleep(seconds)
    return (server_cpu(client) - cpu0) / (time.perf_counter() - wall0)


def fmt(counts: dict[str, int], n: int) -> str:
    return ", ".join(f"{c.upper()} {k / n:.3g}" for c, k in sorted(counts.items(), key=lambda item: -item[1]))


async def background(app: Any, url: str, sync: redis.Redis, settings: Settings, n: int) -> None:
    svc = app[SERVICES]
    flusher = app[FLUSHER]
    backlog, _ = await flusher.backlog()
    print(f"\n## Background work (load average {loadavg()})\n")
    print("| work | commands (commandstats) | per |")
    print("|---|---|---|")
    sync.config_resetstat()
    cpu0 = server_cpu(sync)
    rows = await flusher.drain()
    drain_cpu = server_cpu(sync) - cpu0
    calls = command_calls(sync)
    print(
        f"| flusher: one drain of {rows:,} outbox rows (flush_batch_size {settings.flush_batch_size}, "
        f"{settings.partitions} partitions) | {fmt(dict(calls), 1)} | "
        f"{sum(calls.values()):,} commands in all, {sum(calls.values()) / rows:.3f} per row; "
        f"Redis CPU {drain_cpu / rows * 1e6:.1f} µs per row |"
    )
    assert rows == backlog, (rows, backlog)
    # the idle flusher: its loop polling an empty outbox
    sync.config_resetstat()
    task = asyncio.create_task(flusher.run())
    started = time.monotonic()
    await asyncio.sleep(5)
    flusher.stop()
    await task
    seconds = time.monotonic() - started
    calls = command_calls(sync)
    print(
        f"| flusher, idle (flush_interval_seconds {settings.flush_interval_seconds:g}) | "
        f"{fmt(dict(calls), 1)} in {seconds:.1f} s | "
        f"{sum(calls.values()) / seconds:.0f} commands/s per flusher |"
    )
    # lease renewal: one pipelined ZADD per request in flight, every hold_lease_seconds / 3
    holds = [(f"acct_{i % 100}", "req_" + secrets.token_hex(16)) for i in range(1000)]
    sync.config_resetstat()
    await svc.balances.renew(holds, int(time.time() * 1000) + 900_000)
    calls = command_calls(sync)
    print(
        f"| lease renewal of 1,000 requests in flight (every {settings.hold_lease_seconds / 3:g} s) | "
        f"{fmt(dict(calls), 1000)} | per request in flight per renewal |"
    )
    sync.config_resetstat()
    await svc.balances.expire_holds(int(time.time() * 1000))
    calls = command_calls(sync)
    print(
        f"| hold reaper, one pass, nothing expired (every reaper_interval_seconds, default 5 s) | "
        f"{fmt(dict(calls), 1)} | per pass per node |"
    )


# ---- part b: CPU per script ------------------------------------------------------------------------


def cpu_worker(
    url: str, mode: str, ids: list[str], accounts: int, concurrency: int, go: Any, ready: Any
) -> None:
    asyncio.run(_cpu_worker(url, mode, ids, accounts, concurrency, go, ready))


async def _cpu_worker(
    url: str, mode: str, ids: list[str], accounts: int, concurrency: int, go: Any, ready: Any
) -> None:
    r = Redis.from_url(url)
    keys = KeySpace("cg:", PARTITIONS)
    pipeline = AutoPipeline(url)
    balances = Balances(r, keys, settled_marker_ms=3600_000, pipeline=pipeline)
    await balances.load_scripts()
    event = UsageEvent(
        route="chat", model="gpt-4o-mini", outcome="ok", prompt_tokens=20, completion_tokens=50
    )
    window = int(time.time() * 1000) + 3600_000
    lease = int(time.time() * 1000) + 900_000
    # one call of each first, so that the connection is up before the clock starts
    await balances.reserve("acct_000000", "req_warm" + secrets.token_hex(8), 0, lease, window_end_ms=window)
    ready.release()
    while not go.is_set():  # noqa: ASYNC110
        await asyncio.sleep(0.001)
    todo = iter(enumerate(ids))

    async def run() -> None:
        for _, rid in todo:
            account = f"acct_{int(rid[-8:], 16) % accounts:06d}"
            if mode in ("reserve", "pair"):
                await balances.reserve(account, rid, 20_000, lease, window_end_ms=window)
            if mode in ("settle", "pair"):
                await balances.settle(account, rid, 7_500, event, window_end_ms=window)
            if mode == "hit":  # the entry exists: the reserve returns it, a record-only settle follows
                cached = await balances.reserve(
                    account, rid, 20_000, lease, cache_key=hit_key(keys, account), window_end_ms=window
                )
                assert cached.cached is not None
                await balances.settle(account, rid, 0, event, record=True, window_end_ms=window)

    await asyncio.gather(*(run() for _ in range(concurrency)))
    await pipeline.aclose()
    await r.aclose()


def hit_key(keys: KeySpace, account: str) -> str:
    return keys.account(account).cache("0" * 64)


def cpu_run(
    url: str, mode: str, ids: list[str], procs: int, accounts: int, concurrency: int
) -> tuple[float, float, Counter[str]]:
    """(server CPU seconds, wall seconds, commands) of one run of `mode` over `ids`."""
    sync = redis.Redis.from_url(url)
    ctx = multiprocessing.get_context("spawn")
    go, ready = ctx.Event(), ctx.Semaphore(0)
    shares = [ids[i::procs] for i in range(procs)]
    workers = [
        ctx.Process(target=cpu_worker, args=(url, mode, share, accounts, concurrency, go, ready))
        for share in shares
    ]
    for w in workers:
        w.start()
    for _ in workers:
        if not ready.acquire(timeout=60):
            raise RuntimeError("a client process did not start")
    sync.config_resetstat()
    cpu0, wall0 = server_cpu(sync), time.perf_counter()
    go.set()
    for w in workers:
        w.join()
        if w.exitcode:
            raise RuntimeError(f"client process exited with {w.exitcode}")
    wall = time.perf_counter() - wall0
    cpu = server_cpu(sync) - cpu0
    return cpu, wall, command_calls(sync)


def cpu_part(url: str, pairs: int, procs: int, concurrency: int) -> None:
    sync = redis.Redis.from_url(url)
    keys = KeySpace("cg:", PARTITIONS)
    accounts = 10_000
    pipe = sync.pipeline(transaction=False)
    for i in range(accounts):
        pipe.hset(keys.account(f"acct_{i:06d}").balance, mapping={"balance": 10**15, "held": 0})
    pipe.execute()
    entry = b"x" * 1065  # the size of a 1 KB answer's entry (the scripts do not read it)
    for i in range(accounts):
        pipe.set(hit_key(keys, f"acct_{i:06d}"), entry, px=3600_000)
    pipe.execute()
    print(
        f"\n## Redis CPU per script ({pairs:,} calls per run, {procs} client processes × {concurrency} "
        f"in flight, {accounts:,} accounts)\n"
    )
    print(
        "| run | load average before | server CPU (busy) | µs of Redis CPU per call | EVALSHA calls | "
        "achieved calls/s | calls/s per Redis core (1 / CPU per call) |"
    )
    print("|---|---|--:|--:|--:|--:|--:|")
    results: dict[str, float] = {}
    for attempt in range(2):
        ids = ["req_" + secrets.token_hex(16) for _ in range(pairs)]
        for mode, these in (("reserve", ids), ("settle", ids), ("pair", None), ("hit", None)):
            run_ids = these if these is not None else ["req_" + secrets.token_hex(16) for _ in range(pairs)]
            load = loadavg()
            cpu, wall, calls = cpu_run(url, mode, run_ids, procs, accounts, concurrency)
            scripts = calls.get("evalsha", 0) + calls.get("eval", 0)
            per = cpu / pairs
            results[f"{mode}{attempt}"] = per
            title = {
                "reserve": "reserve",
                "settle": "settle (of those holds)",
                "pair": "reserve + settle",
                "hit": "cache hit: reserve finding the entry + record-only settle",
            }
            unit = "pair" if mode in ("pair", "hit") else "call"
            print(
                f"| {title[mode]}, run {attempt + 1} | {load} | {cpu:.2f} s ({cpu / wall:.0%}) | "
                f"{per * 1e6:.1f} per {unit} | "
                f"{scripts:,} | {pairs / wall:,.0f} {unit}s/s | {1 / per:,.0f} {unit}s/s |"
            )
            sync.delete(*(keys.outbox(p) for p in range(PARTITIONS)))
    benchmark_part(url, pairs)


def benchmark_part(url: str, n: int) -> None:
    binary = shutil.which("redis-benchmark")
    if binary is None:
        print("\nredis-benchmark not found: no cross-check")
        return
    sync = redis.Redis.from_url(url)
    port = url.rsplit(":", 1)[1].split("/")[0]
    reserve = sync.script_load(load_lua("reserve"))
    settle = sync.script_load(load_lua("settle"))
    accounts = 100_000
    pipe = sync.pipeline(transaction=False)
    for i in range(accounts):
        pipe.hset(f"rb:{{p0}}:account:{i:012d}", mapping={"balance": 10**15, "held": 0})
    pipe.execute()
    window = str(int(time.time() * 1000) + 3600_000)
    lease = str(int(time.time() * 1000) + 900_000)
    event = encode_event(UsageEvent(route="chat", model="gpt-4o-mini", outcome="ok", request_id="r"))
    # __rand_int__ is replaced by a random 12-digit number below -r, each occurrence on its own: the
    # account exists (0 .. accounts-1), the request id, marker and holds hash are spread as many.
    now = str(int(time.time() * 1000))
    keep = str(int(time.time() * 1000) + 40 * 86_400_000)
    acct, wallet = (
        "rb:{p0}:account:__rand_int__",
        [
            "rb:{p0}:grants:__rand_int__",
            "rb:{p0}:wallet-due",
            "rb:{p0}:outbox",
            "rb:{p0}:caps:__rand_int__",
            "rb:{p0}:cap-held:__rand_int__",
            "rb:{p0}:hold-scopes:__rand_int__",
            "rb:{p0}:spend:__rand_int__:total",
            "rb:{p0}:spend:__rand_int__:d",
            "rb:{p0}:spend:__rand_int__:m",
        ],
    )
    commands = {
        "reserve.lua": [
            "EVALSHA", reserve, "13", acct, "rb:{p0}:holds:__rand_int__",
            "rb:{p0}:hold-expiry", "rb:{p0}:settled:req___rand_int__", *wallet[:3], *wallet[3:],
            "req___rand_int__", "20000", lease, "acct req___rand_int__", window, "acct", now, "0", "",
            "account",
        ],
        "settle.lua": [
            "EVALSHA", settle, "13", acct, "rb:{p0}:holds:__rand_int__",
            "rb:{p0}:hold-expiry", "rb:{p0}:settled:req___rand_int__", "rb:{p0}:outbox", *wallet[:2],
            *wallet[3:],
            "req___rand_int__", "7500", window, "acct req___rand_int__", "0", event.decode(), "", "0", "acct",
            now, "0", keep, keep, "account",
        ],
    }  # fmt: skip
    print(
        f"\n## redis-benchmark cross-check (EVALSHA of the real scripts, -n {n} -c 50 -P 16 "
        f"-r {accounts}; load average {loadavg()})\n"
    )
    print("| script | redis-benchmark requests/s | µs of Redis CPU per call | calls/s per Redis core |")
    print("|---|--:|--:|--:|")
    for name, argv in commands.items():
        sync.config_resetstat()
        cpu0 = server_cpu(sync)
        out = subprocess.run(
            [binary, "-p", port, "-n", str(n), "-c", "50", "-P", "16", "-r", str(accounts), "-q", *argv],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        cpu = server_cpu(sync) - cpu0
        calls = command_calls(sync).get("evalsha", 0)
        found = re.findall(r"([\d.]+) requests per second", out.replace(",", ""))
        rps = float(found[-1]) if found else float("nan")
        print(f"| {name} | {rps:,.0f} | {cpu / calls * 1e6:.1f} | {calls / cpu:,.0f} |")
        sync.delete("rb:{p0}:outbox")


# ---- part c: memory per account --------------------------------------------------------------------


def used_memory(client: redis.Redis) -> int:
    return int(client.info("memory")["used_memory"])


async def memory_part(url: str, n: int) -> None:
    sync = redis.Redis.from_url(url)
    sync.flushall()
    r = Redis.from_url(url)
    keys = KeySpace("cg:", PARTITIONS)
    directory = AccountDirectory(r, keys, cache_seconds=0)
    pipeline = AutoPipeline(url)
    balances = Balances(r, keys, settled_marker_ms=3600_000, pipeline=pipeline)
    await balances.load_scripts()
    print(f"\n## Memory ({n:,} of each; load average {loadavg()})\n")
    print("| what | used_memory added | per item | per million |")
    print("|---|--:|--:|--:|")

    def row(what: str, added: int, count: int) -> None:
        print(
            f"| {what} | {added / 2**20:,.1f} MiB | {added / count:,.0f} B | "
            f"{added / count * 1e6 / 2**30:,.2f} GiB |"
        )

    accounts = [f"acct_{secrets.token_hex(8)}" for _ in range(n)]  # ids as admin makes them
    before = used_memory(sync)
    await bounded(n, 64, lambda i: directory.add_account(accounts[i]))
    after_accounts = used_memory(sync)
    row("account: balance hash (balance, held, created_at) + account set member", after_accounts - before, n)
    await bounded(n, 64, lambda i: directory.add_key(new_key(accounts[i])))
    after_keys = used_memory(sync)
    row("one API key: hash record, id record, account's key set member", after_keys - after_accounts, n)
    # in-flight holds: one per account (holds hash entry, hold-expiry zset member, held field)
    pipe = sync.pipeline(transaction=False)
    for account in accounts:
        pipe.hset(keys.account(account).balance, "balance", 10**12)
    pipe.execute()
    lease = int(time.time() * 1000) + 900_000
    rids = ["req_" + secrets.token_hex(16) for _ in range(n)]
    before = used_memory(sync)
    await bounded(n, 256, lambda i: balances.reserve(accounts[i], rids[i], 20_000, lease))
    row("a hold in flight (first of its account: the holds hash is new)", used_memory(sync) - before, n)
    rids2 = ["req_" + secrets.token_hex(16) for _ in range(n)]
    before = used_memory(sync)
    await bounded(n, 256, lambda i: balances.reserve(accounts[i], rids2[i], 20_000, lease))
    row("a second hold in flight on the same accounts", used_memory(sync) - before, n)
    # settled requests: their marker and outbox entry (the stream grows while the flusher is behind)
    event = UsageEvent(
        route="chat", model="gpt-4o-mini", outcome="ok", prompt_tokens=20, completion_tokens=16
    )

    async def settle(i: int) -> None:
        await balances.settle(accounts[i], rids[i], 7_500, event)
        await balances.settle(accounts[i], rids2[i], 7_500, event)

    before = used_memory(sync)
    await bounded(n, 256, settle)
    settled_all = used_memory(sync) - before
    entries = sum(int(sync.xlen(keys.outbox(p))) for p in range(PARTITIONS))
    sync.delete(*(keys.outbox(p) for p in range(PARTITIONS)))
    outbox = settled_all - (used_memory(sync) - before)
    row(f"an outbox entry (of {entries:,}: a settle's usage event, not yet flushed)", outbox, entries)
    # cache entries as the settle script stores them: the encoded CachedResponse, TTL 1 h
    cache = ResponseCache(CachePolicy.of(msgspec.convert({}, Settings)), r, keys)
    headers = CIMultiDictProxy(CIMultiDict([("Content-Type", "application/json")]))
    from hotpath import _body  # a chat completion of about the size asked

    for size in (1024, 4096):
        body = _body(size)
        made = cache.entry(body, stream=False, headers=headers, usage=Usage(20, 16, 0), now_ms=0)
        assert made is not None
        encoded = made[1]
        count = min(n, 200_000)
        before = used_memory(sync)
        pipe = sync.pipeline(transaction=False)
        for i in range(count):
            pipe.set(keys.account(accounts[i]).cache(secrets.token_hex(32)), encoded, px=3600_000)
            if i % 2000 == 1999:
                pipe.execute()
        pipe.execute()
        added = used_memory(sync) - before
        print(
            f"| cache entry of a {len(body):,} B answer (entry {len(encoded):,} B encoded), {count:,} | "
            f"{added / 2**20:,.1f} MiB | {added / count:,.0f} B | {added / count * 1e6 / 2**30:,.2f} GiB |"
        )
    cache.close()
    await pipeline.aclose()
    await r.aclose()


async def bounded(n: int, width: int, call: Callable[[int], Any]) -> None:
    todo = iter(range(n))

    async def run() -> None:
        for i in todo:
            await call(i)

    await asyncio.gather(*(run() for _ in range(width)))


# ---- main ------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--part", default="commands,cpu,memory")
    parser.add_argument("--requests", type=int, default=300, help="requests per kind (commands)")
    parser.add_argument("--pairs", type=int, default=200_000, help="calls per run (cpu)")
    parser.add_argument("--procs", type=int, default=3, help="client processes (cpu)")
    parser.add_argument("--concurrency", type=int, default=256, help="calls in flight per process (cpu)")
    parser.add_argument("--accounts", type=int, default=100_000, help="accounts (memory)")
    debian = "/usr/bin/redis-server"  # Redis 7 here; a venv may put an older one first on PATH
    parser.add_argument(
        "--redis-server", default=debian if Path(debian).exists() else shutil.which("redis-server")
    )
    args = parser.parse_args()
    parts = set(args.part.split(","))
    database_url = os.environ.get("BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test")
    with throwaway_redis(args.redis_server) as url:
        print(machine_line(redis.Redis.from_url(url)))
        if "commands" in parts:
            asyncio.run(commands_part(url, database_url, args.requests))
        if "cpu" in parts:
            cpu_part(url, args.pairs, args.procs, args.concurrency)
        if "memory" in parts:
            asyncio.run(memory_part(url, args.accounts))


if __name__ == "__main__":
    main()
