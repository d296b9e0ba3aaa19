"""A low-overhead closed-loop HTTP/1.1 load generator (raw asyncio protocol on uvloop, keep-alive).

    python bench/loadgen.py --url http://127.0.0.1:8080/v1/chat/completions --body '{...}' \\
        [--concurrency 64] [--seconds 5] [--warmup 0.5] [--ramp 0] [--burn-us 0] \\
        [--header 'Authorization: Bearer …'] [--json]

C connections each send a request, wait for the whole response, and send the next, for ``--warmup``
seconds (not recorded) and then ``--seconds`` seconds. Every occurrence of ``__N__`` in the body is
replaced by a number unique to the request (to defeat caches). Responses completed inside the measured
window count: RPS, latency p50/p90/p99 (request sent → last body byte), time to first body byte
p50/p90/p99, non-2xx statuses and ``X-Cache: HIT`` responses; connection errors are counted over the
whole run, and ``completed`` counts every response, warm-up included. A run with errors is reported,
never hidden. ``--ramp S`` spreads the connections' first requests evenly over S seconds (many slow
streams then arrive as a steady flow, not in waves; keep the warm-up longer than the ramp).
``--burn-us N`` spends N µs of CPU (thread CPU time, spinning) after every response, standing in for the
work of a real client application on the same machine. ``--json`` prints one JSON object (for
bench/overhead.py).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, cast
from urllib.parse import urlsplit

import uvloop

perf = time.perf_counter


@dataclass(slots=True)
class Result:
    status: int
    first_byte: float
    done: float
    cache_hit: bool


class ClientProtocol(asyncio.Protocol):
    """One keep-alive connection; one request in flight at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.waiter: asyncio.Future[Result] | None = None
        self.buf = bytearray()
        self.closed = asyncio.get_running_loop().create_future()
        self._reset()

    def _reset(self) -> None:
        self.in_head = True
        self.status = 0
        self.first_byte = 0.0
        self.cache_hit = False
        self.chunked = False
        self.remaining = 0  # Content-Length bytes still expected

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionError("connection closed mid-response"))
        if not self.closed.done():
            self.closed.set_result(None)

    def send(self, request: bytes) -> asyncio.Future[Result]:
        if self.transport is None:
            raise ConnectionError("connection closed")
        self.waiter = asyncio.get_running_loop().create_future()
        self._reset()
        self.transport.write(request)
        return self.waiter

    def data_received(self, data: bytes) -> None:
        now = perf()
        self.buf += data
        if self.in_head:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            lines = bytes(self.buf[:end]).split(b"\r\n")
            self.status = int(lines[0].split(b" ", 2)[1])
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                name = name.strip().lower()
                if name == b"content-length":
                    self.remaining = int(value)
                elif name == b"transfer-encoding":
                    self.chunked = b"chunked" in value.lower()
                elif name == b"x-cache":
                    self.cache_hit = value.strip().upper() == b"HIT"
            del self.buf[: end + 4]
            self.in_head = False
        if self.buf and not self.first_byte:
            self.first_byte = now
        if self.chunked:
            self._chunks(now)
        elif len(self.buf) >= self.remaining:
            del self.buf[: self.remaining]
            self._done(now)

    def _chunks(self, now: float) -> None:
        while True:
            line_end = self.buf.find(b"\r\n")
            if line_end < 0:
                return
            size = int(bytes(self.buf[:line_end]).split(b";", 1)[0], 16)
            if size == 0:  # last chunk, then (no) trailers and an empty line
                end = self.buf.find(b"\r\n\r\n", line_end)
                if end < 0:
                    return
                del self.buf[: end + 4]
                self._done(now)
                return
            total = line_end + 2 + size + 2
            if len(self.buf) < total:
                return
            del self.buf[:total]

    def _done(self, now: float) -> None:
        if not self.first_byte:
            self.first_byte = now
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(Result(self.status, self.first_byte, now, self.cache_hit))


@dataclass
class Totals:
    latencies: list[float] = field(default_factory=list)
    first_bytes: list[float] = field(default_factory=list)
    statuses: Counter[int] = field(default_factory=Counter)
    errors: int = 0
    cache_hits: int = 0
    completed: int = 0  # every response, warm-up and tail included (for CPU per request)


def burn(ns: int) -> None:
    """Spend ``ns`` nanoseconds of this thread's CPU time (not wall time: a preempted spin keeps going)."""
    end = time.thread_time_ns() + ns
    while time.thread_time_ns() < end:
        pass


