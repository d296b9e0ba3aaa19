"""Overhead benchmark: what creditgate costs over talking to the upstream directly, in one command.

    python bench/overhead.py [--quick] [--no-cache] [--rounds 3] [--seconds 5] [--scenarios KEY,…]
        [--profile FILE [--profile-scenario ns64] [--profile-hits | --profile-bare]]

Starts a fast mock upstream (bench/mock_upstream.py), a bare aiohttp pass-through proxy
(bench/bare_proxy.py, the ceiling for any aiohttp proxy) and ``creditgate serve`` as a real subprocess
against the running Redis and Postgres (a fresh key prefix and a fresh schema, both removed at the end),
with everything on: auth, reserve, settle, outbox, the flusher writing to Postgres, and the cache
(enabled, but missed: every request body is unique) when this build has one. Then, for each scenario,
every target is loaded in turn by bench/loadgen.py (a separate process), A B C A B C …, and the medians
of the rounds are compared. Prints markdown tables: per-target figures with ratios and deltas against
direct and against the bare proxy, then each goal with its verdict, plus creditgate's RSS after the load
and its time from spawn to ready.

Scenarios (``--scenarios`` runs a subset, e.g. ``st64,slow1000``; default all): ns1, ns64 (non-streamed
at c=1 and c=64), st64 (streamed, 16 tokens 5 ms apart, c=64), st64busy (st64 while the mock burns
BURN_MOCK_US of CPU before every write and loadgen BURN_LOADGEN_US after every response, so that the
server under test competes for the cores as beside a real application) and slow1000 (1,000 concurrent
streams of 16 tokens 150 ms apart, the connections' first requests ramped over one stream's length; the
server's RSS is sampled during the load).

``--profile FILE`` instead runs only creditgate under one scenario's load (``--profile-scenario``,
default the non-streamed c=64; ``--profile-hits`` for cache hits, ``--profile-bare`` the bare proxy)
while ``py-spy`` (not a project dependency: ``pip install py-spy``) records it (``.svg`` flame graph,
``.json`` speedscope, anything else raw collapsed stacks).

Environment: BENCH_REDIS_URL (redis://127.0.0.1:6379/0), BENCH_DATABASE_URL
(postgresql://postgres@127.0.0.1:5432/test).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http.client
import json
import os
import resource
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import types
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import asyncpg
import redis

from sidecar.config import Settings

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
PY = sys.executable
MODEL = "bench-model"
PROMPT = "Benchmark request {run}-__N__: please answer with sixteen tokens."
SLOW_MODEL = "bench-model-slow"  # the mock streams it 150 ms apart
BUSY_MODEL = "bench-model-busy"  # the mock burns BURN_MOCK_US before every write of it
BURN_MOCK_US = 40  # per write: ~0.5 core at the st64 rate (16 chunks + the tail per stream)
BURN_LOADGEN_US = 200  # per response
# Goals from issue #13 (ratios from one interleaved run on a shared 2-core machine).
GOAL_STREAM_TTFB_VS_BARE_MS = 1.0  # streamed c=64: added TTFB p50 over the bare proxy
GOAL_STREAM_RPS_VS_DIRECT = 0.97
GOAL_STREAM_CPU_VS_BARE = 1.3
GOAL_RPS_VS_BARE = 0.6  # non-streamed c=64
GOAL_CPU_VS_BARE = 1.6  # non-streamed c=64
GOAL_HITS_VS_BARE = 1.0  # non-streamed c=64, cache hits
GOAL_ADDED_P50_MS = 0.6  # non-streamed c=1, over direct
GOAL_RSS_MB = 64.0  # after the c<=64 load
GOAL_READY_S = 0.5
GOAL_SLOW_P99_VS_BARE = 1.2  # slow1000: TTFB p99 and stream p99
GOAL_SLOW_RSS_MB = 100.0  # slow1000: peak sampled during the load


@dataclass(frozen=True)
class Scenario:
    key: str
    title: str
    concurrency: int
    stream: bool
    model: str = MODEL
    burn_us: float = 0.0  # loadgen's CPU per response
    ramp: float = 0.0  # loadgen spreads the first requests over this many seconds
    min_seconds: float = 0.0  # a measured window at least this long (slow streams)
    hits: bool = True  # run the cache-hit target too


@dataclass(frozen=True)
class Target:
    key: str
    title: str
    url: str
    unique: bool  # a body unique per request (a cache miss), else one repeated body (a cache hit)
    pid: int  # the server process whose CPU time is charged to this target


@dataclass
class Stats:
    rounds: list[dict[str, Any]] = field(default_factory=list)

    def median(self, metric: str, pct: str | None = None) -> float:
        values = [r[metric][pct] if pct else r[metric] for r in self.rounds if r[metric] is not None]
        return statistics.median(values) if values else float("nan")

    def total(self, metric: str) -> int:
        return sum(int(r[metric]) for r in self.rounds)


SCENARIOS = [
    Scenario("ns1", "non-streamed, c=1", 1, False),
    Scenario("ns64", "non-streamed, c=64", 64, False),
    Scenario("st64", "streamed (16 tokens, 5 ms apart), c=64", 64, True),
    Scenario(
        "st64busy",
        f"streamed, c=64, contended (mock {BURN_MOCK_US} µs/write, loadgen {BURN_LOADGEN_US} µs/response)",
        64,
        True,
        model=BUSY_MODEL,
        burn_us=BURN_LOADGEN_US,
    ),
    Scenario(
        "slow1000",
        "1,000 slow streams (16 tokens, 150 ms apart), c=1000",
        1000,
        True,
        model=SLOW_MODEL,
        ramp=2.4,
        min_seconds=2.5,
        hits=False,
    ),
]
BY_KEY = {sc.key: sc for sc in SCENARIOS}


# ---- processes --------------------------------------------------------------------------------------


class Children:
    """Every process this run starts; all are stopped at the end, whatever happens."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        log = (self.logs / f"{name}.log").open("ab")
        proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=log)
        log.close()
        self.procs[name] = proc
        return proc

    def spawn_listening(self, name: str, argv: list[str]) -> str:
        """Start a bench server and return the URL it prints once it listens."""
        proc = self.spawn(name, argv)
        assert proc.stdout is not None
        line = _readline(proc.stdout, 15)
        if not line.startswith("listening on "):
            raise RuntimeError(f"{name} did not start: {line!r}\n{self.tail(name)}")
        return line.removeprefix("listening on ").strip()

    def tail(self, name: str) -> str:
        path = self.logs / f"{name}.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""

    def stop(self, name: str, timeout: float = 20) -> None:
        proc = self.procs.pop(name, None)
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()

    def stop_all(self) -> None:
        for name in reversed(list(self.procs)):
            self.stop(name)


