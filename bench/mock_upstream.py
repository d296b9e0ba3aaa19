"""A fast mock OpenAI upstream for the overhead benchmark: POST /v1/chat/completions only.

    python bench/mock_upstream.py [--port 0] [--tokens 16] [--ttft-ms 0] [--token-delay-ms 5] [--burn-us 0]
        [--variant MODEL:TOKEN_DELAY_MS:BURN_US ...]

A raw asyncio protocol on uvloop (HTTP/1.1, keep-alive, Content-Length request bodies), so that it is
never the bottleneck of the benchmark. Non-streamed requests get a chat.completion with usage after
``--ttft-ms``; streamed ones (``"stream": true``) get the response head at once, then ``--tokens`` SSE
chunks (the first after ``--ttft-ms``, the others ``--token-delay-ms`` apart), a finish chunk, a usage
chunk when ``stream_options.include_usage`` is set, and ``data: [DONE]``, chunk-encoded. Every response
byte string is built once per (model, stream, include_usage) and reused. ``--burn-us N`` spends N µs of
CPU (thread CPU time, spinning) before every write of a response or a stream's event, standing in for
the work of a real application sharing the machine. ``--variant`` gives one model name its own token
delay and burn (the benchmark's slow-stream and contended scenarios), so one mock serves every
scenario. Prints ``listening on URL`` once it accepts connections.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import time
from dataclasses import dataclass
from typing import cast

import msgspec
import uvloop

PROMPT_TOKENS = 20
CREATED = 1_700_000_000
_encode = msgspec.json.Encoder().encode


class StreamOptions(msgspec.Struct):
    include_usage: bool = False


class ChatRequest(msgspec.Struct):
    model: str = "mock"
    stream: bool = False
    stream_options: StreamOptions | None = None


_decode = msgspec.json.Decoder(ChatRequest).decode


@dataclass(frozen=True)
class Config:
    tokens: int
    ttft: float  # seconds
    token_delay: float  # seconds
    burn_ns: int = 0  # CPU spent before every write


def burn(ns: int) -> None:
    """Spend ``ns`` nanoseconds of this thread's CPU time (not wall time: a preempted spin keeps going)."""
    if ns <= 0:
        return
    end = time.thread_time_ns() + ns
    while time.thread_time_ns() < end:
        pass


@dataclass(frozen=True)
class Answer:
    """Precomputed wire bytes: a whole response, or a stream's head, chunks and tail."""

    whole: bytes = b""
    head: bytes = b""
    chunks: tuple[bytes, ...] = ()
    tail: bytes = b""
    cfg: Config | None = None  # the model's timing and burn


def _chunk(payload: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(payload), payload)


def _event(obj: object) -> bytes:
    return _chunk(b"data: " + _encode(obj) + b"\n\n")


