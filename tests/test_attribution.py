"""Attribution on admission: a usage entry records the API key's id, the OpenAI `user` field and the
request's tags (x-creditgate-tags); a bad tags header or user field is a 400 that changes nothing."""

from __future__ import annotations

from typing import Any

import pytest

from sidecar.outbox import decode_entry

from .conftest import Sidecar, SidecarFactory
from .support import HELLO, MODELS, post, settled

pytestmark = pytest.mark.topologies


@pytest.fixture
async def quiet(make_sidecar: SidecarFactory) -> Sidecar:
    """No flusher: what a settle appended stays in the outbox for the test to read."""
    return await make_sidecar(models=MODELS, flusher_enabled=False)


async def outbox_events(sc: Sidecar, account: str) -> list[Any]:
    keys = sc.services.keys
    entries: Any = await sc.services.redis.xrange(keys.account(account).outbox)
    return [e for e in (decode_entry(fields) for _, fields in entries) if e.account == account]


async def key_id_of(sc: Sidecar, account: str) -> str:
    (row,) = await sc.services.store.pool.fetch("SELECT id FROM api_keys WHERE account_id = $1", account)
    return str(row["id"])


async def test_usage_entry_carries_key_user_and_tags(quiet: Sidecar) -> None:
    account, key = await quiet.account(10_000_000)
    body = {"model": "test-model", "messages": HELLO, "user": "end-user-7"}
    resp = await post(
        quiet, "/v1/chat/completions", body, key, **{"x-creditgate-tags": "job=judge, team=search"}
    )
    assert resp.status == 200, await resp.text()
    await settled(quiet)
    (event,) = await outbox_events(quiet, account)
    assert event.key_id == await key_id_of(quiet, account)
    assert event.user == "end-user-7"
    assert event.tags == ["job=judge", "team=search"]
    assert event.charge > 0


async def test_without_user_or_tags_only_the_key_is_recorded(quiet: Sidecar) -> None:
    account, key = await quiet.account(10_000_000)
    body = {"model": "test-model", "messages": HELLO, "user": {"not": "a string"}}
    resp = await post(quiet, "/v1/chat/completions", body, key)
    assert resp.status == 200
    await settled(quiet)
    (event,) = await outbox_events(quiet, account)
    assert (event.user, event.tags) == (None, None)
    assert event.key_id is not None


async def test_account_header_mode_has_no_key_id(make_sidecar: SidecarFactory) -> None:
    sc = await make_sidecar(models=MODELS, flusher_enabled=False, account_header="x-account")
    account, _ = await sc.account(10_000_000)
    resp = await sc.client.post(
        "/v1/chat/completions",
        json={"model": "test-model", "messages": HELLO, "user": "u1"},
        headers={"x-account": account, "x-creditgate-tags": "a=b"},
    )
    assert resp.status == 200, await resp.text()
    await settled(sc)
    (event,) = await outbox_events(sc, account)
    assert (event.key_id, event.user, event.tags) == (None, "u1", ["a=b"])


BAD_TAGS = [
    "job",  # no value
    "job=",  # empty value
    "=x",
    "job=judge,job=other",  # a key twice
    "job=jüdge",
    "a b=c",
    "k=" + "v" * 65,
    ",".join(f"k{i}=v" for i in range(9)),  # nine tags
    "job=judge,",
]


@pytest.mark.parametrize("tags", BAD_TAGS)
async def test_bad_tags_are_a_400_naming_the_header(quiet: Sidecar, tags: str) -> None:
    account, key = await quiet.account(10_000_000)
    before = await quiet.balance(account)
    resp = await post(
        quiet,
        "/v1/chat/completions",
        {"model": "test-model", "messages": HELLO},
        key,
        **{"x-creditgate-tags": tags},
    )
    body = await resp.json()
    assert resp.status == 400, body
    assert body["error"]["param"] == "x-creditgate-tags"
    assert body["error"]["type"] == "invalid_request_error"
    assert await quiet.balance(account) == before
    assert await outbox_events(quiet, account) == []


async def test_eight_tags_of_64_characters_pass(quiet: Sidecar) -> None:
    account, key = await quiet.account(10_000_000)
    tags = ",".join(f"{i}{'k' * 63}={'v' * 64}" for i in range(8))
    resp = await post(
        quiet,
        "/v1/chat/completions",
        {"model": "test-model", "messages": HELLO},
        key,
        **{"x-creditgate-tags": tags},
    )
    assert resp.status == 200
    await settled(quiet)
    (event,) = await outbox_events(quiet, account)
    assert event.tags is not None
    assert len(event.tags) == 8


@pytest.mark.parametrize(
    "user",
    ['"' + "u" * 257 + '"', r'"a\u0000b"', r'"line\nbreak"'],
    ids=["long", "nul", "newline"],
)
async def test_bad_user_is_a_400_naming_user(quiet: Sidecar, user: str) -> None:
    account, key = await quiet.account(10_000_000)
    before = await quiet.balance(account)
    body = (
        b'{"model": "test-model", "messages": [{"role": "user", "content": "hi"}], "user": '
        + user.encode()
        + b"}"
    )
    resp = await quiet.client.post(
        "/v1/chat/completions", data=body, headers={"Authorization": f"Bearer {key}"}
    )
    body = await resp.json()
    assert resp.status == 400, body
    assert body["error"]["param"] == "user"
    assert await quiet.balance(account) == before
    assert await outbox_events(quiet, account) == []


async def test_a_user_of_256_characters_passes(quiet: Sidecar) -> None:
    account, key = await quiet.account(10_000_000)
    resp = await post(
        quiet, "/v1/chat/completions", {"model": "test-model", "messages": HELLO, "user": "u" * 256}, key
    )
    assert resp.status == 200
    await settled(quiet)
    (event,) = await outbox_events(quiet, account)
    assert event.user == "u" * 256


async def test_the_tags_header_is_not_forwarded(make_sidecar: SidecarFactory, upstream: Any) -> None:
    sc = await make_sidecar(models=MODELS, tags_header="x-team-tags")
    _, key = await sc.account(10_000_000)
    resp = await post(
        sc, "/v1/chat/completions", {"model": "test-model", "messages": HELLO}, key, **{"x-team-tags": "a=b"}
    )
    assert resp.status == 200
    assert all("x-team-tags" not in {k.lower() for k in seen} for seen in upstream.seen_headers)
