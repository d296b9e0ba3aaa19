"""A recording fake provider: it records every request's headers and answers what the test tells it to
(chosen status, headers and body, or a stream). Shared by the pooled-key and vault tests."""

from __future__ import annotations

from dataclasses import dataclass, field

import msgspec
from aiohttp import web
from aiohttp.test_utils import TestServer
from multidict import CIMultiDict, CIMultiDictProxy


@dataclass
class Answer:
    status: int = 200
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes | None = None  # None: a chat completion with usage
    stream: bool = False


@dataclass
class Fake:
    server: TestServer
    seen: list[CIMultiDictProxy[str]]
    answer: Answer

    @property
    def url(self) -> str:
        return str(self.server.make_url("/v1"))


def completion(content: str) -> bytes:
    return msgspec.json.encode(
        {
            "id": "chatcmpl-1",
            "object": "chat.completion",
            "model": "gpt-4o-mini",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}}],
            "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7},
        }
    )


def stream_events() -> bytes:
    chunk = {
        "id": "c",
        "object": "chat.completion.chunk",
        "choices": [{"index": 0, "delta": {"content": "x"}}],
    }
    usage = {
        "id": "c",
        "object": "chat.completion.chunk",
        "choices": [],
        "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6},
    }
    return (
        b"".join(b"data: " + msgspec.json.encode(e) + b"\n\n" for e in (chunk, usage)) + b"data: [DONE]\n\n"
    )


async def start_fake() -> Fake:
    seen: list[CIMultiDictProxy[str]] = []
    fake: Fake

    async def handle(request: web.Request) -> web.StreamResponse:
        seen.append(CIMultiDictProxy(CIMultiDict(request.headers)))
        await request.read()
        a = fake.answer
        headers = CIMultiDict(a.headers)
        if a.stream:
            response = web.StreamResponse(status=a.status, headers=headers)
            response.content_type = "text/event-stream"
            await response.prepare(request)
            await response.write(stream_events())
            await response.write_eof()
            return response
        # The answer names the key it was made with: a BYOK answer is told from a pooled one.
        body = a.body if a.body is not None else completion(request.headers.get("Authorization", ""))
        headers.setdefault("Content-Type", "application/json")
        return web.Response(status=a.status, body=body, headers=headers)

    app = web.Application()
    app.router.add_post("/v1/chat/completions", handle)
    server = TestServer(app)
    await server.start_server()
    fake = Fake(server, seen, Answer())
    return fake
