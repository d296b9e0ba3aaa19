"""Which requests the response cache may answer, and the key it files them under. Pure: no I/O.

(The first piece of the response cache, issue 4; lookup, storage and single flight come next.)

A request is cacheable when its answer is deterministic: embeddings always; chat, completions and
responses only at ``temperature`` 0 with one choice. The key is the SHA-256 of canonical JSON (keys
sorted, no insignificant whitespace, numbers spelled one way) over the route, the model after alias
resolution, whether the answer is streamed, the cache scope (the account, unless a shared scope is
configured) and every body field that can change the answer. Fields that cannot (``user``,
``metadata``, ``stream_options``, ``store``, ``service_tier``) are left out, so requests that differ only
in them share an entry.
"""

from __future__ import annotations

import hashlib
from typing import Any

import msgspec

IGNORED_FIELDS = frozenset({"user", "metadata", "stream_options", "store", "service_tier", "model", "stream"})
_encode = msgspec.json.Encoder(order="sorted").encode


def cacheable(route_kind: str, body: dict[str, Any]) -> bool:
    """Whether the answer to this request is deterministic enough to be served from cache."""
    if route_kind == "embeddings":
        return True
    n = body.get("n", 1)
    temperature = body.get("temperature")
    return (
        isinstance(temperature, int | float)
        and not isinstance(temperature, bool)
        and temperature == 0
        and n in (1, None)
    )


def _canonical(value: Any) -> Any:
    """One spelling per value: integral floats become ints (0.0 and 0 are the same temperature)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {key: _canonical(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_canonical(item) for item in value]
    return value


def cache_key(route_kind: str, model: str, body: dict[str, Any], scope: str) -> str:
    """The entry's key: hex SHA-256 of the canonical request, scoped."""
    material = {
        "route": route_kind,
        "model": model,
        "stream": bool(body.get("stream")),
        "scope": scope,
        "body": _canonical({k: v for k, v in body.items() if k not in IGNORED_FIELDS}),
    }
    return hashlib.sha256(_encode(material)).hexdigest()
