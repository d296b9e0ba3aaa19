"""The pooled key serves only what is billed, shown against a recording fake upstream.

The fake records every request's headers and answers what the test tells it to: chosen status, headers
and body, a stream, or a redirect to a second recording server.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import msgspec
import pytest
from multidict import CIMultiDictProxy

from sidecar.config import load_settings
from sidecar.errors import ConfigError

from .conftest import PROVIDER_KEY, Sidecar, SidecarFactory
from .support_fake_provider import Answer, Fake, completion, start_fake

CHAT = "/v1/chat/completions"
START = 10_000_000
BODY = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "temperature": 0}
ORG, PROJECT = "org-OperatorOrg1", "proj_OperatorProj1"


@pytest.fixture
async def fake() -> AsyncIterator[Fake]:
    f = await start_fake()
    yield f
    await f.server.close()


@pytest.fixture
async def elsewhere() -> AsyncIterator[Fake]:
    """A second server a redirect points at: it must never be called."""
    f = await start_fake()
    yield f
    await f.server.close()


async def pooled_sidecar(make_sidecar: SidecarFactory, fake: Fake, **overrides: Any) -> Sidecar:
    upstreams = {
        "default": {"base_url": fake.url, "api_key": PROVIDER_KEY, "organization": ORG, "project": PROJECT}
    }
    return await make_sidecar(upstream_url=None, upstreams=upstreams, **overrides)


async def post(sc: Sidecar, key: str, **headers: str) -> tuple[int, CIMultiDictProxy[str], bytes]:
    resp = await sc.client.post(
        CHAT, data=msgspec.json.encode(BODY), headers={"Authorization": f"Bearer {key}", **headers}
    )
    async with resp:
        return resp.status, resp.headers, await resp.read()


SDK = {
    "Content-Type": "application/json",
    "Accept": "application/json",
    "User-Agent": "OpenAI/Python 1.54.0",
    "X-Stainless-Lang": "python",
    "OpenAI-Beta": "assistants=v2",
    "Idempotency-Key": "stainless-python-retry-1",
}
TENANT = {
    "OpenAI-Organization": "org-TenantPicks",
    "OpenAI-Project": "proj_TenantPicks",
    "api-key": "azure-style",
    "x-api-key": "anthropic-style",
    "Cookie": "session=tenant",
    "X-Forwarded-For": "10.1.2.3",
    "X-Forwarded-Host": "evil.example",
    "Connection": "keep-alive, X-Hop",
    "X-Hop": "1",
}


async def test_a_tenant_cannot_pick_the_pooled_keys_org_or_pass_other_headers(
    make_sidecar: SidecarFactory, fake: Fake
) -> None:
    sc = await pooled_sidecar(make_sidecar, fake)
    _, key = await sc.account(START)
    status, _, _ = await post(sc, key, **SDK, **TENANT)
    assert status == 200
    sent = fake.seen[-1]
    for name, value in SDK.items():
        assert sent.getall(name) == [value]
    assert sent.getall("OpenAI-Organization") == [ORG]
    assert sent.getall("OpenAI-Project") == [PROJECT]
    assert sent.getall("Authorization") == [f"Bearer {PROVIDER_KEY}"]
    for name in ("api-key", "x-api-key", "Cookie", "X-Forwarded-For", "X-Forwarded-Host", "X-Hop"):
        assert name not in sent


async def test_a_byok_caller_names_its_own_org_and_project(make_sidecar: SidecarFactory, fake: Fake) -> None:
    sc = await pooled_sidecar(make_sidecar, fake)
    _, key = await sc.account(START)
    own = {"OpenAI-Organization": "org-CallersOwn", "OpenAI-Project": "proj_CallersOwn"}
    status, _, _ = await post(sc, key, **own, **{"x-creditgate-provider-key": "sk-callers-own"})
    assert status == 200
    sent = fake.seen[-1]
    assert sent.getall("OpenAI-Organization") == ["org-CallersOwn"]
    assert sent.getall("OpenAI-Project") == ["proj_CallersOwn"]
    assert sent.getall("Authorization") == ["Bearer sk-callers-own"]


UPSTREAM_ONLY = [
    ("Set-Cookie", "__cf_bm=abc; path=/"),
    ("openai-organization", ORG),
    ("openai-project", PROJECT),
    ("Access-Control-Allow-Origin", "*"),
    ("Access-Control-Allow-Credentials", "true"),
    ("x-creditgate-charged", "0"),
    ("x-creditgate-balance", "999999999"),
    ("x-creditgate-held", "1"),
]
RELAYED = [("openai-processing-ms", "12"), ("x-ratelimit-remaining-tokens", "100"), ("retry-after", "1")]


@pytest.mark.parametrize("stream", [False, True], ids=["body", "stream"])
async def test_only_allow_listed_upstream_headers_reach_the_client_and_ours_are_our_own(
    make_sidecar: SidecarFactory, fake: Fake, stream: bool
) -> None:
    sc = await pooled_sidecar(make_sidecar, fake)
    account, key = await sc.account(START)
    fake.answer = Answer(headers=[*UPSTREAM_ONLY, *RELAYED, ("x-request-id", "up-1")], stream=stream)
    resp = await sc.client.post(
        CHAT,
        data=msgspec.json.encode({**BODY, "stream": stream}),
        headers={"Authorization": f"Bearer {key}"},
    )
    await resp.read()
    assert resp.status == 200
    for name, _ in UPSTREAM_ONLY:
        if name.startswith("x-creditgate-"):
            continue
        assert name not in resp.headers
    for name, value in RELAYED:
        assert resp.headers.getall(name) == [value]
    assert resp.headers["x-upstream-request-id"] == "up-1"
    balance = (await sc.balance(account))["balance"]
    assert balance < START  # the call was charged
    if stream:
        assert "x-creditgate-charged" not in resp.headers
        assert "x-creditgate-balance" not in resp.headers
        assert resp.headers.getall("x-creditgate-held") != ["1"]
    else:
        assert resp.headers.getall("x-creditgate-charged") == [str(START - balance)]
        assert resp.headers.getall("x-creditgate-balance") == [str(balance)]


def error(message: str) -> bytes:
    return msgspec.json.encode({"error": {"message": message, "type": "requests", "code": "rate_limit"}})


QUOTING = (
    f"Rate limit reached for gpt-4o-mini in organization {ORG} (project {PROJECT}) on tokens per min; "
    f"key sk-proj-ab***yz, configured {PROVIDER_KEY}."
)


@pytest.mark.parametrize("status", [429, 400, 500])
async def test_pooled_error_bodies_never_quote_the_org_or_a_key(
    make_sidecar: SidecarFactory, fake: Fake, status: int
) -> None:
    sc = await pooled_sidecar(make_sidecar, fake)
    account, key = await sc.account(START)
    fake.answer = Answer(status=status, body=error(QUOTING))
    got, headers, body = await post(sc, key)
    assert got == status
    decoded = msgspec.json.decode(body)  # still valid JSON, in the OpenAI error shape
    message = decoded["error"]["message"]
    for secret in (ORG, PROJECT, PROVIDER_KEY, "sk-proj", "org-", "proj_"):
        assert secret not in message
    assert message.startswith("Rate limit reached for gpt-4o-mini in organization [redacted]")
    assert decoded["error"]["code"] == "rate_limit"
    assert headers["x-creditgate-charged"] == "0"
    assert (await sc.balance(account))["balance"] == START


async def test_a_byok_error_body_is_the_providers_own(make_sidecar: SidecarFactory, fake: Fake) -> None:
    sc = await pooled_sidecar(make_sidecar, fake)
    _, key = await sc.account(START)
    fake.answer = Answer(status=429, body=error("org-CallersOwn is over its limit"))
    got, _, body = await post(sc, key, **{"x-creditgate-provider-key": "sk-callers-own"})
    assert (got, body) == (429, error("org-CallersOwn is over its limit"))


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
async def test_a_redirect_is_never_followed(
    make_sidecar: SidecarFactory, fake: Fake, elsewhere: Fake, status: int
) -> None:
    sc = await pooled_sidecar(make_sidecar, fake)
    account, key = await sc.account(START)
    location = f"{elsewhere.url}/chat/completions"
    fake.answer = Answer(status=status, headers=[("Location", location)], body=b"")
    got, headers, body = await post(sc, key)
    assert got == 502
    assert msgspec.json.decode(body)["error"]["code"] == "upstream_redirect"
    assert "Location" not in headers
    assert location.encode() not in body
    assert elsewhere.seen == []  # neither the body nor the pooled key went there
    assert len(fake.seen) == 1
    assert (await sc.balance(account))["balance"] == START


async def test_shared_cache_never_holds_a_byok_answer(make_sidecar: SidecarFactory, fake: Fake) -> None:
    sc = await pooled_sidecar(make_sidecar, fake, cache_scope="shared")
    _, key_a = await sc.account(START)
    _, key_b = await sc.account(START)
    byok = {"x-creditgate-provider-key": "sk-a-own"}
    status, headers, body = await post(sc, key_a, **byok)
    assert status == 200
    assert msgspec.json.decode(body)["choices"][0]["message"]["content"] == "Bearer sk-a-own"
    # B asks the same: not A's BYOK answer, but its own from upstream (then shared).
    status, headers, body = await post(sc, key_b)
    assert status == 200
    assert headers["X-Cache"] == "MISS"
    assert msgspec.json.decode(body)["choices"][0]["message"]["content"] == f"Bearer {PROVIDER_KEY}"
    assert len(fake.seen) == 2
    # A's BYOK request does not take B's shared answer either (it stays in A's own scope, a hit there).
    status, headers, body = await post(sc, key_a, **byok)
    assert (status, headers["X-Cache"]) == (200, "HIT")
    assert msgspec.json.decode(body)["choices"][0]["message"]["content"] == "Bearer sk-a-own"
    # A pooled call of A's does get the shared answer B paid for.
    status, headers, body = await post(sc, key_a)
    assert (status, headers["X-Cache"]) == (200, "HIT")
    assert msgspec.json.decode(body)["choices"][0]["message"]["content"] == f"Bearer {PROVIDER_KEY}"
    assert len(fake.seen) == 2


async def test_shared_cache_keys_on_headers_that_change_the_answer(
    make_sidecar: SidecarFactory, fake: Fake
) -> None:
    sc = await pooled_sidecar(make_sidecar, fake, cache_scope="shared", forward_request_headers=["x-steer"])
    _, key_a = await sc.account(START)
    _, key_b = await sc.account(START)
    fake.answer = Answer(body=completion("steered"))
    status, headers, _ = await post(sc, key_a, **{"x-steer": "poison", "OpenAI-Beta": "b1"})
    assert (status, headers["Cache-Status"]) == (200, "creditgate; fwd=miss; stored")
    fake.answer = Answer(body=completion("plain"))
    # B without them, or with another value, is not served A's steered answer.
    for steer in ({}, {"x-steer": "other", "OpenAI-Beta": "b1"}, {"x-steer": "poison"}):
        status, headers, body = await post(sc, key_b, **steer)
        assert (status, headers["X-Cache"]) == (200, "MISS")
        assert msgspec.json.decode(body)["choices"][0]["message"]["content"] == "plain"
    # The same headers, in any case and order, share A's entry; headers that cannot change it do not matter.
    status, headers, body = await post(
        sc, key_b, **{"openai-beta": "b1", "X-STEER": "poison", "User-Agent": "x"}
    )
    assert (status, headers["X-Cache"]) == (200, "HIT")
    assert msgspec.json.decode(body)["choices"][0]["message"]["content"] == "steered"


@pytest.mark.parametrize(
    ("setting", "value"),
    [
        ("CREDITGATE_FORWARD_REQUEST_HEADERS", "x-tag, Authorization"),
        ("CREDITGATE_FORWARD_REQUEST_HEADERS", "x-creditgate-*"),
        ("CREDITGATE_RELAY_RESPONSE_HEADERS", "transfer-encoding"),
        ("CREDITGATE_RELAY_RESPONSE_HEADERS", "*"),
    ],
)
def test_no_setting_passes_credentials_framing_or_our_headers(setting: str, value: str) -> None:
    with pytest.raises(ConfigError) as raised:
        load_settings(environ={setting: value})
    assert raised.value.param == setting[len("CREDITGATE_") :].lower()


def test_extra_header_settings_read_from_the_environment() -> None:
    settings = load_settings(
        environ={
            "CREDITGATE_FORWARD_REQUEST_HEADERS": "x-a, x-b-*",
            "CREDITGATE_RELAY_RESPONSE_HEADERS": "x-c",
        }
    )
    assert (settings.forward_request_headers, settings.relay_response_headers) == (["x-a", "x-b-*"], ["x-c"])