def build_answer(cfg: Config, model: str, stream: bool, include_usage: bool) -> Answer:
    text = "".join(f"tok{i} " for i in range(cfg.tokens))
    usage = {
        "prompt_tokens": PROMPT_TOKENS,
        "completion_tokens": cfg.tokens,
        "total_tokens": PROMPT_TOKENS + cfg.tokens,
        "prompt_tokens_details": {"cached_tokens": 0},
    }
    if not stream:
        body = _encode(
            {
                "id": "chatcmpl-mock",
                "object": "chat.completion",
                "created": CREATED,
                "model": model,
                "choices": [
                    {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
                ],
                "usage": usage,
            }
        )
        head = (
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nx-request-id: mock\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body)
        )
        return Answer(whole=head + body, cfg=cfg)
    base = {"id": "chatcmpl-mock", "object": "chat.completion.chunk", "created": CREATED, "model": model}
    extra: dict[str, object] = {"usage": None} if include_usage else {}
    chunks = tuple(
        _event(
            {
                **base,
                "choices": [{"index": 0, "delta": {"content": f"tok{i} "}, "finish_reason": None}],
                **extra,
            }
        )
        for i in range(cfg.tokens)
    )
    tail = _event({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}], **extra})
    if include_usage:
        tail += _event({**base, "choices": [], "usage": usage})
    tail += _chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n"
    head = (
        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
        b"x-request-id: mock\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    return Answer(head=head, chunks=chunks, tail=tail, cfg=cfg)


NOT_FOUND = b"HTTP/1.1 404 Not Found\r\nContent-Type: text/plain\r\nContent-Length: 9\r\n\r\nnot found"
BAD_REQUEST = b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain\r\nContent-Length: 8\r\n\r\nbad json"
UNSUPPORTED = b"HTTP/1.1 411 Length Required\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"


class MockProtocol(asyncio.Protocol):
    """One connection; requests are answered in order, one at a time (clients do not pipeline)."""

    def __init__(
        self, cfg: Config, variants: dict[str, Config], answers: dict[tuple[str, bool, bool], Answer]
    ) -> None:
        self.cfg = cfg
        self.variants = variants
        self.answers = answers
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None
        self.busy = False
        self.timer: asyncio.TimerHandle | None = None
        self.loop = asyncio.get_running_loop()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.transport = None

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if not self.busy:
            self._process()

    def _process(self) -> None:
        while not self.busy and self.transport is not None:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            lines = bytes(self.buf[:end]).split(b"\r\n")
            method, path, _ = lines[0].split(b" ", 2)
            length = 0
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                name = name.strip().lower()
                if name == b"content-length":
                    length = int(value)
                elif name == b"transfer-encoding":
                    self.transport.write(UNSUPPORTED)
                    self.transport.close()
                    return
            start = end + 4
            if len(self.buf) < start + length:
                return
            body = bytes(self.buf[start : start + length])
            del self.buf[: start + length]
            self._answer(method, path, body)

    def _answer(self, method: bytes, path: bytes, body: bytes) -> None:
        assert self.transport is not None
        if method != b"POST" or path.partition(b"?")[0] != b"/v1/chat/completions":
            self.transport.write(NOT_FOUND)
            return
        try:
            req = _decode(body)
        except msgspec.DecodeError:
            self.transport.write(BAD_REQUEST)
            return
        include_usage = bool(req.stream and req.stream_options and req.stream_options.include_usage)
        key = (req.model, req.stream, include_usage)
        answer = self.answers.get(key)
        if answer is None:
            cfg = self.variants.get(req.model, self.cfg)
            answer = self.answers[key] = build_answer(cfg, req.model, req.stream, include_usage)
        cfg = answer.cfg or self.cfg
        if not req.stream:
            if cfg.ttft <= 0:
                burn(cfg.burn_ns)
                self.transport.write(answer.whole)
                return
            self.busy = True
            self.timer = self.loop.call_later(cfg.ttft, self._finish, answer.whole, cfg.burn_ns)
            return
        self.busy = True
        burn(cfg.burn_ns)
        self.transport.write(answer.head)
        if cfg.ttft <= 0:
            self._send(answer, 0)
        else:
            self.timer = self.loop.call_later(cfg.ttft, self._send, answer, 0)

    def _send(self, answer: Answer, i: int) -> None:
        if self.transport is None:
            return
        cfg = answer.cfg or self.cfg
        if i == len(answer.chunks) - 1 or not answer.chunks:
            self._finish(answer.chunks[i] + answer.tail if answer.chunks else answer.tail, cfg.burn_ns)
            return
        burn(cfg.burn_ns)
        self.transport.write(answer.chunks[i])
        self.timer = self.loop.call_later(cfg.token_delay, self._send, answer, i + 1)

    def _finish(self, data: bytes, burn_ns: int) -> None:
        self.timer = None
        if self.transport is None:
            return
        burn(burn_ns)
        self.transport.write(data)
        self.busy = False
        self._process()


async def serve(host: str, port: int, cfg: Config, variants: dict[str, Config]) -> None:
    loop = asyncio.get_running_loop()
    answers: dict[tuple[str, bool, bool], Answer] = {}
    server = await loop.create_server(lambda: MockProtocol(cfg, variants, answers), host, port, backlog=4096)
    actual = server.sockets[0].getsockname()[1]
    print(f"listening on http://{host}:{actual}", flush=True)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--tokens", type=int, default=16, help="completion tokens per answer")
    parser.add_argument(
        "--ttft-ms", type=float, default=0.0, help="time to first token (and to a whole answer)"
    )
    parser.add_argument("--token-delay-ms", type=float, default=5.0, help="delay between streamed tokens")
    parser.add_argument("--burn-us", type=float, default=0.0, help="CPU µs spent before every write")
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="MODEL:TOKEN_DELAY_MS:BURN_US",
        help="this model's own token delay and burn (repeatable)",
    )
    args = parser.parse_args()
    cfg = Config(
        tokens=max(1, args.tokens),
        ttft=args.ttft_ms / 1000,
        token_delay=args.token_delay_ms / 1000,
        burn_ns=round(args.burn_us * 1000),
    )
    variants = {}
    for spec in args.variant:
        model, delay_ms, burn_us = spec.rsplit(":", 2)
        variants[model] = dataclasses.replace(
            cfg, token_delay=float(delay_ms) / 1000, burn_ns=round(float(burn_us) * 1000)
        )
    with contextlib.suppress(KeyboardInterrupt):
        uvloop.run(serve(args.host, args.port, cfg, variants))


if __name__ == "__main__":
    main()