def _readline(stream: IO[bytes], timeout: float) -> str:
    ready, _, _ = select.select([stream], [], [], timeout)
    return stream.readline().decode(errors="replace") if ready else ""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _http(port: int, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None) -> Any:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        data = json.dumps(body).encode() if body is not None else None
        conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
        resp = conn.getresponse()
        payload = resp.read()
        if resp.status >= 300:
            raise RuntimeError(f"{method} {path}: {resp.status} {payload[:500]!r}")
        return json.loads(payload) if payload else None
    finally:
        conn.close()


def _status(port: int, path: str) -> int | None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        resp.read()
        return resp.status
    except OSError:
        return None
    finally:
        conn.close()


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time a process and its living descendants (`workers`) have used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    own = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return own + sum(_cpu_seconds(child) for child in _children(pid))


def _children(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            found += [int(c) for c in (task / "children").read_text().split()]
    return found


def _rss_mb(pid: int) -> tuple[float, float]:
    """VmRSS and VmHWM (peak) of a process, in MB."""
    fields = {}
    status = Path(f"/proc/{pid}/status")
    for line in status.read_text().splitlines() if status.exists() else []:
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            fields[name] = int(value.split()[0]) / 1024
    if "VmRSS" not in fields:
        raise RuntimeError(f"process {pid} is gone: no RSS to read")
    return fields["VmRSS"], fields["VmHWM"]


# ---- creditgate -------------------------------------------------------------------------------------


@dataclass
class Creditgate:
    children: Children
    env: dict[str, str]
    port: int
    admin_token: str
    separate_flusher: bool
    pid: int = 0
    flusher_pid: int = 0

    def start(self) -> float:
        """Spawn `creditgate serve`; seconds from spawn to the first 200 from /readyz (or /healthz)."""
        started = time.perf_counter()
        if self.separate_flusher and "flusher" not in self.children.procs:
            # The node's flusher as its own process (`creditgate flush`), as a standalone deployment at
            # scale runs it; the serving process has flusher_enabled off.
            flush = self.children.spawn("flusher", [PY, "-m", "sidecar", "flush"], self.env)
            self.flusher_pid = flush.pid
        proc = self.children.spawn("creditgate", [PY, "-m", "sidecar", "serve"], self.env)
        self.pid = proc.pid
        path = "/readyz"
        deadline = started + 60
        while time.perf_counter() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"creditgate exited with {proc.returncode}:\n{self.children.tail('creditgate')}"
                )
            status = _status(self.port, path)
            if status == 404 and path == "/readyz":
                path = "/healthz"  # a build without a readiness endpoint
                continue
            if status == 200:
                return time.perf_counter() - started
            time.sleep(0.005)
        raise RuntimeError(f"creditgate not ready in 60 s:\n{self.children.tail('creditgate')}")

    def stop(self) -> None:
        self.children.stop("creditgate")

    def admin(self, method: str, path: str, body: Any = None, **headers: str) -> Any:
        return _http(
            self.port,
            method,
            f"/admin{path}",
            body,
            {"Authorization": f"Bearer {self.admin_token}", **headers},
        )

    def funded_key(self) -> str:
        account = self.admin("POST", "/accounts", {})["id"]
        self.admin(
            "POST",
            f"/accounts/{account}/grants",
            {"credits": "1000000", "note": "overhead benchmark"},
            **{"Idempotency-Key": uuid.uuid4().hex},
        )
        key: str = self.admin("POST", f"/accounts/{account}/keys")["key"]
        return key

    def wait_flushed(self, timeout: float = 30) -> int:
        """Wait for the outbox to drain into Postgres; returns the backlog left."""
        deadline = time.monotonic() + timeout
        while True:
            backlog: int = self.admin("GET", "/ledger")["outbox_backlog"]
            if backlog == 0 or time.monotonic() > deadline:
                return backlog
            time.sleep(0.2)


