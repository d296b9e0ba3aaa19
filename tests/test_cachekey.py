"""Cacheability and cache keys: plain tables, no servers."""

from __future__ import annotations

from typing import Any

import pytest

from sidecar.cachekey import cache_key, cacheable

CHAT: dict[str, Any] = {
    "model": "gpt-4o-mini",
    "messages": [{"role": "user", "content": "hi"}],
    "temperature": 0,
}


@pytest.mark.parametrize(
    ("kind", "body", "expected"),
    [
        ("embeddings", {"input": "x"}, True),
        ("chat", CHAT, True),
        ("chat", {**CHAT, "temperature": 0.0}, True),
        ("chat", {**CHAT, "temperature": 0.7}, False),
        ("chat", {k: v for k, v in CHAT.items() if k != "temperature"}, False),  # default is 1
        ("chat", {**CHAT, "temperature": False}, False),
        ("chat", {**CHAT, "temperature": "0"}, False),
        ("chat", {**CHAT, "n": 2}, False),
        ("chat", {**CHAT, "n": 1}, True),
        ("completions", {"prompt": "x", "temperature": 0}, True),
        ("responses", {"input": "x", "temperature": 0}, True),
    ],
)
def test_cacheable(kind: str, body: dict[str, Any], expected: bool) -> None:
    assert cacheable(kind, body) is expected


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
