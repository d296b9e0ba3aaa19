"""Which requests the response cache may answer, the key it files them under, and the cache headers an
answer carries. Pure: no I/O, time passed in.

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
from dataclasses import dataclass

import msgspec

from .errors import BadRequest
from .wire import NESTED_TOO_DEEP

IGNORED_FIELDS = frozenset({"user", "metadata", "stream_options", "store", "service_tier", "model", "stream"})
_encode = msgspec.json.Encoder(order="sorted").encode
CACHE_NAME = "creditgate"  # the cache's name in Cache-Status (RFC 9211)


def cacheable(route_kind: str, temperature: float | None, n: int | None) -> bool:
    """Whether the answer to this request is deterministic enough to be served from cache."""
    if route_kind == "embeddings":
        return True
    return temperature == 0 and n in (1, None)


def account_scope(account: str) -> str:
    return f"account:{account}"


SHARED_SCOPE = "shared"  # distinct from every account scope, whatever the account is called


def _number(literal: str) -> int | float:
    """One spelling per number: integral floats become ints (0.0 and 0 are the same temperature)."""
    value = float(literal)
    return int(value) if value.is_integer() else value


# Decoding canonicalises numbers as it goes (no second walk over the body).
_decode_canonical = msgspec.json.Decoder(float_hook=_number).decode
# The body's fields, each left undecoded: only the ones that need it are decoded (never an ignored one).
_decode_fields = msgspec.json.Decoder(dict[str, msgspec.Raw]).decode
# A value whose compact spelling holds none of these is integers without a fraction or exponent, nulls,
# empty objects and arrays of them (token ids): that spelling is already the canonical one, so it is
# hashed as it is, without building a Python object per element. Anything else (strings, and so every
# object with a member; fractions; exponents; booleans; -0) is decoded and encoded canonically.
_NOT_CANONICAL = (b'"', b".", b"e", b"E", b"-0")


def _canonical(value: msgspec.Raw) -> bytes:
    """The canonical JSON of one field's value: what `_encode(_decode_canonical(value))` gives."""
    compact = msgspec.json.format(value, indent=-1)
    if not any(marker in compact for marker in _NOT_CANONICAL):
        return compact
    return _encode(_decode_canonical(compact))


# Below this size the body is keyed whole (one decode and one encode, the fewest calls); above it field
# by field, which builds no Python object for token-id arrays or ignored fields. Both give the same digest.
WHOLE_BODY_MAX = 16 * 1024


def cache_key(route_kind: str, model: str, body: bytes, scope: str) -> str:
    """The entry's digest: hex SHA-256 of the canonical request (`body` is its JSON), scoped: of
    ``{"body": {...}, "model", "route", "scope", "stream"}`` encoded with sorted keys."""
    if len(body) <= WHOLE_BODY_MAX:
        return _key_whole(route_kind, model, body, scope)
    return _key_by_field(route_kind, model, body, scope)


def _key_whole(route_kind: str, model: str, body: bytes, scope: str) -> str:
    try:
        fields = _decode_canonical(body)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:  # the billing fields decoded; not this
        raise BadRequest(f"The request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise BadRequest(NESTED_TOO_DEEP) from None
    if not isinstance(fields, dict):
        raise BadRequest("The request body is not a JSON object.")
    material = {
        "route": route_kind,
        "model": model,
        "stream": bool(fields.get("stream")),
        "scope": scope,
        "body": {k: v for k, v in fields.items() if k not in IGNORED_FIELDS},
    }
    return hashlib.sha256(_encode(material)).hexdigest()


def _key_by_field(route_kind: str, model: str, body: bytes, scope: str) -> str:
    """The entry's digest: hex SHA-256 of the canonical request (`body` is its JSON), scoped.

    It is the digest of ``{"body": {...}, "model", "route", "scope", "stream"}`` encoded with sorted
    keys, computed field by field: each field's value is canonicalised on its own (token-id arrays
    straight from their bytes), ignored fields are never decoded."""
    try:
        fields = _decode_fields(body)
        parts = [b'{"body":{']
        for name in sorted(fields):
            if name in IGNORED_FIELDS:
                continue
            if len(parts) > 1:
                parts.append(b",")
            parts += (_encode(name), b":", _canonical(fields[name]))
        stream = "stream" in fields and bool(_decode_canonical(fields["stream"]))
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:  # the billing fields decoded; not this
        raise BadRequest(f"The request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise BadRequest(NESTED_TOO_DEEP) from None
    tail = {"model": model, "route": route_kind, "scope": scope, "stream": stream}
    parts.append(b"}," + _encode(tail)[1:])  # the body object, then the rest of the sorted material
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part)
    return digest.hexdigest()


@dataclass(frozen=True, slots=True)
class Directives:
    """What the client's ``Cache-Control`` allows: look an answer up, and store the one it gets."""

    lookup: bool
    store: bool


def client_directives(cache_control: str | None) -> Directives:
    """``no-store``: neither look up nor store; ``no-cache``: skip the lookup, store the fresh answer."""
    tokens = {part.strip().split("=", 1)[0].lower() for part in (cache_control or "").split(",")}
    if "no-store" in tokens:
        return Directives(lookup=False, store=False)
    return Directives(lookup="no-cache" not in tokens, store=True)


def hit_headers(stored_ms: int, expires_ms: int, now_ms: int, *, collapsed: bool) -> dict[str, str]:
    """Headers of an answer served from cache. A collapsed one waited for an identical request's call."""
    status = f"{CACHE_NAME}; hit; ttl={max(0, (expires_ms - now_ms) // 1000)}"
    return {
        "X-Cache": "HIT",
        "Age": str(max(0, (now_ms - stored_ms) // 1000)),
        "Cache-Status": status + ("; collapsed" if collapsed else ""),
    }


def miss_headers(forward: str, *, stored: bool) -> dict[str, str]:
    """Headers of an answer from upstream; `forward` is RFC 9211's fwd reason: ``miss`` (looked up, not
    found), ``request`` (the client's no-cache skipped the lookup) or ``bypass`` (not cacheable)."""
    return {
        "X-Cache": "MISS",
        "Cache-Status": f"{CACHE_NAME}; fwd={forward}" + ("; stored" if stored else ""),
    }


@dataclass(frozen=True, slots=True)
class CachePlan:
    """What one request does with the cache."""

    forward: str  # RFC 9211 fwd reason when answered from upstream: miss, request (no-cache), bypass
    lookup: bool = False
    store: bool = False
    digest: str = ""  # the single-flight key
    key: str = ""  # the entry's Redis key
    colocated: bool = True  # the entry is in the account's slot: handled inside the money scripts


BYPASS = CachePlan(forward="bypass")