def cache_supported() -> bool:
    return "cache_enabled" in Settings.__struct_fields__


@contextmanager
def fresh_state(redis_url: str, database_url: str) -> Iterator[tuple[str, str]]:
    """A fresh Postgres schema and Redis key prefix: (database URL with search_path, key prefix)."""
    schema = f"bench_{uuid.uuid4().hex[:10]}"

    async def sql(statement: str) -> None:
        conn = await asyncpg.connect(database_url)
        try:
            await conn.execute(statement)
        finally:
            await conn.close()

    asyncio.run(sql(f"CREATE SCHEMA {schema}"))
    try:
        yield f"{database_url}{'&' if '?' in database_url else '?'}search_path={schema}", f"{schema}:"
    finally:
        asyncio.run(sql(f"DROP SCHEMA {schema} CASCADE"))
        client = redis.Redis.from_url(redis_url)
        try:
            batch = list(client.scan_iter(match=f"{schema}:*", count=10_000))
            for i in range(0, len(batch), 1000):
                client.delete(*batch[i : i + 1000])
        finally:
            client.close()


def ledger_usage_rows(database_url: str) -> int:
    async def count() -> int:
        conn = await asyncpg.connect(database_url)
        try:
            rows: int = await conn.fetchval("SELECT count(*) FROM ledger WHERE kind = 'usage'")
            return rows
        finally:
            await conn.close()

    return asyncio.run(count())


# ---- load -------------------------------------------------------------------------------------------


def body_for(scenario: Scenario, target: Target) -> str:
    run = uuid.uuid4().hex[:12] if target.unique else "hit"
    prompt = PROMPT.format(run=run)
    if not target.unique:
        prompt = prompt.replace("__N__", "0")
    body: dict[str, Any] = {
        "model": scenario.model,
        "temperature": 0,
        "max_tokens": 16,
        "messages": [{"role": "user", "content": prompt}],
    }
    if scenario.stream:
        body["stream"] = True
    return json.dumps(body)


