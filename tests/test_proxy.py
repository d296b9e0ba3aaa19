"""The metered proxy end to end: real sidecar, real Redis, the demo upstream over real HTTP."""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import Any

import aiohttp
import msgspec
import pytest
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from sidecar.money import format_credits

from .conftest import PROVIDER_KEY, Sidecar, SidecarFactory, Upstream
from .support import HELLO, MODELS, hold_for, pooled, post, settled
from .support import events as _events
from .support import stream as _stream

pytestmark = pytest.mark.topologies  # money: on one Redis and on the cluster


@pytest.fixture
async def priced(make_sidecar: SidecarFactory) -> Sidecar:
    return await make_sidecar(models=MODELS)


async def test_chat_non_streamed_is_charged_from_usage(priced: Sidecar, upstream: Upstream) -> None:
    account, key = await priced.account(10_000_000)
    resp = await post(priced, "/v1/chat/completions", {"model": "test-model", "messages": HELLO}, key)
    body = await resp.json()
    assert resp.status == 200
    assert body["usage"] == {
        "prompt_tokens": 5,
        "completion_tokens": 16,
        "total_tokens": 21,
        "prompt_tokens_details": {"cached_tokens": 0},
    }
    charge = pooled(5 * 1000 + 16 * 2000)
    assert resp.headers["x-creditgate-charged"] == str(charge)
    assert resp.headers["x-creditgate-balance"] == str(10_000_000 - charge)
    assert resp.headers["x-request-id"].startswith("req_")
    assert resp.headers["x-upstream-request-id"].startswith("upstream-")
    state = await priced.balance(account)
    assert (state["balance"], state["held"], state["holds"]) == (10_000_000 - charge, 0, [])
    assert upstream.calls("chat") == 1


async def test_alias_and_cached_tokens(priced: Sidecar) -> None:
    _, key = await priced.account(10_000_000)
    resp = await post(
        priced,
        "/v1/chat/completions",
        {"model": "tm", "messages": HELLO, "max_tokens": 4},
        key,
        **{"x-demo-cached-tokens": "3"},
    )
    assert resp.status == 200
    # 2 uncached prompt tokens, 3 cached at half price, 4 completion tokens.
    assert resp.headers["x-creditgate-charged"] == str(pooled(2 * 1000 + 3 * 500 + 4 * 2000))


async def test_request_fee_and_n(priced: Sidecar) -> None:
    _, key = await priced.account(10_000_000)
    resp = await post(
        priced, "/v1/chat/completions", {"model": "test-fee", "messages": HELLO, "max_tokens": 3, "n": 2}, key
    )
    assert resp.status == 200
    assert len((await resp.json())["choices"]) == 2
    assert resp.headers["x-creditgate-charged"] == str(pooled(5 * 1000 + 6 * 2000 + 10_000))


async def test_byok_costs_base_price_and_sends_the_callers_key(priced: Sidecar, upstream: Upstream) -> None:
    _, key = await priced.account(10_000_000)
    resp = await post(
        priced,
        "/v1/chat/completions",
        {"model": "test-model", "messages": HELLO},
        key,
        **{"x-creditgate-provider-key": "sk-callers-own"},
    )
    assert resp.status == 200
    assert resp.headers["x-creditgate-charged"] == str(5 * 1000 + 16 * 2000)
    sent = upstream.seen_headers[-1]
    assert sent["Authorization"] == "Bearer sk-callers-own"
    assert "x-creditgate-provider-key" not in {k.lower() for k in sent}


async def test_client_key_never_reaches_upstream_and_provider_key_never_reaches_client(
    priced: Sidecar, upstream: Upstream
) -> None:
    _, key = await priced.account(10_000_000)
    resp = await post(priced, "/v1/chat/completions", {"model": "test-model", "messages": HELLO}, key)
    assert resp.status == 200
    sent = upstream.seen_headers[-1]
    assert sent["Authorization"] == f"Bearer {PROVIDER_KEY}"
    assert all(key not in value for value in sent.values())
    assert all(PROVIDER_KEY not in value for value in resp.headers.values())
    assert PROVIDER_KEY.encode() not in await resp.read()


