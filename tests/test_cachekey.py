"""Cacheability and cache keys: plain tables, no servers."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from sidecar import cachekey
from sidecar.cachekey import (
    SHARED_SCOPE,
    account_scope,
    cacheable,
    client_directives,
    hit_headers,
    miss_headers,
)


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
