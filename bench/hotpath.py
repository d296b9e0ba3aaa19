"""Micro-benchmark of the per-request and per-chunk hot paths, in-process (no servers, no Redis).

    python bench/hotpath.py [--rounds 15] [--ms 20]

Cases, with realistic inputs: the header filters on an OpenAI SDK chat request's headers and on an
OpenAI-style response's headers; ``Metrics.observe_request`` for a settled, non-streamed chat request;
``SSEReader`` over a 16-token chat stream (one event per upstream read, as a stream with token delays
arrives; the same stream split at 256-byte boundaries; the whole stream in one feed, as a cache replay),
and on the usage chunk alone; ``usage_from_body`` on a 1 KB and a 100 KB chat completion.

Each round times every case for about ``--ms`` milliseconds, cases interleaved (A B C … A B C …) to
spread machine noise over all of them; the table shows the median µs per call over the rounds.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import msgspec
from multidict import CIMultiDict, CIMultiDictProxy

from sidecar.headers import request_headers, response_headers
from sidecar.metrics import Metrics
from sidecar.observe import RequestRecord
from sidecar.pricing import Usage
from sidecar.usage import SSEReader, usage_from_body

_encode = msgspec.json.Encoder().encode

# What the OpenAI Python SDK sends, as aiohttp hands it to the proxy.
REQUEST = CIMultiDictProxy(
    CIMultiDict(
        [
            ("Host", "creditgate.internal:8080"),
            ("Accept-Encoding", "gzip, deflate"),
            ("Connection", "keep-alive"),
            ("Accept", "application/json"),
            ("Content-Type", "application/json"),
            ("User-Agent", "OpenAI/Python 1.54.0"),
            ("X-Stainless-Lang", "python"),
            ("X-Stainless-Package-Version", "1.54.0"),
            ("X-Stainless-OS", "Linux"),
            ("X-Stainless-Arch", "x64"),
            ("X-Stainless-Runtime", "CPython"),
            ("X-Stainless-Runtime-Version", "3.11.7"),
            ("Authorization", "Bearer cgk-0123456789abcdef0123456789abcdef"),
            ("X-Stainless-Async", "false"),
            ("x-stainless-retry-count", "0"),
            ("x-stainless-read-timeout", "600"),
            ("Content-Length", "187"),
        ]
    )
)
DROP = ["x-creditgate-provider-key"]

# What api.openai.com answers a chat completion with (values shortened).
RESPONSE = CIMultiDictProxy(
    CIMultiDict(
        [
            ("Date", "Tue, 05 Nov 2024 10:00:00 GMT"),
            ("Content-Type", "application/json"),
            ("Transfer-Encoding", "chunked"),
            ("Connection", "keep-alive"),
            ("access-control-expose-headers", "X-Request-ID"),
            ("openai-organization", "user-abc123"),
            ("openai-processing-ms", "412"),
            ("openai-version", "2020-10-01"),
            ("x-ratelimit-limit-requests", "10000"),
            ("x-ratelimit-limit-tokens", "30000000"),
            ("x-ratelimit-remaining-requests", "9999"),
            ("x-ratelimit-remaining-tokens", "29999979"),
            ("x-ratelimit-reset-requests", "6ms"),
            ("x-ratelimit-reset-tokens", "0s"),
            ("x-request-id", "req_0123456789abcdef0123456789abcdef"),
            ("strict-transport-security", "max-age=31536000; includeSubDomains; preload"),
            ("CF-Cache-Status", "DYNAMIC"),
            ("X-Content-Type-Options", "nosniff"),
            ("Server", "cloudflare"),
            ("CF-RAY", "8dd0f0f0f0f0f0f0-AMS"),
            ("alt-svc", 'h3=":443"; ma=86400'),
        ]
    )
)


def _record() -> RequestRecord:
    rec = RequestRecord("chat", 0.0, model="gpt-4o-mini", status=200, cache="bypass", hold=250_000)
    rec.usage, rec.settled, rec.charge, rec.ended = Usage(20, 16, 0), True, 90_000, 0.5
    rec.upstream_started, rec.upstream_first_byte, rec.upstream_ended, rec.waited = 0.01, 0.3, 0.49, 0.48
    return rec


BASE = {"id": "chatcmpl-AQ0123456789abcdef", "object": "chat.completion.chunk", "created": 1_700_000_000}
BASE |= {"model": "gpt-4o-mini-2024-07-18", "system_fingerprint": "fp_0ba0d124f1"}


def _event(obj: object) -> bytes:
    return b"data: " + _encode(obj) + b"\n\n"


def _delta(delta: dict[str, str], finish: str | None = None) -> dict[str, object]:
    choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
    return {**BASE, "choices": [choice], "usage": None}


USAGE = {"prompt_tokens": 20, "completion_tokens": 16, "total_tokens": 36}
USAGE_DETAILS = {"prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0}}
USAGE_CHUNK = _event({**BASE, "choices": [], "usage": USAGE | USAGE_DETAILS})
EVENTS = [
    _event(_delta({"role": "assistant", "content": ""})),
    *(_event(_delta({"content": f" tok{i}"})) for i in range(16)),
    _event(_delta({}, "stop")),
    USAGE_CHUNK,
    b"data: [DONE]\n\n",
]
STREAM = b"".join(EVENTS)
SPLIT_256 = [STREAM[i : i + 256] for i in range(0, len(STREAM), 256)]


def _body(size: int) -> bytes:
    """A chat completion of about ``size`` bytes, usage last (as OpenAI sends it)."""

    def build(text: str) -> bytes:
        message = {"role": "assistant", "content": text, "refusal": None}
        choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": "stop"}
        body = {k: v for k, v in BASE.items() if k != "object"} | {"object": "chat.completion"}
        return _encode({**body, "choices": [choice], "usage": USAGE | USAGE_DETAILS})

    return build("lorem ipsum " * max(0, (size - len(build(""))) // 12))


BODY_1K, BODY_100K = _body(1024), _body(100 * 1024)


def _stream(chunks: list[bytes]) -> Callable[[], object]:
    def run() -> object:
        reader = SSEReader(strip_usage_chunk=True)
        for chunk in chunks:
            reader.feed(chunk)
        assert reader.usage == Usage(20, 16, 0)
        return reader.flush()

    return run


def cases() -> dict[str, Callable[[], object]]:
    metrics = Metrics()
    rec = _record()
    usage_reader = SSEReader(strip_usage_chunk=True)
    assert usage_from_body(BODY_1K) == usage_from_body(BODY_100K) == Usage(20, 16, 0)
    return {
        f"request_headers ({len(REQUEST)} SDK headers)": lambda: request_headers(REQUEST, DROP, "sk-p"),
        f"response_headers ({len(RESPONSE)} OpenAI headers)": lambda: response_headers(RESPONSE),
        "Metrics.observe_request (settled chat)": lambda: metrics.observe_request(rec),
        f"SSEReader, 16-token stream, {len(EVENTS)} reads of 1 event": _stream(EVENTS),
        f"SSEReader, same stream, {len(SPLIT_256)} reads of 256 B": _stream(SPLIT_256),
        f"SSEReader, same stream, 1 read of {len(STREAM)} B (replay)": _stream([STREAM]),
        f"SSEReader.feed, usage chunk ({len(USAGE_CHUNK)} B)": lambda: usage_reader.feed(USAGE_CHUNK),
        f"usage_from_body, {len(BODY_1K)} B": lambda: usage_from_body(BODY_1K),
        f"usage_from_body, {len(BODY_100K)} B": lambda: usage_from_body(BODY_100K),
    }


def calibrate(call: Callable[[], object], ms: float) -> int:
    """Iterations that take about ``ms`` milliseconds."""
    n = 1
    while True:
        started = time.perf_counter_ns()
        for _ in range(n):
            call()
        elapsed = time.perf_counter_ns() - started
        if elapsed >= ms * 1e6 / 4:
            return max(1, round(n * ms * 1e6 / elapsed))
        n *= 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--ms", type=float, default=20.0, help="milliseconds per case per round")
    args = parser.parse_args()
    todo = cases()
    iterations = {name: calibrate(call, args.ms) for name, call in todo.items()}
    per_call: dict[str, list[float]] = {name: [] for name in todo}
    for _ in range(args.rounds):
        for name, call in todo.items():
            n = iterations[name]
            started = time.perf_counter_ns()
            for _ in range(n):
                call()
            per_call[name].append((time.perf_counter_ns() - started) / n / 1000)
    print(f"| hot path ({args.rounds} rounds, interleaved) | µs per call (median) | min |")
    print("|---|---:|---:|")
    for name, samples in per_call.items():
        print(f"| {name} | {statistics.median(samples):.2f} | {min(samples):.2f} |")


if __name__ == "__main__":
    main()