def load(
    url: str,
    body: str,
    key: str,
    concurrency: int,
    seconds: float,
    warmup: float,
    *,
    ramp: float = 0.0,
    burn_us: float = 0.0,
    watch_pid: int | None = None,
) -> dict[str, Any]:
    """One loadgen run; with ``watch_pid``, also that process's largest RSS sampled every 50 ms."""
    argv = [
        PY,
        str(BENCH / "loadgen.py"),
        "--json",
        f"--url={url}/v1/chat/completions",
        f"--body={body}",
        f"--header=Authorization: Bearer {key}",
        f"--concurrency={concurrency}",
        f"--seconds={seconds}",
        f"--warmup={warmup}",
        f"--ramp={ramp}",
        f"--burn-us={burn_us}",
    ]
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + seconds + warmup + 120
    rss_max = float("nan")
    while True:
        if watch_pid is not None:
            rss = _rss_mb(watch_pid)[0]
            rss_max = rss if rss_max != rss_max else max(rss_max, rss)
        try:
            out, err = proc.communicate(timeout=0.05)
            break
        except subprocess.TimeoutExpired:
            if time.monotonic() > deadline:
                proc.kill()
                proc.communicate()
                raise RuntimeError("loadgen did not finish in time") from None
    if proc.returncode != 0:
        raise RuntimeError(f"loadgen failed ({proc.returncode}): {err.decode(errors='replace')[-2000:]}")
    result: dict[str, Any] = json.loads(out)
    result["rss_mb"] = rss_max
    return result


# ---- report -----------------------------------------------------------------------------------------


def _ms(value: float) -> str:
    return "–" if value != value else f"{value:.2f}"


def _ratio(a: float, b: float) -> str:
    return "–" if not b or a != a or b != b else f"{a / b:.2f}×"


def _delta(a: float, b: float) -> str:
    return "–" if a != a or b != b else f"{a - b:+.2f}"


