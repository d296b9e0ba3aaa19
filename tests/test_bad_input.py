"""Bad input is a 4xx, never a 5xx, and it moves no money.

A real sidecar (real Redis, real Postgres) runs on its own event loop in a thread, in front of an
upstream that refuses everything with a 400, so no request here can legitimately cost anything.
Hypothesis then sends arbitrary bytes and arbitrary JSON trees (billing fields included, with values of
every type, deep nesting and invalid UTF-8) over real HTTP to all four metered routes, on a funded and an
empty account, cacheable or not: no answer may be a 5xx, and after each one the balance is unchanged and
nothing is held.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import pytest
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sidecar.app import create_app
from sidecar.cachekey import cache_key
from sidecar.errors import BadRequest
from sidecar.wire import ROUTES, decode_request

from .conftest import ADMIN_TOKEN, make_settings

FUNDED = 5_000_000


def test_invalid_utf8_in_a_cacheable_body_is_a_400() -> None:
    body = b'{"model":"gpt-4o-mini","temperature":0,"messages":[{"role":"user","content":"\xff\xfe"}]}'
    decode_request(body)  # the billing fields are fine; the rest is only read for the cache key
    with pytest.raises(BadRequest, match="not valid JSON"):
        cache_key("chat", "gpt-4o-mini", body, "account:a")


@pytest.mark.parametrize("depth", [3_000, 100_000])
def test_deep_nesting_is_a_400_not_a_recursion_error(depth: int) -> None:
    body = b'{"model":"gpt-4o-mini","temperature":0,"x":' + b"[" * depth + b"]" * depth + b"}"
    with pytest.raises(BadRequest, match="too deeply"):
        decode_request(body)
    with pytest.raises(BadRequest, match="too deeply"):
        cache_key("chat", "gpt-4o-mini", body, "account:a")


async def _refusing_upstream(request: web.Request) -> web.Response:
    await request.read()
    return web.json_response(
        {"error": {"message": "refused by the test upstream", "type": "invalid_request_error"}}, status=400
    )


@dataclass
class Running:
    port: int
    funded_key: str
    funded: str
    empty_key: str
    empty: str

    def call(
        self, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None
    ) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            conn.close()

    def admin(self, method: str, path: str, payload: Any = None, **headers: str) -> Any:
        status, body = self.call(
            method,
            f"/admin{path}",
            json.dumps(payload).encode() if payload is not None else None,
            {"Authorization": f"Bearer {ADMIN_TOKEN}", "Content-Type": "application/json", **headers},
        )
        assert status < 300, body
        return json.loads(body)

    def money(self, account: str) -> tuple[int, int]:
        view = self.admin("GET", f"/accounts/{account}")
        return view["balance"], view["held"]


@pytest.fixture
def running(redis_url: str, database_url: str) -> Iterator[Running]:
    """The sidecar and its refusing upstream, served from a thread's own loop."""
    loop = asyncio.new_event_loop()
    ready: Future[tuple[int, list[web.AppRunner]]] = Future()
    stop = asyncio.Event()

    async def main() -> None:
        runners = []
        try:
            up = web.Application()
            up.router.add_route("*", "/{tail:.*}", _refusing_upstream)
            up_runner = web.AppRunner(up)
            await up_runner.setup()
            up_site = web.TCPSite(up_runner, "127.0.0.1", 0)
            await up_site.start()
            runners.append(up_runner)
            up_port = up_runner.addresses[0][1]
            settings = make_settings(redis_url, database_url, f"http://127.0.0.1:{up_port}/v1")
            runner = web.AppRunner(create_app(settings))
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", 0).start()
            runners.append(runner)
            ready.set_result((runner.addresses[0][1], runners))
        except BaseException as exc:
            ready.set_exception(exc)
            raise
        try:
            await stop.wait()
        finally:
            for r in reversed(runners):
                await r.cleanup()

    thread = threading.Thread(target=loop.run_until_complete, args=(main(),), name="bad-input-sidecar")
    thread.start()
    try:
        port, _ = ready.result(timeout=60)
        probe = Running(port, "", "", "", "")
        accounts = []
        for micro in (FUNDED, 0):
            account = probe.admin("POST", "/accounts", {})["id"]
            if micro:
                probe.admin(
                    "POST", f"/accounts/{account}/grants", {"amount": micro}, **{"Idempotency-Key": "fund"}
                )
            accounts += [account, probe.admin("POST", f"/accounts/{account}/keys")["key"]]
        yield Running(port, accounts[1], accounts[0], accounts[3], accounts[2])
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(60)
        loop.close()


# JSON trees: every type, in every billing field, and anywhere else.
_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
_trees = st.recursive(
    _scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)
_BILLING = (
    "temperature",
    "n",
    "best_of",
    "stream",
    "stream_options",
    "max_tokens",
    "max_completion_tokens",
    "max_output_tokens",
    "messages",
    "prompt",
    "input",
    "previous_response_id",
)
_objects = st.fixed_dictionaries(
    {"model": st.sampled_from(["gpt-4o-mini", "text-embedding-3-small", "no-such-model"]) | _trees},
    optional=dict.fromkeys(_BILLING, _trees) | {"temperature": st.just(0)},
)


@st.composite
def _bodies(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["bytes", "tree", "object", "object", "deep", "utf8"]))
    if kind == "bytes":
        return draw(st.binary(max_size=300))
    if kind == "tree":
        return json.dumps(draw(_trees)).encode()
    body = json.dumps(draw(_objects)).encode()
    if kind == "deep":
        depth = draw(st.integers(min_value=1, max_value=5_000))
        return body[:-1] + b', "deep": ' + b"[" * depth + b"]" * depth + b"}"
    if kind == "utf8":
        return body[:-1] + b', "bad": "' + draw(st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80"])) + b'"}'
    return body


@settings(
    max_examples=300,
    deadline=None,
    database=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(route=st.sampled_from(sorted(ROUTES)), body=_bodies(), funded=st.booleans())
def test_any_body_on_any_metered_route_is_never_a_5xx_and_moves_nothing(
    running: Running, route: str, body: bytes, funded: bool
) -> None:
    key, account = (running.funded_key, running.funded) if funded else (running.empty_key, running.empty)
    before = running.money(account)
    status, answer = running.call(
        "POST",
        route,
        body,
        {"Authorization": f"Bearer {key}", "Content-Type": "application/json", "x-test": uuid.uuid4().hex},
    )
    assert status < 500, (status, answer[:500])
    assert 400 <= status < 500, status  # the upstream refuses everything that gets that far
    error = json.loads(answer)["error"]
    assert error["message"]
    assert error["type"]
    assert running.money(account) == (before[0], 0)