async def _direct(upstream: Upstream, path: str, body: dict[str, Any]) -> bytes:
    async with (
        aiohttp.ClientSession() as session,
        session.post(upstream.url + path, data=msgspec.json.encode(body)) as resp,
    ):
        return await resp.read()


async def test_chat_stream_relayed_byte_identical(priced: Sidecar, upstream: Upstream) -> None:
    account, key = await priced.account(10_000_000)
    body = {
        "model": "test-model",
        "messages": HELLO,
        "stream": True,
        "max_tokens": 8,
        "stream_options": {"include_usage": True},
    }
    resp, raw = await _stream(priced, "/v1/chat/completions", body, key)
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("text/event-stream")
    assert raw == await _direct(upstream, "/chat/completions", body)
    assert b'"usage":{"prompt_tokens":5' in raw  # the client asked for usage: it keeps it
    await settled(priced)
    state = await priced.balance(account)
    assert state["balance"] == 10_000_000 - pooled(5 * 1000 + 8 * 2000)
    assert state["held"] == 0


async def test_chat_stream_usage_chunk_asked_for_by_sidecar_is_stripped(
    priced: Sidecar, upstream: Upstream
) -> None:
    account, key = await priced.account(10_000_000)
    body = {"model": "test-model", "messages": HELLO, "stream": True, "max_tokens": 8}
    resp, raw = await _stream(priced, "/v1/chat/completions", body, key)
    assert resp.status == 200
    with_usage = _events(
        await _direct(upstream, "/chat/completions", {**body, "stream_options": {"include_usage": True}})
    )
    usage_chunk = with_usage[-2]
    assert b'"choices":[]' in usage_chunk
    assert _events(raw) == [e for e in with_usage if e != usage_chunk]
    assert raw.endswith(b"data: [DONE]\n\n")
    await settled(priced)
    assert (await priced.balance(account))["balance"] == 10_000_000 - pooled(5 * 1000 + 8 * 2000)


async def test_completions_streamed_and_not(priced: Sidecar, upstream: Upstream) -> None:
    account, key = await priced.account(10_000_000)
    body = {"model": "test-model", "prompt": "one two three", "max_tokens": 5}
    resp = await post(priced, "/v1/completions", body, key)
    assert resp.status == 200
    assert (await resp.json())["choices"][0]["text"].startswith("tok0")
    first = pooled(3 * 1000 + 5 * 2000)
    assert resp.headers["x-creditgate-charged"] == str(first)
    stream_body = {**body, "stream": True}
    resp, raw = await _stream(priced, "/v1/completions", stream_body, key)
    assert resp.status == 200
    assert b'"object":"text_completion"' in raw
    assert b'"usage":{' not in raw
    await settled(priced)
    assert (await priced.balance(account))["balance"] == 10_000_000 - 2 * first
    assert upstream.calls("completions") == 2


async def test_embeddings(priced: Sidecar) -> None:
    account, key = await priced.account(10_000_000)
    body = {"model": "test-embed", "input": ["a b c", "d e"]}
    resp = await post(priced, "/v1/embeddings", body, key)
    assert resp.status == 200
    assert (await resp.json())["data"][0]["embedding"] == [0.125, -0.25, 0.5, 1.0]
    assert resp.headers["x-creditgate-charged"] == str(pooled(5 * 100))
    assert (await priced.balance(account))["balance"] == 10_000_000 - pooled(500)


async def test_responses_streamed_and_not(priced: Sidecar, upstream: Upstream) -> None:
    account, key = await priced.account(10_000_000)
    body = {"model": "test-model", "input": "four words of input", "max_output_tokens": 6}
    resp = await post(priced, "/v1/responses", body, key)
    assert resp.status == 200
    assert (await resp.json())["usage"]["input_tokens"] == 4
    charge = pooled(4 * 1000 + 6 * 2000)
    assert resp.headers["x-creditgate-charged"] == str(charge)
    stream_body = {**body, "stream": True}
    resp, raw = await _stream(priced, "/v1/responses", stream_body, key)
    assert raw == await _direct(upstream, "/responses", stream_body)
    assert b"event: response.completed" in raw
    await settled(priced)
    assert (await priced.balance(account))["balance"] == 10_000_000 - 2 * charge