def results_table(
    results: dict[str, dict[str, Stats]], targets: list[Target], scenarios: list[Scenario]
) -> str:
    lines = [
        "| scenario | target | RPS | p50 ms | p90 ms | p99 ms | TTFB p50 | TTFB p99 "
        "| RPS ÷ direct | RPS ÷ bare | Δp50 vs direct | Δp50 vs bare "
        "| ΔTTFB p50 vs direct | ΔTTFB p50 vs bare | ΔTTFB p99 vs bare | server CPU µs/req | CPU ÷ bare "
        "| RSS MB (load peak) | non-2xx / errors |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for sc in scenarios:
        direct, bare = results[sc.key]["direct"], results[sc.key]["bare"]
        for t in targets:
            s = results[sc.key].get(t.key)
            if s is None:
                continue
            rps, p50, ttfb = s.median("rps"), s.median("latency_ms", "p50"), s.median("ttfb_ms", "p50")
            ttfb99 = s.median("ttfb_ms", "p99")
            stream = sc.stream
            lines.append(
                f"| {sc.title} | {t.title} | {rps:,.0f} | {_ms(p50)} | {_ms(s.median('latency_ms', 'p90'))} "
                f"| {_ms(s.median('latency_ms', 'p99'))} "
                f"| {_ms(ttfb) if stream else '–'} | {_ms(ttfb99) if stream else '–'} "
                f"| {_ratio(rps, direct.median('rps'))} | {_ratio(rps, bare.median('rps'))} "
                f"| {_delta(p50, direct.median('latency_ms', 'p50'))} "
                f"| {_delta(p50, bare.median('latency_ms', 'p50'))} "
                f"| {_delta(ttfb, direct.median('ttfb_ms', 'p50')) if stream else '–'} "
                f"| {_delta(ttfb, bare.median('ttfb_ms', 'p50')) if stream else '–'} "
                f"| {_delta(ttfb99, bare.median('ttfb_ms', 'p99')) if stream else '–'} "
                f"| {s.median('cpu_us'):,.0f} | {_ratio(s.median('cpu_us'), bare.median('cpu_us'))} "
                f"| {s.median('rss_mb'):.1f} | {s.total('non_2xx')} / {s.total('errors')} |"
            )
    return "\n".join(lines)


def goals_table(
    results: dict[str, dict[str, Stats]],
    rss: tuple[float, float] | None,
    ready: float,
    restart: float,
) -> tuple[str, bool]:
    """Each goal with its verdict; a goal whose scenario was not run is shown as skipped."""
    rows: list[tuple[str, str, str, bool | None]] = []

    def med(sc: str, target: str, metric: str, pct: str | None = None) -> float:
        stats = results.get(sc, {}).get(target)
        return stats.median(metric, pct) if stats else float("nan")

    def goal(
        name: str, sc: str | None, value: float, unit: str, op: str, limit: float, note: str = ""
    ) -> None:
        shown = f"{limit:g}{unit}" if unit == " MB" else f"{limit}{unit}"
        if sc is not None and sc not in results:
            rows.append((name, "skipped (not run)", f"{op} {shown}", None))
            return
        if value != value:  # the scenario ran but gave nothing to judge: a failure, never a pass
            rows.append((name, "no measurement", f"{op} {shown}", False))
            return
        ok = value <= limit if op == "≤" else value >= limit
        digits = f"{value:+.2f}" if unit == " ms" and "added" in name else f"{value:.2f}"
        rows.append((name, f"{digits}{unit}{note}", f"{op} {shown}", ok))

    for key in ("st64", "st64busy"):
        label = "streamed c=64" + (", contended" if key == "st64busy" else "")
        goal(
            f"{label}: added TTFB p50 over the bare proxy",
            key,
            med(key, "creditgate", "ttfb_ms", "p50") - med(key, "bare", "ttfb_ms", "p50"),
            " ms",
            "≤",
            GOAL_STREAM_TTFB_VS_BARE_MS,
        )
        goal(
            f"{label}: creditgate RPS ÷ direct RPS",
            key,
            med(key, "creditgate", "rps") / med(key, "direct", "rps"),
            "×",
            "≥",
            GOAL_STREAM_RPS_VS_DIRECT,
        )
        goal(
            f"{label}: server CPU per request ÷ bare",
            key,
            med(key, "creditgate", "cpu_us") / med(key, "bare", "cpu_us"),
            "×",
            "≤",
            GOAL_STREAM_CPU_VS_BARE,
        )
    goal(
        "non-streamed c=64: creditgate RPS ÷ bare proxy RPS",
        "ns64",
        med("ns64", "creditgate", "rps") / med("ns64", "bare", "rps"),
        "×",
        "≥",
        GOAL_RPS_VS_BARE,
    )
    goal(
        "non-streamed c=64: server CPU per request ÷ bare",
        "ns64",
        med("ns64", "creditgate", "cpu_us") / med("ns64", "bare", "cpu_us"),
        "×",
        "≤",
        GOAL_CPU_VS_BARE,
    )
    if "hits" in results.get("ns64", {}):
        hit_stats = [by_target["hits"] for by_target in results.values() if "hits" in by_target]
        hits = sum(h.total("cache_hits") for h in hit_stats)
        answered = sum(h.total("requests") for h in hit_stats)
        value = med("ns64", "hits", "rps") / med("ns64", "bare", "rps")
        goal(
            "non-streamed c=64: cache-hit RPS ÷ bare proxy RPS",
            "ns64",
            value,
            "×",
            "≥",
            GOAL_HITS_VS_BARE,
            "" if hits == answered else f" (only {hits} of {answered} were hits)",
        )
        if hits != answered:
            rows[-1] = (*rows[-1][:3], False)
    elif "ns64" in results:
        rows.append(
            (
                "non-streamed c=64: cache-hit RPS ÷ bare proxy RPS",
                "skipped (no cache)",
                f"≥ {GOAL_HITS_VS_BARE:g}×",
                None,
            )
        )
    else:
        goal(
            "non-streamed c=64: cache-hit RPS ÷ bare proxy RPS",
            "ns64",
            float("nan"),
            "×",
            "≥",
            GOAL_HITS_VS_BARE,
        )
    goal(
        "non-streamed c=1: added p50 over direct",
        "ns1",
        med("ns1", "creditgate", "latency_ms", "p50") - med("ns1", "direct", "latency_ms", "p50"),
        " ms",
        "≤",
        GOAL_ADDED_P50_MS,
    )
    if rss is None:  # only slow1000 ran
        rows.append(
            ("creditgate RSS after the c≤64 load", "skipped (not run)", f"≤ {GOAL_RSS_MB:g} MB", None)
        )
    else:
        goal(
            "creditgate RSS after the c≤64 load (peak so far)",
            None,
            rss[0],
            " MB",
            "≤",
            GOAL_RSS_MB,
            f" ({rss[1]:.1f})",
        )
    goal("start → ready, fresh schema (migrations run)", None, ready, " s", "≤", GOAL_READY_S)
    goal("start → ready, restart", None, restart, " s", "≤", GOAL_READY_S)
    goal(
        "1,000 slow streams: creditgate TTFB p99 ÷ bare proxy's",
        "slow1000",
        med("slow1000", "creditgate", "ttfb_ms", "p99") / med("slow1000", "bare", "ttfb_ms", "p99"),
        "×",
        "≤",
        GOAL_SLOW_P99_VS_BARE,
    )
    goal(
        "1,000 slow streams: creditgate stream (last byte) p99 ÷ bare proxy's",
        "slow1000",
        med("slow1000", "creditgate", "latency_ms", "p99") / med("slow1000", "bare", "latency_ms", "p99"),
        "×",
        "≤",
        GOAL_SLOW_P99_VS_BARE,
    )
    goal(
        "1,000 slow streams: creditgate RSS during the load (sampled peak)",
        "slow1000",
        med("slow1000", "creditgate", "rss_mb"),
        " MB",
        "≤",
        GOAL_SLOW_RSS_MB,
        f" (bare proxy {med('slow1000', 'bare', 'rss_mb'):.1f})",
    )
    lines = ["| goal | measured | target | verdict |", "|---|--:|--:|---|"]
    for name, measured, target, ok in rows:
        lines.append(
            f"| {name} | {measured} | {target} | {'–' if ok is None else 'met' if ok else 'NOT met'} |"
        )
    return "\n".join(lines), all(ok is not False for *_, ok in rows)


# ---- main -------------------------------------------------------------------------------------------


def _raise_open_files_limit() -> None:
    """1,000 streams need ~2,000 descriptors in the bench servers and creditgate; they inherit this."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 8192 if hard == resource.RLIM_INFINITY else min(hard, 8192)
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    if want < 4096:
        print(f"warning: open files limit {want}; slow1000 may run out of descriptors", file=sys.stderr)


def _raise_interrupt(signum: int, frame: types.FrameType | None) -> None:
    raise KeyboardInterrupt


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2 short rounds (about 1½ minutes)")
    parser.add_argument("--rounds", type=int, help="rounds per target (default 3; --quick 2)")
    parser.add_argument("--seconds", type=float, help="measured seconds per round (default 5; --quick 1)")
    parser.add_argument("--no-cache", action="store_true", help="do not enable the response cache")
    parser.add_argument(
        "--flusher",
        choices=["separate", "inline"],
        default="inline",
        help="the outbox flusher in the serving process (default, as flusher_enabled has it), or as its own "
        "`creditgate flush` process (its CPU reported apart)",
    )
    parser.add_argument("--workers", type=int, default=1, help="creditgate's `workers` setting (default 1)")
    parser.add_argument(
        "--scenarios",
        default=",".join(BY_KEY),
        help=f"comma-separated subset to run, always in the order listed (default all: {','.join(BY_KEY)})",
    )
    parser.add_argument("--profile", metavar="FILE", help="profile creditgate under c=64 load with py-spy")
    parser.add_argument("--profile-seconds", type=float, default=20)
    parser.add_argument(
        "--profile-scenario", default="ns64", choices=list(BY_KEY), help="the load to profile (default ns64)"
    )
    parser.add_argument(
        "--profile-hits", action="store_true", help="profile cache hits (one repeated body) instead of misses"
    )
    parser.add_argument(
        "--profile-bare", action="store_true", help="profile the bare proxy instead, under the same load"
    )
    args = parser.parse_args()
    chosen = [k.strip() for k in args.scenarios.split(",") if k.strip()]
    unknown = [k for k in chosen if k not in BY_KEY]
    if unknown or not chosen:
        parser.error(
            f"--scenarios: unknown {', '.join(unknown) or '(none given)'}; choose from {', '.join(BY_KEY)}"
        )
    args.scenario_list = [sc for sc in SCENARIOS if sc.key in chosen]
    _raise_open_files_limit()
    redis_url = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
    database_url = os.environ.get("BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test")
    use_cache = cache_supported() and not args.no_cache
    py_spy = None
    if args.profile:
        py_spy = shutil.which("py-spy", path=f"{Path(PY).parent}{os.pathsep}{os.environ.get('PATH', '')}")
        if py_spy is None:
            print("--profile needs py-spy: pip install py-spy", file=sys.stderr)
            return 2
    signal.signal(signal.SIGTERM, _raise_interrupt)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even when started with SIGINT ignored
    children = Children(Path(tempfile.mkdtemp(prefix="creditgate-bench-")))
    try:
        with fresh_state(redis_url, database_url) as (schema_url, prefix):
            try:
                status = run(args, children, redis_url, schema_url, prefix, use_cache, py_spy)
            finally:
                children.stop_all()  # before the schema is dropped
    except KeyboardInterrupt:
        print(f"interrupted; stopped everything (logs in {children.logs})", file=sys.stderr)
        return 130
    except BaseException:
        print(f"benchmark failed; the servers' logs are in {children.logs}", file=sys.stderr)
        raise
    shutil.rmtree(children.logs, ignore_errors=True)  # kept only when something went wrong
    return status


def run(
    args: argparse.Namespace,
    children: Children,
    redis_url: str,
    schema_url: str,
    prefix: str,
    use_cache: bool,
    py_spy: str | None,
) -> int:
    rounds = args.rounds or (2 if args.quick else 3)
    seconds = args.seconds or (1.0 if args.quick else 5.0)
    warmup = 0.3 if args.quick else 0.5
    began = time.perf_counter()
    scenarios: list[Scenario] = args.scenario_list
    mock = children.spawn_listening(
        "mock",
        [
            PY,
            str(BENCH / "mock_upstream.py"),
            "--tokens=16",
            "--ttft-ms=0",
            "--token-delay-ms=5",
            f"--variant={SLOW_MODEL}:150:0",
            f"--variant={BUSY_MODEL}:5:{BURN_MOCK_US}",
        ],
    )
    bare = children.spawn_listening("bare", [PY, str(BENCH / "bare_proxy.py"), f"--upstream={mock}"])
    port = _free_port()
    admin_token = uuid.uuid4().hex
    env = {k: v for k, v in os.environ.items() if not k.startswith("CREDITGATE_")}
    env.update(
        {
            "CREDITGATE_HOST": "127.0.0.1",
            "CREDITGATE_PORT": str(port),
            "CREDITGATE_REDIS_URL": redis_url,
            "CREDITGATE_DATABASE_URL": schema_url,
            "CREDITGATE_KEY_PREFIX": prefix,
            "CREDITGATE_UPSTREAM_URL": f"{mock}/v1",
            "CREDITGATE_UPSTREAM_API_KEY": "sk-bench-provider-key",
            "CREDITGATE_ADMIN_TOKEN": admin_token,
            "CREDITGATE_FLUSHER_ENABLED": "false" if args.flusher == "separate" else "true",
            "CREDITGATE_LOG_LEVEL": "WARNING",
            "CREDITGATE_MODELS": json.dumps(
                {
                    model: {"prompt": "0.00015", "completion": "0.0006", "max_output_tokens": 4096}
                    for model in (MODEL, SLOW_MODEL, BUSY_MODEL)
                }
            ),
        }
    )
    if args.workers != 1:
        env["CREDITGATE_WORKERS"] = str(args.workers)  # server CPU is then the parent's and its workers'
    if cache_supported():  # an older build refuses unknown settings; a newer one has the cache on by default
        env["CREDITGATE_CACHE_ENABLED"] = "true" if use_cache else "false"
    cg = Creditgate(children, env, port, admin_token, args.flusher == "separate")
    ready = cg.start()
    key = cg.funded_key()
    cg_url = f"http://127.0.0.1:{port}"
    if py_spy is not None:
        sc = BY_KEY[args.profile_scenario]
        if args.profile_bare:
            target = Target("bare", "bare aiohttp proxy", bare, True, children.procs["bare"].pid)
        else:
            target = Target("creditgate", "creditgate", cg_url, not args.profile_hits, cg.pid)
        return profile(py_spy, args.profile, sc, target, key, args.profile_seconds)
    targets = [
        Target("direct", "direct to the mock", mock, True, children.procs["mock"].pid),
        Target("bare", "bare aiohttp proxy", bare, True, children.procs["bare"].pid),
        Target("creditgate", "creditgate (cache miss)" if use_cache else "creditgate", cg_url, True, cg.pid),
    ]
    if use_cache:
        targets.append(Target("hits", "creditgate (cache hits)", cg_url, False, cg.pid))
    print(
        f"creditgate ready in {ready:.2f} s; {', '.join(sc.key for sc in scenarios)} × up to "
        f"{len(targets)} targets × {rounds} rounds × {seconds:g} s, interleaved",
        flush=True,
    )
    results: dict[str, dict[str, Stats]] = {
        sc.key: {t.key: Stats() for t in targets if sc.hits or t.key != "hits"} for sc in scenarios
    }
    rss: tuple[float, float] | None = None  # creditgate's RSS and peak after the last c<=64 scenario
    for sc in scenarios:
        sc_seconds = max(seconds, sc.min_seconds)
        sc_warmup = warmup + sc.ramp
        for rnd in range(rounds):
            for t in targets:
                if t.key not in results[sc.key]:
                    continue
                cpu = _cpu_seconds(t.pid)
                flusher_cpu = _cpu_seconds(cg.flusher_pid) if cg.flusher_pid else 0.0
                r = load(
                    t.url,
                    body_for(sc, t),
                    key,
                    sc.concurrency,
                    sc_seconds,
                    sc_warmup,
                    ramp=sc.ramp,
                    burn_us=sc.burn_us,
                    watch_pid=t.pid,
                )
                r["cpu_us"] = (_cpu_seconds(t.pid) - cpu) / max(1, r["completed"]) * 1e6
                if cg.flusher_pid and t.pid == cg.pid:
                    flushed_cpu = _cpu_seconds(cg.flusher_pid) - flusher_cpu
                    r["flusher_cpu_us"] = flushed_cpu / max(1, r["completed"]) * 1e6
                results[sc.key][t.key].rounds.append(r)
                lat = r["latency_ms"] or {"p50": float("nan"), "p99": float("nan")}
                print(
                    f"  {sc.key} round {rnd + 1} {t.key:10} {r['rps']:8,.0f} req/s  p50 {lat['p50']:7.2f} ms"
                    f"  p99 {lat['p99']:7.2f} ms  non-2xx {r['non_2xx']} errors {r['errors']}",
                    flush=True,
                )
        if sc.concurrency <= 64:
            rss = _rss_mb(cg.pid)
    backlog = cg.wait_flushed()
    rows = ledger_usage_rows(schema_url)
    cg.stop()
    restart = cg.start()
    cg.stop()
    elapsed = time.perf_counter() - began
    goals, all_met = goals_table(results, rss, ready, restart)
    print()
    print(results_table(results, targets, scenarios))
    print()
    print(goals)
    print()
    if any("hits" in by_target for by_target in results.values()):
        hit_stats = [by_target["hits"] for by_target in results.values() if "hits" in by_target]
        print(
            f"cache hits: {sum(h.total('cache_hits') for h in hit_stats)} of "
            f"{sum(h.total('requests') for h in hit_stats)} measured hit-target responses had X-Cache: HIT"
        )
    elif not use_cache:
        why = "--no-cache" if args.no_cache else "this build has no cache_* settings"
        print(f"note: cache-hit target skipped ({why}); creditgate ran without a response cache.")
    print(f"ledger: {rows} usage rows flushed to Postgres; outbox backlog left: {backlog}")
    if cg.flusher_pid:
        print("flusher (its own process, not in creditgate's server CPU above): µs of CPU per request,")
        for sc in scenarios:
            for key in ("creditgate", "hits"):
                rounds_ = results[sc.key].get(key)
                if rounds_ is not None:
                    print(f"  {sc.key} {key}: {rounds_.median('flusher_cpu_us'):,.0f}")
    print(
        f"run: {elapsed:.0f} s on {os.cpu_count()} CPUs, Python {sys.version.split()[0]}, "
        f"{time.strftime('%Y-%m-%d %H:%M %Z')}"
    )
    return 0 if all_met else 1


def profile(py_spy: str, out: str, sc: Scenario, target: Target, key: str, seconds: float) -> int:
    fmt = "flamegraph" if out.endswith(".svg") else "speedscope" if out.endswith(".json") else "raw"
    url = target.url
    load(url, body_for(sc, target), key, sc.concurrency, 2, 0.5, ramp=sc.ramp, burn_us=sc.burn_us)  # warm up
    spy = subprocess.Popen(
        [
            py_spy,
            "record",
            "--pid",
            str(target.pid),
            "--duration",
            str(int(seconds)),
            "--rate",
            "200",
            "--format",
            fmt,
            "--output",
            out,
            "--nonblocking",
        ],
        stdout=subprocess.DEVNULL,
    )
    try:
        r = load(url, body_for(sc, target), key, sc.concurrency, seconds, 0.2, burn_us=sc.burn_us)
    finally:
        spy.wait(timeout=seconds + 60)
    print(
        f"profiled {r['requests']} requests ({r['rps']:,.0f} req/s, {r['non_2xx']} non-2xx) "
        f"into {out} ({fmt})"
    )
    return spy.returncode


if __name__ == "__main__":
    sys.exit(main())
