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
import hashlib
from collections import Counter
from collections.abc import Mapping
from typing import Any

import msgspec
from aiohttp import web

CREATED = 1_700_000_000
_encode = msgspec.json.Encoder().encode
CALLS = web.AppKey("calls", Counter[str])
GATE = web.AppKey("gate", asyncio.Event)
MODELS = web.AppKey("models", list)


def _words(value: Any) -> int:
    if isinstance(value, str):
        return len(value.split())
    if isinstance(value, list):
        return sum(_words(item) for item in value)
    if isinstance(value, dict):
        return _words(value.get("text") or value.get("content") or "")
    return 0


def prompt_tokens(route: str, body: dict[str, Any]) -> int:
    if route == "chat":
        messages = body.get("messages") or []
        return sum(3 + _words(m.get("content")) for m in messages if isinstance(m, dict))
    if route == "responses":
        return _words(body.get("input")) + _words(body.get("instructions"))
    return max(1, _words(body.get("prompt") if route == "completions" else body.get("input")))


def _limit(body: dict[str, Any]) -> int | None:
    for name in ("max_completion_tokens", "max_tokens", "max_output_tokens"):
        value = body.get(name)
        if isinstance(value, int):
            return value
    return None


def token_text(i: int) -> str:
    return f"tok{i} "


class Plan(msgspec.Struct):
    route: str
    ident: str
    model: str
    prompt: int
    cached: int
    tokens: int
    n: int
    usage: bool
    cut_after: int | None
    token_delay: float


def _plan(route: str, h: Mapping[str, str], body: dict[str, Any]) -> Plan:
    tokens = int(h.get("x-demo-tokens", "16"))
    limit = _limit(body)
    if limit is not None and not h.get("x-demo-ignore-limit"):
        tokens = min(tokens, limit)
    n = body.get("n") or 1 if route in ("chat", "completions") else 1
    return Plan(
        route=route,
        ident=hashlib.sha256(_encode({k: v for k, v in body.items() if k != "stream_options"})).hexdigest()[
            :24
        ],
        model=str(body.get("model", "")),
        prompt=prompt_tokens(route, body),
        cached=int(h.get("x-demo-cached-tokens", "0")),
        tokens=tokens,
        n=int(n),
        usage=not h.get("x-demo-no-usage"),
        cut_after=int(h["x-demo-cut-after"]) if "x-demo-cut-after" in h else None,
        token_delay=int(h.get("x-demo-token-delay-ms", "0")) / 1000,
    )


def _chat_usage(p: Plan) -> dict[str, Any]:
    completion = p.tokens * p.n
    return {
        "prompt_tokens": p.prompt,
        "completion_tokens": completion,
        "total_tokens": p.prompt + completion,
        "prompt_tokens_details": {"cached_tokens": p.cached},
    }


def _responses_usage(p: Plan) -> dict[str, Any]:
    return {
        "input_tokens": p.prompt,
        "output_tokens": p.tokens,
        "total_tokens": p.prompt + p.tokens,
        "input_tokens_details": {"cached_tokens": p.cached},
    }


def _text(p: Plan) -> str:
    return "".join(token_text(i) for i in range(p.tokens))


def _whole_body(p: Plan) -> dict[str, Any]:
    if p.route == "chat":
        body: dict[str, Any] = {
            "id": f"chatcmpl-{p.ident}",
            "object": "chat.completion",
            "created": CREATED,
            "model": p.model,
            "choices": [
                {"index": i, "message": {"role": "assistant", "content": _text(p)}, "finish_reason": "stop"}
                for i in range(p.n)
            ],
        }
    elif p.route == "completions":
        body = {
            "id": f"cmpl-{p.ident}",
            "object": "text_completion",
            "created": CREATED,
            "model": p.model,
            "choices": [{"index": i, "text": _text(p), "finish_reason": "stop"} for i in range(p.n)],
        }
    elif p.route == "embeddings":
        body = {
            "object": "list",
            "model": p.model,
            "data": [{"object": "embedding", "index": 0, "embedding": [0.125, -0.25, 0.5, 1.0]}],
        }
    else:
        return _response_object(p, "completed")
    if p.usage:
        usage = _chat_usage(p)
        if p.route == "embeddings":
            usage = {"prompt_tokens": p.prompt, "total_tokens": p.prompt}
        body["usage"] = usage
    return body


def _response_object(p: Plan, status: str) -> dict[str, Any]:
    done = status == "completed"
    return {
        "id": f"resp_{p.ident}",
        "object": "response",
        "created_at": CREATED,
        "status": status,
        "model": p.model,
        "output": [
            {
                "type": "message",
                "role": "assistant",
                "content": [{"type": "output_text", "text": _text(p) if done else ""}],
            }
        ]
        if done
        else [],
        "usage": _responses_usage(p) if done and p.usage else None,
    }


def _stream_events(p: Plan, include_usage: bool) -> list[bytes]:
    """Every SSE event of the streamed answer, in order, each with its terminator."""

    def data(obj: Any) -> bytes:
        return b"data: " + _encode(obj) + b"\n\n"

    if p.route == "responses":

        def event(kind: str, obj: dict[str, Any]) -> bytes:
            return b"event: " + kind.encode() + b"\n" + data({"type": kind, **obj})

        events = [event("response.created", {"response": _response_object(p, "in_progress")})]
        events += [
            event("response.output_text.delta", {"output_index": 0, "delta": token_text(i)})
            for i in range(p.tokens)
        ]
        events.append(event("response.completed", {"response": _response_object(p, "completed")}))
        return events
    kind = "chat.completion.chunk" if p.route == "chat" else "text_completion"
    head = {
        "id": f"{'chatcmpl' if p.route == 'chat' else 'cmpl'}-{p.ident}",
        "object": kind,
        "created": CREATED,
        "model": p.model,
    }
    events = []
    for i in range(p.tokens):
        for c in range(p.n):
            choice: dict[str, Any] = (
                {"index": c, "delta": {"content": token_text(i)}, "finish_reason": None}
                if p.route == "chat"
                else {"index": c, "text": token_text(i), "finish_reason": None}
            )
            chunk = {**head, "choices": [choice]}
            if include_usage:
                chunk["usage"] = None
            events.append(data(chunk))
    if include_usage and p.usage:
        events.append(data({**head, "choices": [], "usage": _chat_usage(p)}))
    events.append(b"data: [DONE]\n\n")
    return events


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
        plan = _plan(route, h, body)
        if not body.get("stream") or route == "embeddings":
            return web.Response(
                body=_encode(_whole_body(plan)),
                content_type="application/json",
                headers={"x-request-id": f"upstream-{plan.ident}"},
            )
        options = body.get("stream_options") or {}
        events = _stream_events(plan, bool(options.get("include_usage")))
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