async def test_insufficient_credits_is_402_and_upstream_is_not_called(
    priced: Sidecar, upstream: Upstream
) -> None:
    body = msgspec.json.encode({"model": "test-model", "messages": HELLO, "max_tokens": 10})
    need = hold_for(body, limit=10)
    account, key = await priced.account(need - 1)
    resp = await priced.client.post(
        "/v1/chat/completions", data=body, headers={"Authorization": f"Bearer {key}"}
    )
    assert resp.status == 402
    assert resp.headers["x-should-retry"] == "false"
    error = (await resp.json())["error"]
    assert error["type"] == "insufficient_quota"
    assert error["code"] == "insufficient_credits"
    assert error["param"] is None
    assert error["message"].startswith(
        f"Insufficient credits. Current balance: {format_credits(need - 1)} credits; this request "
        f"requires {format_credits(need)} credits"
    )
    assert error["balance"] == need - 1
    assert error["required"] == need
    assert upstream.calls() == 0
    state = await priced.balance(account)
    assert (state["balance"], state["held"]) == (need - 1, 0)
    # Exactly enough is enough.
    await priced.admin("POST", f"/accounts/{account}/grants", {"amount": 1}, **{"Idempotency-Key": "top-up"})
    resp = await priced.client.post(
        "/v1/chat/completions", data=body, headers={"Authorization": f"Bearer {key}"}
    )
    assert resp.status == 200
    assert upstream.calls() == 1


async def test_402_message_shows_balance_in_credits(make_sidecar: SidecarFactory) -> None:
    sc = await make_sidecar(models=MODELS, top_up_url="https://billing.example/top-up")
    _, key = await sc.account(12_500_000)
    resp = await post(
        sc,
        "/v1/chat/completions",
        {"model": "test-model", "messages": HELLO, "max_tokens": 100, "n": 64},
        key,
    )
    assert resp.status == 402
    error = (await resp.json())["error"]
    assert error["message"].startswith("Insufficient credits. Current balance: 12.5 credits;")
    assert error["top_up_url"] == "https://billing.example/top-up"


@pytest.mark.parametrize("status", [500, 429, 400])
async def test_upstream_error_is_relayed_and_costs_nothing(
    priced: Sidecar, upstream: Upstream, status: int
) -> None:
    account, key = await priced.account(10_000_000)
    resp = await post(
        priced,
        "/v1/chat/completions",
        {"model": "test-model", "messages": HELLO},
        key,
        **{"x-demo-status": str(status)},
    )
    assert resp.status == status
    assert (await resp.json())["error"]["message"] == f"demo failure {status}"
    assert resp.headers["x-creditgate-charged"] == "0"
    state = await priced.balance(account)
    assert (state["balance"], state["held"]) == (10_000_000, 0)


async def test_upstream_connection_refused_costs_nothing(make_sidecar: SidecarFactory) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    sc = await make_sidecar(models=MODELS, upstream_url=f"http://127.0.0.1:{port}/v1")
    account, key = await sc.account(10_000_000)
    resp = await post(sc, "/v1/chat/completions", {"model": "test-model", "messages": HELLO}, key)
    assert resp.status == 502
    assert (await resp.json())["error"]["code"] == "upstream_unavailable"
    state = await sc.balance(account)
    assert (state["balance"], state["held"]) == (10_000_000, 0)


