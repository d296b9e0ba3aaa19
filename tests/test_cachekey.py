"""Cacheability and cache keys: plain tables and generated bodies, no servers."""

from __future__ import annotations

import hashlib
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar import cachekey
from sidecar.cachekey import (
    SHARED_SCOPE,
    account_scope,
    cacheable,
    client_directives,
    hit_headers,
    miss_headers,
)
from sidecar.errors import BadRequest


def cache_key(route: str, model: str, body: dict[str, Any], scope: str) -> str:
    """The key of `body` as a client would send it (JSON)."""
    return cachekey.cache_key(route, model, msgspec.json.encode(body), scope)


CHAT: dict[str, Any] = {
    "model": "gpt-4o-mini",
    "messages": [{"role": "user", "content": "hi"}],
    "temperature": 0,
}


@pytest.mark.parametrize(
    ("kind", "temperature", "n", "expected"),
    [
        ("embeddings", None, None, True),
        ("embeddings", 0.7, None, True),
        ("chat", 0, None, True),
        ("chat", 0.0, None, True),
        ("chat", 0.7, None, False),
        ("chat", None, None, False),  # the default temperature is 1
        ("chat", 0, 2, False),
        ("chat", 0, 1, True),
        ("completions", 0, None, True),
        ("responses", 0, None, True),
        ("responses", 1e-9, None, False),
    ],
)
def test_cacheable(kind: str, temperature: float | None, n: int | None, expected: bool) -> None:
    assert cacheable(kind, temperature, n) is expected


def test_fields_that_cannot_change_the_answer_share_a_key() -> None:
    key = cache_key("chat", "gpt-4o-mini", CHAT, "acct_1")
    noisy = {**CHAT, "user": "u-42", "metadata": {"trace": "x"}, "stream_options": {"include_usage": True}}
    assert cache_key("chat", "gpt-4o-mini", noisy, "acct_1") == key
    reordered = dict(reversed(list(CHAT.items())))
    assert cache_key("chat", "gpt-4o-mini", reordered, "acct_1") == key
    assert cache_key("chat", "gpt-4o-mini", {**CHAT, "temperature": 0.0}, "acct_1") == key
    # The model is the resolved one: an alias in the body does not split the entry.
    assert cache_key("chat", "gpt-4o-mini", {**CHAT, "model": "mini"}, "acct_1") == key


@pytest.mark.parametrize(
    ("route", "model", "change", "scope"),
    [
        ("completions", "gpt-4o-mini", {}, "acct_1"),
        ("chat", "gpt-4o", {}, "acct_1"),
        ("chat", "gpt-4o-mini", {"stream": True}, "acct_1"),
        ("chat", "gpt-4o-mini", {"max_tokens": 5}, "acct_1"),
        ("chat", "gpt-4o-mini", {"messages": [{"role": "user", "content": "hi!"}]}, "acct_1"),
        ("chat", "gpt-4o-mini", {"seed": 7}, "acct_1"),
        ("chat", "gpt-4o-mini", {}, "acct_2"),
        ("chat", "gpt-4o-mini", {}, "shared"),
    ],
)
def test_anything_that_can_change_the_answer_changes_the_key(
    route: str, model: str, change: dict[str, Any], scope: str
) -> None:
    base = cache_key("chat", "gpt-4o-mini", CHAT, "acct_1")
    assert cache_key(route, model, {**CHAT, **change}, scope) != base


def test_key_is_a_sha256_hex_digest() -> None:
    key = cache_key("embeddings", "text-embedding-3-small", {"input": "x"}, "acct_1")
    assert len(key) == 64
    assert int(key, 16) >= 0


def test_an_account_named_shared_does_not_read_the_shared_scope() -> None:
    assert cache_key("chat", "gpt-4o-mini", CHAT, account_scope("shared")) != cache_key(
        "chat", "gpt-4o-mini", CHAT, SHARED_SCOPE
    )


