"""A fake OpenAI upstream: deterministic tokens, correct usage, streamed or not.

Used by ``creditgate demo`` (and ``serve`` when no provider is configured), by the tests and by the
benchmarks. Requests may steer it with headers, which the sidecar forwards to the built-in demo upstream
(and to any upstream with ``forward_request_headers: ["x-demo-*"]``, as the tests set):

| header | effect |
|---|---|
| ``x-demo-tokens: N`` | generate N completion tokens (default: 16, capped by the request's limit) |
| ``x-demo-ignore-limit: 1`` | generate N tokens even above the request's limit (to provoke overdrafts) |
| ``x-demo-cached-tokens: N`` | report N of the prompt tokens as cached |
| ``x-demo-status: 500`` | answer with that status and an OpenAI-shaped error |
| ``x-demo-echo-auth: 1`` | answer 401 quoting the Authorization it got, as providers do with bad keys |
| ``x-demo-no-usage: 1`` | leave usage out |
| ``x-demo-cut-after: K`` | drop the connection after K streamed tokens |
| ``x-demo-delay-ms: D`` / ``x-demo-token-delay-ms: D`` | wait before answering / between streamed tokens |

Prompt tokens are counted as whitespace-separated words of the text inputs, plus 3 per chat message.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import msgspec
from aiohttp import web

from .demo_answers import CREATED, stream_events, whole_body
from .demo_answers import plan as plan_answer
from .demo_answers import token_text as token_text

_encode = msgspec.json.Encoder().encode
CALLS = web.AppKey("calls", Counter[str])
GATE = web.AppKey("gate", asyncio.Event)
MODELS = web.AppKey("models", list)


def _echo_auth(request: web.Request) -> web.Response:
    """A provider's answer to a bad key, quoting the key (OpenAI quotes a masked part of it)."""
    presented = request.headers.get("Authorization", "").removeprefix("Bearer ")
    return web.json_response(
        {
            "error": {
                "message": f"Incorrect API key provided: {presented}. You can find your API key at ...",
                "type": "invalid_request_error",
                "code": "invalid_api_key",
                "param": None,
            }
        },
        status=401,
    )


def _route_handler(route: str) -> Any:
    async def handle(request: web.Request) -> web.StreamResponse:
        request.app[CALLS][route] += 1
        gate = request.app.get(GATE)
        if gate is not None:
            await gate.wait()
        raw = await request.read()
        h = request.headers
        if "x-demo-delay-ms" in h:
            await asyncio.sleep(int(h["x-demo-delay-ms"]) / 1000)
        if "x-demo-echo-auth" in h:
            return _echo_auth(request)
        if "x-demo-status" in h:
            status = int(h["x-demo-status"])
            return web.json_response(
                {
                    "error": {
                        "message": f"demo failure {status}",
                        "type": "server_error",
                        "code": None,
                        "param": None,
                    }
                },
                status=status,
            )
        try:
            body = msgspec.json.decode(raw)
        except msgspec.DecodeError:
            return web.json_response(
                {"error": {"message": "bad json", "type": "invalid_request_error"}}, status=400
            )
        plan = plan_answer(route, h, body)
        if not body.get("stream") or route == "embeddings":
            return web.Response(
                body=_encode(whole_body(plan)),
                content_type="application/json",
                headers={"x-request-id": f"upstream-{plan.ident}"},
            )
        options = body.get("stream_options") or {}
        events = stream_events(plan, bool(options.get("include_usage")))
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await response.prepare(request)
        for i, chunk in enumerate(events):
            if plan.cut_after is not None and i >= plan.cut_after:
                assert request.transport is not None
                request.transport.close()
                return response
            if plan.token_delay and i:
                await asyncio.sleep(plan.token_delay)
            await response.write(chunk)
        await response.write_eof()
        return response

    return handle


def create_demo_upstream(models: list[str] | None = None) -> web.Application:
    """The fake OpenAI API, mounted at /v1."""
    app = web.Application()
    app[CALLS] = Counter()
    app[MODELS] = list(models or [])

    async def list_models(request: web.Request) -> web.Response:
        if "x-demo-echo-auth" in request.headers:
            return _echo_auth(request)
        return web.json_response(
            {
                "object": "list",
                "data": [
                    {"id": m, "object": "model", "created": CREATED, "owned_by": "creditgate-demo"}
                    for m in request.app[MODELS]
                ],
            }
        )

    for path, route in (
        ("chat/completions", "chat"),
        ("completions", "completions"),
        ("embeddings", "embeddings"),
        ("responses", "responses"),
    ):
        app.router.add_post(f"/v1/{path}", _route_handler(route))
    app.router.add_get("/v1/models", list_models)
    return app