@pytest.mark.parametrize("stream", [False, True])
async def test_an_answer_without_usage_is_charged_the_estimate_warned_and_counted(
    priced: Sidecar, stream: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """An upstream that never reports usage used to bill nothing, silently, forever."""
    account, key = await priced.account(10_000_000)
    body = {"model": "test-model", "messages": HELLO, "stream": stream}
    with caplog.at_level(logging.WARNING, logger="creditgate.proxy"):
        resp = await priced.client.post(
            "/v1/chat/completions",
            data=msgspec.json.encode(body),
            headers={
                "Authorization": f"Bearer {key}",
                "Content-Type": "application/json",
                "x-demo-no-usage": "1",
                "x-demo-tokens": "5",
            },
        )
        answer = await resp.read()
        assert resp.status == 200
        await settled(priced)
    sent = len(msgspec.json.encode(body))
    prompt = -(-sent // 4)  # the prompt at 4 bytes per token
    # One token per relayed event, or the answer body at 4 bytes per token.
    completion = answer.count(b'"content":"tok') if stream else -(-len(answer) // 4)
    charge = pooled(prompt * 1000 + completion * 2000)
    assert (await priced.balance(account))["balance"] == 10_000_000 - charge
    assert "without usage" in caplog.text
    metrics = await (await priced.client.get("/metrics")).text()
    assert 'creditgate_usage_missing_total{model="test-model",route="chat"} 1.0' in metrics


async def test_no_usage_charge_free_charges_nothing(make_sidecar: SidecarFactory) -> None:
    sc = await make_sidecar(models=MODELS, no_usage_charge="free")
    account, key = await sc.account(10_000_000)
    resp = await post(
        sc,
        "/v1/chat/completions",
        {"model": "test-model", "messages": HELLO},
        key,
        **{"x-demo-no-usage": "1"},
    )
    assert resp.status == 200
    assert resp.headers["x-creditgate-charged"] == "0"
    assert (await sc.balance(account))["balance"] == 10_000_000


async def test_stream_cut_by_upstream_costs_nothing(priced: Sidecar) -> None:
    account, key = await priced.account(10_000_000)
    body = {"model": "test-model", "messages": HELLO, "stream": True}
    with pytest.raises(aiohttp.ClientPayloadError):
        await _stream(priced, "/v1/chat/completions", body, key, **{"x-demo-cut-after": "3"})
    await settled(priced)
    state = await priced.balance(account)
    assert (state["balance"], state["held"]) == (10_000_000, 0)


async def test_overdraft_is_still_charged_in_full(priced: Sidecar) -> None:
    body = {"model": "test-model", "messages": HELLO, "max_tokens": 2}
    account, key = await priced.account(10_000_000)
    resp = await post(
        priced, "/v1/chat/completions", body, key, **{"x-demo-tokens": "90", "x-demo-ignore-limit": "1"}
    )
    assert resp.status == 200
    charge = pooled(5 * 1000 + 90 * 2000)
    assert charge > hold_for(msgspec.json.encode(body), limit=2)
    assert resp.headers["x-creditgate-charged"] == str(charge)
    assert (await priced.balance(account))["balance"] == 10_000_000 - charge


async def _disconnect_after(sc: Sidecar, body: dict[str, Any], key: str, events: int, **headers: str) -> None:
    """Read `events` SSE events of a streamed answer, then drop the connection."""
    async with aiohttp.ClientSession() as session:
        resp = await session.post(
            sc.client.make_url("/v1/chat/completions"),
            data=msgspec.json.encode(body),
            headers={"Authorization": f"Bearer {key}", **headers},
        )
        assert resp.status == 200
        seen = 0
        while seen < events:
            line = await resp.content.readline()
            seen += line.startswith(b"data:")
        resp.close()  # closes the connection mid-stream


async def test_client_disconnect_is_charged_from_usage_read_after(
    priced: Sidecar, upstream: Upstream
) -> None:
    account, key = await priced.account(10_000_000)
    body = {"model": "test-model", "messages": HELLO, "stream": True, "max_tokens": 40}
    await _disconnect_after(priced, body, key, 2, **{"x-demo-tokens": "40", "x-demo-token-delay-ms": "5"})
    await settled(priced)
    state = await priced.balance(account)
    # The sidecar kept reading after the client left and charged the usage the upstream reported.
    assert (state["balance"], state["held"]) == (10_000_000 - pooled(5 * 1000 + 40 * 2000), 0)


async def test_client_disconnect_without_usage_is_charged_an_estimate(priced: Sidecar) -> None:
    account, key = await priced.account(10_000_000)
    body = {"model": "test-model", "messages": HELLO, "stream": True, "max_tokens": 40}
    size = len(msgspec.json.encode(body))
    await _disconnect_after(
        priced, body, key, 2, **{"x-demo-tokens": "40", "x-demo-token-delay-ms": "5", "x-demo-no-usage": "1"}
    )
    await settled(priced)
    state = await priced.balance(account)
    charged = 10_000_000 - state["balance"]
    # Policy: the prompt at 4 bytes a token plus one completion token per chunk the client was sent
    # (at least the 2 it read; socket buffers may have taken a few more before the close was seen).
    candidates = {pooled(-(-size // 4) * 1000 + relayed * 2000): relayed for relayed in range(2, 41)}
    assert charged in candidates, charged
    assert state["held"] == 0


async def test_unknown_or_missing_key_is_401(priced: Sidecar, upstream: Upstream) -> None:
    for headers in ({"Authorization": "Bearer cgk-not-a-key"}, {}, {"Authorization": "Basic abc"}):
        resp = await priced.client.post("/v1/chat/completions", json={"model": "test-model"}, headers=headers)
        assert resp.status == 401
        error = (await resp.json())["error"]
        assert error["code"] == "invalid_api_key"
        assert error["type"] == "invalid_request_error"
    assert upstream.calls() == 0


async def test_revoked_key_is_401(priced: Sidecar) -> None:
    account, key = await priced.account(10_000_000)
    key_id = (await priced.admin("POST", f"/accounts/{account}/keys"))["id"]
    await priced.admin("DELETE", f"/keys/{key_id}")
    resp = await post(priced, "/v1/chat/completions", {"model": "test-model", "messages": HELLO}, key)
    assert resp.status == 200  # the first key still works
    created = await priced.admin("POST", f"/accounts/{account}/keys")
    await priced.admin("DELETE", f"/keys/{created['id']}")
    resp = await post(
        priced, "/v1/chat/completions", {"model": "test-model", "messages": HELLO}, created["key"]
    )
    assert resp.status == 401


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (b"{not json", None),
        (b"", None),
        (b"[1, 2]", None),
        (b'{"messages": []}', "model"),
        (b'{"model": "no-such-model", "messages": []}', "model"),
        (b'{"model": "test-model", "max_tokens": -5}', "max_tokens"),
        (b'{"model": "test-model", "max_tokens": 0}', "max_tokens"),
        (b'{"model": "test-model", "max_tokens": 1000000000000}', "max_tokens"),
        (b'{"model": "test-model", "max_completion_tokens": 101}', "max_completion_tokens"),
        (b'{"model": "test-model", "max_tokens": "10"}', "max_tokens"),
        (b'{"model": "test-model", "n": 1.5}', "n"),
        (b'{"model": "test-model", "n": true}', "n"),
        (b'{"model": "test-model", "n": 0}', "n"),
        (b'{"model": "test-model", "stream": "yes"}', "stream"),
    ],
)
async def test_bad_requests_are_400_with_nothing_held(
    priced: Sidecar, upstream: Upstream, body: bytes, param: str | None
) -> None:
    account, key = await priced.account(10_000_000)
    resp = await priced.client.post(
        "/v1/chat/completions", data=body, headers={"Authorization": f"Bearer {key}"}
    )
    assert resp.status == 400
    error = (await resp.json())["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert error["message"]
    state = await priced.balance(account)
    assert (state["balance"], state["held"], state["holds"]) == (10_000_000, 0, [])
    assert upstream.calls() == 0


async def test_models_are_listed_at_zero_balance(priced: Sidecar, upstream: Upstream) -> None:
    account, key = await priced.account(0)
    resp = await priced.client.get("/v1/models", headers={"Authorization": f"Bearer {key}"})
    assert resp.status == 200
    assert (await resp.json())["data"][0]["id"] == next(iter(priced.settings.models))
    assert upstream.calls() == 0
    assert (await priced.balance(account))["balance"] == 0
    resp = await priced.client.get("/v1/models")
    assert resp.status == 401


async def test_trusted_account_header(make_sidecar: SidecarFactory, upstream: Upstream) -> None:
    sc = await make_sidecar(models=MODELS, account_header="x-account-id")
    account, _ = await sc.account(10_000_000)
    body = msgspec.json.encode({"model": "test-model", "messages": HELLO})
    resp = await sc.client.post("/v1/chat/completions", data=body, headers={"x-account-id": account})
    assert resp.status == 200
    assert "x-account-id" not in {k.lower() for k in upstream.seen_headers[-1]}
    resp = await sc.client.post("/v1/chat/completions", data=body, headers={"x-account-id": "nobody"})
    assert resp.status == 401


async def test_in_flight_requests_finish_when_balance_reaches_zero(
    priced: Sidecar, upstream: Upstream
) -> None:
    """Two holds fit; both complete even though their charges use up the balance; then 402."""
    body = {"model": "test-model", "messages": HELLO, "max_tokens": 10}
    hold = hold_for(msgspec.json.encode(body), limit=10)
    account, key = await priced.account(2 * hold)
    headers = {"x-demo-tokens": "10"}
    first, second = await asyncio.gather(
        post(priced, "/v1/chat/completions", body, key, **headers),
        post(priced, "/v1/chat/completions", body, key, **headers),
    )
    assert (first.status, second.status) == (200, 200)
    third = await post(priced, "/v1/chat/completions", {**body, "max_tokens": 100}, key)
    assert third.status == 402
    state = await priced.balance(account)
    assert state["balance"] == 2 * hold - 2 * pooled(5 * 1000 + 10 * 2000)
    assert state["balance"] >= 0


async def test_a_failed_lease_renewal_neither_ends_the_stream_nor_its_charge(
    make_sidecar: SidecarFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    sc = await make_sidecar(models=MODELS, hold_lease_seconds=1)  # renewed every third of a second
    account, key = await sc.account(10_000_000)
    attempts: list[tuple[Any, ...]] = []

    async def failing_renew(*args: Any) -> None:
        attempts.append(args)
        raise RedisConnectionError("a Redis blip")

    monkeypatch.setattr(sc.balances, "renew", failing_renew)
    body = {"model": "test-model", "messages": HELLO, "stream": True, "max_tokens": 8}
    resp, raw = await _stream(sc, "/v1/chat/completions", body, key, **{"x-demo-token-delay-ms": "100"})
    assert resp.status == 200
    assert raw.endswith(b"data: [DONE]\n\n")
    assert len(_events(raw)) == 9  # 8 tokens and [DONE]: nothing cut, nothing written over the stream
    assert attempts  # the stream outlived a third of its lease, and every renewal failed
    await settled(sc)
    state = await sc.balance(account)
    assert (state["balance"], state["held"]) == (10_000_000 - pooled(5 * 1000 + 8 * 2000), 0)


def losing_replies(balances: Any, monkeypatch: pytest.MonkeyPatch, times: int) -> list[str]:
    """Make the ledger's reserve run in Redis but lose its reply `times` times (as a timeout would)."""
    real = balances.reserve
    lost: list[str] = []

    async def reserve(*args: Any, **kwargs: Any) -> Any:
        reservation = await real(*args, **kwargs)
        if len(lost) < times:
            lost.append(args[1])
            raise RedisTimeoutError("the reply was lost")
        return reservation

    monkeypatch.setattr(balances, "reserve", reserve)
    return lost


async def test_a_reserve_whose_reply_was_lost_is_sent_again_and_holds_once(
    priced: Sidecar, monkeypatch: pytest.MonkeyPatch
) -> None:
    account, key = await priced.account(10_000_000)
    lost = losing_replies(priced.balances, monkeypatch, times=1)
    resp = await post(priced, "/v1/chat/completions", {"model": "test-model", "messages": HELLO}, key)
    assert resp.status == 200
    assert lost == [resp.headers["x-request-id"]]
    charge = pooled(5 * 1000 + 16 * 2000)
    state = await priced.balance(account)
    assert (state["balance"], state["held"], state["holds"]) == (10_000_000 - charge, 0, [])


async def test_a_reserve_that_keeps_failing_releases_what_it_may_have_held(
    make_sidecar: SidecarFactory, monkeypatch: pytest.MonkeyPatch, upstream: Upstream
) -> None:
    priced = await make_sidecar(models=MODELS, reserve_retry_seconds=0.2)  # retried until then
    account, key = await priced.account(10_000_000)
    losing_replies(priced.balances, monkeypatch, times=1_000_000)
    resp = await post(priced, "/v1/chat/completions", {"model": "test-model", "messages": HELLO}, key)
    assert resp.status == 503
    assert (await resp.json())["error"]["code"] == "service_unavailable"
    state = await priced.balance(account)  # held by the script, then released at once: not left to its lease
    assert (state["balance"], state["held"], state["holds"]) == (10_000_000, 0, [])
    assert upstream.calls("chat") == 0