def percentiles(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    ordered = sorted(values)

    def rank(p: float) -> float:
        return ordered[min(len(ordered) - 1, max(0, round(p / 100 * len(ordered)) - 1))]

    return {"p50": rank(50) * 1000, "p90": rank(90) * 1000, "p99": rank(99) * 1000}


async def run(
    url: str,
    body: str,
    headers: list[str],
    concurrency: int,
    seconds: float,
    warmup: float,
    ramp: float = 0.0,
    burn_us: float = 0.0,
) -> dict[str, Any]:
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    path = parts.path + (f"?{parts.query}" if parts.query else "")
    head_prefix = (
        f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
        + "".join(f"{h}\r\n" for h in headers)
    ).encode()
    pieces = body.encode().split(b"__N__")
    loop = asyncio.get_running_loop()
    totals = Totals()
    started = perf()
    window_start = started + warmup
    window_end = window_start + seconds
    counter = 0

    def request() -> bytes:
        nonlocal counter
        counter += 1
        payload = str(counter).encode().join(pieces) if len(pieces) > 1 else pieces[0]
        return head_prefix + b"Content-Length: %d\r\n\r\n" % len(payload) + payload

    async def connect() -> ClientProtocol:
        _, protocol = await loop.create_connection(ClientProtocol, host, port)
        return protocol

    burn_ns = round(burn_us * 1000)

    async def worker(i: int) -> None:
        if ramp > 0:
            await asyncio.sleep(ramp * i / concurrency)
        conn: ClientProtocol | None = None
        while perf() < window_end:
            if conn is None or conn.transport is None:
                try:
                    conn = await connect()
                except OSError:
                    totals.errors += 1
                    await asyncio.sleep(0.01)
                    continue
            sent = perf()
            try:
                result = await conn.send(request())
            except ConnectionError:
                totals.errors += 1  # warm-up included: a run with errors is reported, not hidden
                conn = None
                await asyncio.sleep(0.01)
                continue
            totals.completed += 1
            if burn_ns:
                burn(burn_ns)
            if result.done < window_start or result.done > window_end:
                continue
            totals.latencies.append(result.done - sent)
            totals.first_bytes.append(result.first_byte - sent)
            totals.statuses[result.status] += 1
            totals.cache_hits += result.cache_hit
        if conn is not None and conn.transport is not None:
            conn.transport.close()

    await asyncio.gather(*(worker(i) for i in range(concurrency)))
    ok = sum(n for status, n in totals.statuses.items() if 200 <= status < 300)
    return {
        "requests": len(totals.latencies),
        "rps": len(totals.latencies) / seconds,
        "latency_ms": percentiles(totals.latencies),
        "ttfb_ms": percentiles(totals.first_bytes),
        "non_2xx": len(totals.latencies) - ok,
        "errors": totals.errors,
        "statuses": {str(k): v for k, v in sorted(totals.statuses.items())},
        "cache_hits": totals.cache_hits,
        "completed": totals.completed,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--url", required=True)
    parser.add_argument("--body", required=True, help="JSON request body; __N__ becomes a unique number")
    parser.add_argument("--header", action="append", default=[], help="'Name: value' (repeatable)")
    parser.add_argument("--concurrency", "-c", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--warmup", type=float, default=0.5)
    parser.add_argument("--ramp", type=float, default=0.0, help="spread the first requests over S seconds")
    parser.add_argument("--burn-us", type=float, default=0.0, help="CPU µs spent after every response")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    result = uvloop.run(
        run(
            args.url,
            args.body,
            args.header,
            args.concurrency,
            args.seconds,
            args.warmup,
            args.ramp,
            args.burn_us,
        )
    )
    if args.json:
        print(json.dumps(result))
        return
    lat, ttfb = result["latency_ms"] or {}, result["ttfb_ms"] or {}
    print(
        f"{result['requests']} requests, {result['rps']:,.0f} req/s, {result['non_2xx']} non-2xx, "
        f"{result['errors']} errors, {result['cache_hits']} cache hits"
    )
    print("latency ms: " + ", ".join(f"{k} {v:.2f}" for k, v in lat.items()))
    print("first byte ms: " + ", ".join(f"{k} {v:.2f}" for k, v in ttfb.items()))


if __name__ == "__main__":
    main()
