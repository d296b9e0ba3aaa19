"""The demo upstream's answers, pure: what a request asks for (a `Plan`, steered by x-demo-* headers) and
the OpenAI-shaped body or events that answer it. The web app around them is demo.py."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

import msgspec

CREATED = 1_700_000_000
_encode = msgspec.json.Encoder().encode


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


def plan(route: str, h: Mapping[str, str], body: dict[str, Any]) -> Plan:
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


def whole_body(p: Plan) -> dict[str, Any]:
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


def stream_events(p: Plan, include_usage: bool) -> list[bytes]:
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