@pytest.mark.parametrize(
    ("header", "lookup", "store"),
    [
        (None, True, True),
        ("", True, True),
        ("max-age=60", True, True),
        ("no-cache", False, True),
        ("No-Cache", False, True),
        ("no-store", False, False),
        ("no-cache, no-store", False, False),
        ("private, no-store", False, False),
        ('no-cache="set-cookie"', False, True),
    ],
)
def test_client_cache_control(header: str | None, lookup: bool, store: bool) -> None:
    directives = client_directives(header)
    assert (directives.lookup, directives.store) == (lookup, store)


def test_hit_headers_follow_rfc_9211() -> None:
    stored, expires, now = 1_000_000, 1_000_000 + 3_600_000, 1_000_000 + 61_500
    assert hit_headers(stored, expires, now, collapsed=False) == {
        "X-Cache": "HIT",
        "Age": "61",
        "Cache-Status": "creditgate; hit; ttl=3538",
    }
    assert hit_headers(stored, expires, stored, collapsed=True)["Cache-Status"] == (
        "creditgate; hit; ttl=3600; collapsed"
    )
    # A clock that steps back never yields a negative age.
    assert hit_headers(stored, expires, stored - 5_000, collapsed=False)["Age"] == "0"


@pytest.mark.parametrize(
    ("forward", "stored", "status"),
    [
        ("miss", True, "creditgate; fwd=miss; stored"),
        ("miss", False, "creditgate; fwd=miss"),
        ("request", True, "creditgate; fwd=request; stored"),
        ("bypass", False, "creditgate; fwd=bypass"),
    ],
)
def test_miss_headers(forward: str, stored: bool, status: str) -> None:
    assert miss_headers(forward, stored=stored) == {"X-Cache": "MISS", "Cache-Status": status}


@pytest.mark.parametrize(
    ("a", "b"),
    [
        (b'{"temperature": 0}', b'{"temperature": 0.0}'),
        (b'{"temperature": 0}', b'{"temperature":-0.0}'),
        (b'{"top_p": 1}', b'{"top_p": 1e0}'),
        (b'{"x": [1, {"y": 2}]}', b'{"x": [1.0, {"y": 2.00}]}'),
        (b'{"a": 1, "b": 2}', b'{ "b" : 2 ,\n "a" : 1 }'),
    ],
)
def test_spellings_of_one_request_share_a_key(a: bytes, b: bytes) -> None:
    assert cachekey.cache_key("chat", "m", a, "s") == cachekey.cache_key("chat", "m", b, "s")


@pytest.mark.parametrize(
    ("a", "b"),
    [
        (b'{"temperature": 0}', b'{"temperature": 0.5}'),
        (b'{"x": 1}', b'{"x": "1"}'),
        (b'{"x": 1}', b'{"x": true}'),
        (b'{"x": [1, 2]}', b'{"x": [2, 1]}'),
    ],
)
def test_different_requests_have_different_keys(a: bytes, b: bytes) -> None:
    assert cachekey.cache_key("chat", "m", a, "s") != cachekey.cache_key("chat", "m", b, "s")


# ---- the key computed field by field is the key computed from the whole decoded body ----------------

_reference_decode = msgspec.json.Decoder(float_hook=cachekey._number).decode
_reference_encode = msgspec.json.Encoder(order="sorted").encode


def reference_key(route: str, model: str, body: bytes, scope: str) -> str:
    """The key as it was computed before (the whole body decoded into Python objects, then encoded)."""
    fields = _reference_decode(body)
    material = {
        "route": route,
        "model": model,
        "stream": bool(fields.get("stream")),
        "scope": scope,
        "body": {k: v for k, v in fields.items() if k not in cachekey.IGNORED_FIELDS},
    }
    return hashlib.sha256(_reference_encode(material)).hexdigest()


_space = st.sampled_from(["", " ", "\n  ", "\t"])


@st.composite
def _number_text(draw: st.DrawFn) -> str:
    """A JSON number in one of its spellings: 2, 2.0, 2.00, 2e0, 20E-1, -0, -0.0, 0.5, 1e300, …"""
    kind = draw(st.sampled_from(["int", "fraction", "exponent", "zero", "float"]))
    if kind == "int":
        return str(draw(st.integers(min_value=-(2**63), max_value=2**64 - 1)))
    if kind == "fraction":
        return f"{draw(st.integers(-1000, 1000))}.{'0' * draw(st.integers(1, 3))}"
    if kind == "exponent":
        mark, sign = draw(st.sampled_from("eE")), draw(st.sampled_from(["", "+", "-"]))
        return f"{draw(st.integers(-99, 99))}{mark}{sign}{draw(st.integers(0, 20))}"
    if kind == "zero":
        return draw(st.sampled_from(["0", "-0", "0.0", "-0.0", "0e0", "-0E+2"]))
    return repr(draw(st.floats(allow_nan=False, allow_infinity=False)))


_strings = st.text(max_size=8).map(lambda s: msgspec.json.encode(s).decode()) | st.sampled_from(
    ['"\\u0041"', '"\\/"', '"a\\nb"', '"\\ud83d\\ude00"', '"\\"q\\""', '"é"', '"\\u00e9"']
)


def _json_text(children: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    def array(items: list[tuple[str, str, str]]) -> str:
        return "[" + ",".join(f"{a}{item}{b}" for a, item, b in items) + "]"

    def obj(items: list[tuple[str, str, str, str]]) -> str:
        return "{" + ",".join(f"{key}{a}:{b}{value}" for key, a, b, value in items) + "}"

    return st.lists(st.tuples(_space, children, _space), max_size=5).map(array) | st.lists(
        st.tuples(_strings, _space, _space, children), max_size=4
    ).map(obj)


_values = st.recursive(
    _number_text() | _strings | st.sampled_from(["true", "false", "null"]), _json_text, max_leaves=30
)
# What may be hashed straight from its bytes: numbers, nulls and arrays of them (token ids), with the
# spellings that must not be (-0, fractions, exponents) mixed in.
_numeric = st.recursive(
    _number_text() | st.sampled_from(["null", "-0", "7"]),
    lambda children: st.lists(st.tuples(_space, children, _space), max_size=5).map(
        lambda items: "[" + ",".join(f"{a}{item}{b}" for a, item, b in items) + "]"
    ),
    max_leaves=20,
)
_field_names = st.sampled_from(
    ["messages", "input", "prompt", "temperature", "seed", "tools", "user", "metadata", "stream", "x", "é"]
) | st.text(max_size=4)


@st.composite
def _bodies(draw: st.DrawFn) -> bytes:
    fields = draw(st.lists(st.tuples(_field_names, _values | _numeric), max_size=6))
    if draw(st.booleans()):
        fields.append(("stream", draw(st.sampled_from(["true", "false", "null"]))))
    members = [
        f"{msgspec.json.encode(name).decode()}{draw(_space)}:{draw(_space)}{value}" for name, value in fields
    ]
    return ("{" + draw(_space) + ",".join(members) + "}").encode()


@settings(max_examples=400, deadline=None)
@given(body=_bodies())
def test_the_key_is_the_key_of_the_whole_decoded_body(body: bytes) -> None:
    """Field by field, token-id arrays hashed from their bytes: the same digest as before for any body
    (so entries stored by an earlier version are still found)."""
    ways = (cachekey.cache_key, cachekey._key_whole, cachekey._key_by_field)  # small bodies go whole
    try:
        expected = reference_key("chat", "m", body, "account:a")
    except msgspec.DecodeError:
        for way in ways:
            with pytest.raises(BadRequest):
                way("chat", "m", body, "account:a")
        return
    assert [way("chat", "m", body, "account:a") for way in ways] == [expected] * 3


@pytest.mark.parametrize(
    "value",
    [
        b"[[1, 2, 3], [4, 5]]",
        b"[ 1 ,\n 2 ]",
        b"[-0, 0]",
        b"[1.0, 2]",
        b"[1e2]",
        b"[true, null]",
        b'["a", 1]',
        b"[{}]",
        b"[" + b",".join([b"[1234,5678]"] * 5000) + b"]",
    ],
)
def test_token_arrays_and_what_needs_decoding_key_as_before(value: bytes) -> None:
    body = b'{"model": "m", "temperature": 0, "input": ' + value + b"}"
    expected = reference_key("embeddings", "m", body, "s")
    assert cachekey._key_by_field("embeddings", "m", body, "s") == expected
    assert cachekey._key_whole("embeddings", "m", body, "s") == expected
    assert cachekey.cache_key("embeddings", "m", body, "s") == expected
