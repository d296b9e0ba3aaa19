"""Fuzzing the edges: what clients send, what upstreams answer, what operators send and configure.

test_bad_input.py already throws arbitrary bytes and JSON trees at the metered routes in front of an
upstream that refuses everything. Here:

- requests: a valid request per route with its billing fields (and the headers the sidecar reads)
  replaced by hostile values, in front of an upstream that answers properly: each is either served and
  charged exactly its usage, or refused with a 4xx in OpenAI's error shape that moves no money;
- upstream answers: the SSE reader and the usage parser fed arbitrary bytes, arbitrary chunk splits and
  usage objects with any numbers; then a real sidecar in front of an upstream answering hypothesis-drawn
  statuses, content types and bodies: the client never gets a 5xx of creditgate's own beyond the documented
  upstream mapping (502 `upstream_error`, or the upstream's own 5xx relayed), nothing stays held, and the
  charge is a non-negative integer, at most the hold unless the answer reported usage (then exactly its
  cost, capped at MAX_CHARGE);
- admin payloads: fuzzed JSON bodies, Idempotency-Key headers and path parameters: a 2xx or a 4xx in the
  error shape, never a 5xx, and nothing changed on a refusal;
- the settings loader: fuzzed environments and config files give Settings or a ConfigError naming the
  setting, never another exception (nor a hang).

The sidecars run on real Redis and real Postgres, over real HTTP, on a loop of their own in a thread (as in
test_bad_input.py), so hypothesis drives them from plain synchronous tests. Example counts are modest and
derandomized: the same examples every run.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import pytest
import redis
import yaml
from aiohttp import web
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from sidecar.app import create_app
from sidecar.config import ACCOUNT_ID, Settings, load_settings
from sidecar.errors import ConfigError
from sidecar.keys import KeySpace
from sidecar.money import MAX_CHARGE
from sidecar.pipeline import admit
from sidecar.pricing import PriceTable, Usage, cost
from sidecar.usage import MAX_TOKENS, SSEReader, usage_from_body
from sidecar.wire import ROUTES

from .conftest import ADMIN_TOKEN, make_settings

FUZZ = settings(
    deadline=None,
    database=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
FUNDING = 10**14  # micro-credits: no fuzzed request runs an account dry

# ---- a sidecar in front of a programmable upstream, on a loop of its own ----------------------------


@dataclass
class UpstreamScript:
    """What the upstream answers next: an honest answer (usage 3 + 2, streamed when asked), or the drawn
    status, content type and body chunks."""

    honest: bool = True
    status: int = 200
    content_type: str = "application/json"
    chunks: list[bytes] = field(default_factory=list)


HONEST_USAGE = Usage(prompt_tokens=3, completion_tokens=2)


async def _honest(request: web.Request, body: bytes) -> web.StreamResponse:
    try:
        parsed = json.loads(body)
    except ValueError:
        parsed = {}
    usage = {"prompt_tokens": 3, "completion_tokens": 2, "input_tokens": 3, "output_tokens": 2}
    if isinstance(parsed, dict) and parsed.get("stream") is True:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b'data: {"choices":[{"index":0,"delta":{"content":"hi"}}]}\n\n')
        if request.path.endswith("/responses"):
            final = {"type": "response.completed", "response": {"usage": usage}}
            await resp.write(b"data: " + json.dumps(final).encode() + b"\n\n")
        else:
            await resp.write(b"data: " + json.dumps({"choices": [], "usage": usage}).encode() + b"\n\n")
            await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp
    return web.json_response({"choices": [{"index": 0, "message": {"content": "hi"}}], "usage": usage})


@dataclass
class Running:
    port: int
    settings: Settings = field(repr=False)
    script: UpstreamScript
    redis_url: str

    def call(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict[str, str | bytes] | None = None,
    ) -> tuple[int, dict[str, str], bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            resp = conn.getresponse()
            return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
        finally:
            conn.close()

    def admin(self, method: str, path: str, payload: Any = None, **headers: str) -> Any:
        status, _, body = self.call(
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

    def settled_money(self, account: str) -> int:
        """The balance once nothing is held (a stream is settled after its client has the answer)."""
        deadline = time.monotonic() + 30
        while True:
            balance, held = self.money(account)
            if held == 0:
                return balance
            assert time.monotonic() < deadline, f"{account} still holds {held}"
            time.sleep(0.005)

    def funded(self) -> tuple[str, str]:
        account = self.admin("POST", "/accounts", {})["id"]
        grant = {"amount": FUNDING}
        self.admin("POST", f"/accounts/{account}/grants", grant, **{"Idempotency-Key": "fund"})
        return account, self.admin("POST", f"/accounts/{account}/keys")["key"]

    def account_count(self) -> int:
        client = redis.Redis.from_url(self.redis_url)
        try:
            return int(client.scard(KeySpace(self.settings.key_prefix, self.settings.partitions).accounts))
        finally:
            client.close()


@pytest.fixture
def running(redis_url: str, database_url: str) -> Iterator[Running]:
    loop = asyncio.new_event_loop()
    ready: Future[tuple[int, Settings]] = Future()
    stop = asyncio.Event()
    script = UpstreamScript()

    async def upstream(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        if script.honest:
            return await _honest(request, body)
        resp = web.StreamResponse(status=script.status, headers={"Content-Type": script.content_type})
        await resp.prepare(request)
        for chunk in script.chunks:
            await resp.write(chunk)
        await resp.write_eof()
        return resp

    async def main() -> None:
        runners = []
        try:
            up = web.Application()
            up.router.add_route("*", "/{tail:.*}", upstream)
            up_runner = web.AppRunner(up)
            await up_runner.setup()
            await web.TCPSite(up_runner, "127.0.0.1", 0).start()
            runners.append(up_runner)
            url = f"http://127.0.0.1:{up_runner.addresses[0][1]}/v1"
            settings = make_settings(redis_url, database_url, url)
            runner = web.AppRunner(create_app(settings))
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", 0).start()
            runners.append(runner)
            ready.set_result((runner.addresses[0][1], settings))
        except BaseException as exc:
            ready.set_exception(exc)
            raise
        try:
            await stop.wait()
        finally:
            for r in reversed(runners):
                await r.cleanup()

    thread = threading.Thread(target=loop.run_until_complete, args=(main(),), name="fuzz-sidecar")
    thread.start()
    try:
        port, settings = ready.result(timeout=60)
        yield Running(port, settings, script, redis_url)
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(60)
        loop.close()


def assert_error_shape(body: bytes) -> dict[str, Any]:
    error: dict[str, Any] = json.loads(body)["error"]
    assert isinstance(error["message"], str)
    assert error["message"]
    assert isinstance(error["type"], str)
    assert error["type"]
    return error


# ---- hostile values --------------------------------------------------------------------------------

_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.sampled_from([0, -1, 1, 128, 129, 2**31, 2**53 + 1, 2**63, 2**64, 10**30])
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.sampled_from([0.5, 1.0, 1e308, -0.0, 5e-324])
    | st.text(max_size=12)
    | st.sampled_from(
        ["1", "", "gpt-4o-mini", "\x00", "\ud800".encode("utf-8", "surrogatepass").decode("latin-1")]
    )
)
_trees = st.recursive(
    _scalars,
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3)
    ),
    max_leaves=12,
)
_BILLING = (
    "model",
    "messages",
    "prompt",
    "input",
    "max_tokens",
    "max_completion_tokens",
    "max_output_tokens",
    "n",
    "best_of",
    "stream",
    "stream_options",
    "tools",
    "temperature",
    "previous_response_id",
)
_BASE: dict[str, dict[str, Any]] = {
    "/v1/chat/completions": {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]},
    "/v1/completions": {"model": "gpt-3.5-turbo-instruct", "prompt": "hi"},
    "/v1/embeddings": {"model": "text-embedding-3-small", "input": "hi"},
    "/v1/responses": {"model": "gpt-4o-mini", "input": "hi"},
}


@st.composite
def _mutated(draw: st.DrawFn) -> tuple[str, bytes, dict[str, str | bytes]]:
    route = draw(st.sampled_from(sorted(ROUTES)))
    body = dict(_BASE[route])
    for name in draw(st.lists(st.sampled_from(_BILLING), min_size=1, max_size=3, unique=True)):
        value = draw(
            _trees
            | st.fixed_dictionaries({"include_usage": _scalars})
            | st.lists(st.fixed_dictionaries({"type": _scalars, "function": _trees}), max_size=2)
        )
        if draw(st.booleans()):
            body.pop(name, None)
        else:
            body[name] = value
    encoded = json.dumps(body).encode()
    if draw(st.booleans()):  # a duplicated member: msgspec keeps the last one, as the upstream would
        encoded = encoded[:-1] + b', "stream": ' + json.dumps(draw(_scalars)).encode() + b"}"
    headers: dict[str, str | bytes] = {}
    for header in ("x-creditgate-fit-output", "x-creditgate-provider-key", "Cache-Control"):
        if draw(st.booleans()):
            headers[header] = draw(_header_values)
    return route, encoded, headers


_header_values = st.text(st.characters(blacklist_categories=["Cc", "Cs"]), min_size=1, max_size=40).map(
    lambda text: text.strip().encode() or b"x"
)


@settings(FUZZ, max_examples=120)
@given(case=_mutated())
def test_a_hostile_billing_field_is_served_and_charged_exactly_or_refused_for_nothing(
    running: Running, case: tuple[str, bytes, dict[str, str | bytes]]
) -> None:
    route, body, headers = case
    running.script.honest = True
    account, key = running.funded()
    status, _, answer = running.call(
        "POST", route, body, {"Authorization": f"Bearer {key}", "Content-Type": "application/json", **headers}
    )
    event(f"answered {status}")
    assert status < 500, (status, answer[:300])
    after = running.settled_money(account)
    if status >= 400:
        assert_error_shape(answer)
        assert after == FUNDING
        return
    assert status == 200, status
    prices = PriceTable.from_settings(running.settings)
    byok = b"x-creditgate-provider-key" in {k.lower().encode() for k in headers}
    multiplier = prices.byok if byok else prices.pooled
    expected = cost(prices.resolve(json.loads(body)["model"]), HONEST_USAGE, multiplier)
    assert FUNDING - after == expected


# ---- upstream answers: the parsers -------------------------------------------------------------------

_numbers = (
    st.integers(min_value=-(10**20), max_value=10**20).map(str)
    | st.decimals(allow_nan=False, allow_infinity=False).map(
        lambda d: format(d, "f") if d.is_finite() else "0"
    )
    | st.floats(allow_nan=False, allow_infinity=False).map(repr)
    | st.sampled_from(["1e999999999", "-1e999999999", "1e-999999999", "1E400", "0e0", "-0", "1.5", "11.0"])
    | st.sampled_from(['"5"', "null", "true", "[]", "{}", '"1e3"'])
)


_FAMILIES = [
    ("prompt_tokens", "completion_tokens", "prompt_tokens_details"),
    ("input_tokens", "output_tokens", "input_tokens_details"),
]


@st.composite
def _usage_parts(draw: st.DrawFn) -> tuple[bytes, list[str | None]]:
    """A usage object as raw JSON with any number (or non-number) in each token field, and those raw
    values (prompt, completion, cached; None: absent)."""
    names = draw(st.sampled_from(_FAMILIES))
    raws: list[str | None] = [draw(st.none() | _numbers) for _ in range(3)]
    members = [f'"{name}":{raw}' for name, raw in zip(names[:2], raws[:2], strict=True) if raw is not None]
    if raws[2] is not None:
        members.append(f'"{names[2]}":{{"cached_tokens":{raws[2]}}}')
    return ("{" + ",".join(members) + "}").encode(), raws


_usage_objects = _usage_parts().map(lambda parts: parts[0])


def _assert_sane(usage: Usage | None) -> None:
    if usage is None:
        return
    for count in (usage.prompt_tokens, usage.completion_tokens, usage.cached_tokens):
        assert type(count) is int
        assert 0 <= count <= MAX_TOKENS


def _exact_count(raw: str) -> int | None:
    """The oracle: a JSON number as tokens (null 0, a fraction rounded up), None when it voids the usage."""
    if raw == "null":
        return 0
    try:
        value = Decimal(raw)
    except ArithmeticError:
        return None
    if not value.is_finite() or value < 0 or value > MAX_TOKENS:
        return None
    whole = int(value)
    return whole + (1 if value > whole else 0)


def _expected(raws: list[str | None]) -> Usage | None:
    prompt, completion, cached = raws
    if prompt is None or prompt == "null":
        return None  # no prompt count: no usage
    counts = [_exact_count(raw or "0") for raw in (prompt, completion, cached)]
    if None in counts:
        return None
    return Usage(*counts)  # type: ignore[arg-type]


@settings(FUZZ, max_examples=400)
@given(parts=_usage_parts(), noise=st.binary(max_size=20))
def test_usage_from_any_body_is_exactly_its_counts_or_none(
    parts: tuple[bytes, list[str | None]], noise: bytes
) -> None:
    usage, raws = parts
    body = b'{"id":"x","choices":[],"usage":' + usage + b"}"
    found = usage_from_body(body)
    _assert_sane(found)
    assert found == _expected(raws)
    _assert_sane(usage_from_body(noise))
    _assert_sane(usage_from_body(body[: len(body) // 2] + noise))


@st.composite
def _sse_streams(draw: st.DrawFn) -> bytes:
    """SSE-ish bytes: well-formed events with fuzzed usage, malformed events, any framing, raw bytes."""
    parts = []
    for _ in range(draw(st.integers(0, 8))):
        kind = draw(st.sampled_from(["usage", "responses", "chunk", "done", "comment", "raw", "multiline"]))
        if kind == "usage":
            data = b'{"choices":[],"usage":' + draw(_usage_objects) + b"}"
        elif kind == "responses":
            event_type = draw(
                st.sampled_from(["response.completed", "response.incomplete", "response.created"])
            )
            data = (
                b'{"type":"' + event_type.encode() + b'","response":{"usage":' + draw(_usage_objects) + b"}}"
            )
        elif kind == "chunk":
            data = b'{"choices":[{"delta":{"content":"a"}}],"usage":null}'
        elif kind == "done":
            data = b"[DONE]"
        elif kind == "comment":
            parts.append(b": keep-alive")
            continue
        elif kind == "raw":
            parts.append(draw(st.binary(max_size=30)))
            continue
        else:
            data = b'{"choices":[],\n"usage":' + draw(_usage_objects) + b"}"
        lines = data.split(b"\n")
        parts.append(
            b"".join(b"data: " + line + draw(st.sampled_from([b"\n", b"\r\n", b"\r"])) for line in lines)
        )
    separators = st.sampled_from([b"\n", b"\r\n", b"\r", b"\n\n", b""])
    return b"".join(part + draw(separators) for part in parts)


def _split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]


@settings(FUZZ, max_examples=400)
@given(
    stream=_sse_streams() | st.binary(max_size=200),
    cuts=st.lists(st.integers(0, 10**6), max_size=12),
    kind=st.sampled_from(["chat", "completions", "responses"]),
)
def test_the_sse_reader_takes_any_bytes_in_any_split_alike(stream: bytes, cuts: list[int], kind: str) -> None:
    whole = SSEReader(kind=kind)
    relayed_whole = b"".join(whole.feed(stream)) + whole.flush()
    split = SSEReader(kind=kind)
    relayed_split = b"".join(b"".join(split.feed(chunk)) for chunk in _split(stream, cuts)) + split.flush()
    assert relayed_whole == stream  # relayed byte for byte
    assert relayed_split == stream
    assert split.usage == whole.usage
    assert split.done == whole.done
    _assert_sane(whole.usage)
    stripping = SSEReader(kind=kind, strip_usage_chunk=True)
    kept = b"".join(b"".join(stripping.feed(chunk)) for chunk in _split(stream, cuts)) + stripping.flush()
    assert len(kept) <= len(stream)
    assert stripping.usage == whole.usage


# ---- upstream answers: through the real sidecar -------------------------------------------------------


@st.composite
def _answers(draw: st.DrawFn) -> tuple[int, str, list[bytes]]:
    status = draw(st.sampled_from([200, 200, 200, 200, 201, 204, 302, 400, 401, 429, 500, 503]))
    content_type = draw(st.sampled_from(["application/json", "text/event-stream", "text/plain"]))
    shape = draw(st.sampled_from(["json", "json", "sse", "sse", "bytes"]))
    if shape == "json":
        body = b'{"choices":[{"message":{"content":"x"}}],"usage":' + draw(_usage_objects) + b"}"
        if draw(st.booleans()):
            body = body[: draw(st.integers(0, len(body)))]  # cut short
    elif shape == "sse":
        body = draw(_sse_streams())
    else:
        body = draw(st.binary(max_size=300))
    return status, content_type, _split(body, draw(st.lists(st.integers(0, 10**6), max_size=5)))


@settings(FUZZ, max_examples=150)
@given(
    answer=_answers(),
    route=st.sampled_from(sorted(ROUTES)),
    stream=st.booleans(),
    max_tokens=st.none() | st.integers(1, 40),
)
def test_any_upstream_answer_is_relayed_or_mapped_and_charged_within_bounds(
    running: Running, answer: tuple[int, str, list[bytes]], route: str, stream: bool, max_tokens: int | None
) -> None:
    status, content_type, chunks = answer
    running.script.honest = False
    running.script.status, running.script.content_type, running.script.chunks = status, content_type, chunks
    request = dict(_BASE[route])
    if route != "/v1/embeddings":
        request["stream"] = stream
        if max_tokens is not None:
            request["max_output_tokens" if route == "/v1/responses" else "max_tokens"] = max_tokens
    body = json.dumps(request).encode()
    account, key = running.funded()
    got, _, relayed = running.call(
        "POST", route, body, {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    )
    if got >= 500:
        # Only the documented upstream mapping: the upstream's own 5xx relayed, or a 502 upstream_error.
        assert got == status or (got == 502 and assert_error_shape(relayed)["type"] == "upstream_error"), (
            got,
            status,
            relayed[:300],
        )
    charge = FUNDING - running.settled_money(account)
    assert type(charge) is int
    assert charge >= 0
    # The oracle: the sidecar's own planning of the hold, and its own parsers' reading of the answer.
    prices = PriceTable.from_settings(running.settings)
    policy = admit.AdmitPolicy.from_settings(running.settings)
    identified = admit.identify(body, prices)
    hold = admit.plan("r", account, ROUTES[route], body, identified, {}, prices, policy).hold
    whole = b"".join(chunks)
    usage: Usage | None = None
    if status == 200 and content_type == "text/event-stream":
        reader = SSEReader(kind=ROUTES[route].kind)
        reader.feed(whole)
        reader.flush()
        usage = reader.usage
    elif status == 200:
        usage = usage_from_body(whole)
    event(f"answered {got}, " + ("no charge" if not charge else "charged"))
    if status != 200:
        assert charge == 0
    elif usage is not None:
        assert charge == min(cost(identified[1], usage, prices.pooled), MAX_CHARGE)
    else:
        assert charge <= hold, (charge, hold)


# ---- admin payloads -------------------------------------------------------------------------------------

_texts = st.text(max_size=30) | st.sampled_from(
    ["", "a" * 64, "a" * 65, "acct..x", "\x00", "é", "a b", "../x"]
)
_credits = (
    st.from_regex(r"\A-?[0-9]{0,4}(\.[0-9]{0,8})?([eE][+-]?[0-9]{1,7})?\Z", fullmatch=True)
    | st.sampled_from(["1e999999", "1e-999999", "NaN", "sNaN", "Infinity", "-0", "0.000001", "1_000"])
    | _texts
)


def _quoted(text: str) -> str:
    return urllib.parse.quote(text, safe="") or "%20"


_path_params = _texts.map(_quoted) | st.sampled_from(
    ["%00", "%FF", "%C3%28", "%ED%A0%80", "a%2Fb", "x" * 300]
)


@settings(FUZZ, max_examples=150)
@given(
    payload=st.fixed_dictionaries(
        {},
        optional={
            "amount": _scalars,
            "credits": _credits | _scalars,
            "kind": st.sampled_from(["grant", "purchase", "bonus", "refund", "debit", "GRANT"]) | _scalars,
            "note": _texts | _scalars,
            "extra": _scalars,
        },
    ),
    idempotency=st.none() | _header_values | st.sampled_from([b"k" * 200, b"k" * 201, "é".encode()]),
    own_account=st.booleans(),
    other=_path_params,
)
def test_a_fuzzed_grant_is_applied_or_refused_for_nothing(
    running: Running, payload: dict[str, Any], idempotency: bytes | None, own_account: bool, other: str
) -> None:
    account = running.admin("POST", "/accounts", {})["id"]
    target = account if own_account else other
    headers: dict[str, str | bytes] = {
        "Authorization": f"Bearer {ADMIN_TOKEN}",
        "Content-Type": "application/json",
    }
    if idempotency is not None:
        headers["Idempotency-Key"] = idempotency
    status, _, answer = running.call(
        "POST", f"/admin/accounts/{target}/grants", json.dumps(payload).encode(), headers
    )
    assert status < 500, (status, answer[:300])
    balance, held = running.money(account)
    assert held == 0
    if status >= 400:
        assert_error_shape(answer)
        assert balance == 0
    else:
        assert status == 200
        granted = json.loads(answer)
        assert own_account
        assert balance == granted["amount"] == granted["balance"] > 0


@settings(FUZZ, max_examples=150)
@given(
    body=_trees.map(lambda tree: json.dumps(tree).encode())
    | st.fixed_dictionaries({"id": _texts | _scalars}).map(lambda d: json.dumps(d).encode())
    | st.binary(max_size=50),
    param=_path_params,
    method_path=st.sampled_from(
        [
            ("GET", "/accounts/{}"),
            ("POST", "/accounts/{}/keys"),
            ("DELETE", "/keys/{}"),
            ("POST", "/accounts/{}/grants"),
        ]
    ),
)
def test_fuzzed_admin_bodies_and_path_parameters_are_never_a_5xx(
    running: Running, body: bytes, param: str, method_path: tuple[str, str]
) -> None:
    auth = {"Authorization": f"Bearer {ADMIN_TOKEN}", "Content-Type": "application/json"}
    before = running.account_count()
    status, _, answer = running.call("POST", "/admin/accounts", body, dict(auth))
    assert status < 500, (status, answer[:300])
    if status == 201:
        created = json.loads(answer)["id"]
        assert ACCOUNT_ID.match(created)
        assert running.account_count() == before + 1
    else:
        assert_error_shape(answer)
        assert running.account_count() == before
    method, path = method_path
    status, _, answer = running.call(
        method, "/admin" + path.format(param), b'{"amount": 1}', dict(auth, **{"Idempotency-Key": "k"})
    )
    assert status < 500, (status, answer[:300])
    if status >= 400:
        assert_error_shape(answer)


# ---- the settings loader ---------------------------------------------------------------------------------

_FIELDS = sorted(Settings.__struct_fields__)
_setting_values = (
    st.text(max_size=20)
    | _credits
    | st.sampled_from(
        ["0", "-1", "1e3", "80.0", "true", "no", "redis+cluster://h:1,[::1", "tcp://1.2.3.4:80"]
    )
    | _trees.map(json.dumps)
    | st.just("[" * 3000 + "]" * 3000)
)


@st.composite
def _price_tables(draw: st.DrawFn) -> str:
    model = {
        name: draw(_credits | _scalars)
        for name in ("prompt", "completion", "cached_prompt", "request_fee", "max_output_tokens", "aliases")
        if draw(st.booleans())
    }
    return json.dumps({draw(st.sampled_from(["m", "gpt-4o", ""])): model})


def _named(err: ConfigError, given_names: set[str]) -> None:
    assert err.message
    assert err.param
    root = err.param.split(".")[0]
    known = root in Settings.__struct_fields__ or root == "config" or err.param in given_names
    assert known or f"`{err.param}`" in err.message, err.param  # an unknown key in a file, named
    assert root.lower() in err.message.lower(), (err.param, err.message)


@settings(FUZZ, max_examples=400)
@given(
    env=st.dictionaries(
        st.sampled_from(_FIELDS).map(lambda f: "CREDITGATE_" + f.upper())
        | st.sampled_from(["CREDITGATE_NOPE"]),
        _setting_values,
        max_size=4,
    ),
    prices=st.none() | _price_tables(),
    multiplier=st.none() | _credits,
)
def test_any_environment_gives_settings_or_a_named_config_error(
    env: dict[str, str], prices: str | None, multiplier: str | None
) -> None:
    env.pop("CREDITGATE_CONFIG", None)
    if prices is not None:
        env["CREDITGATE_MODELS"] = prices
    if multiplier is not None:
        env["CREDITGATE_POOLED_MULTIPLIER"] = multiplier
    try:
        load_settings(environ=env)
    except ConfigError as err:
        _named(err, set(env))


@settings(FUZZ, max_examples=200)
@given(
    content=st.dictionaries(st.sampled_from(_FIELDS) | st.text(max_size=6), _trees, max_size=4).map(
        lambda d: yaml.safe_dump(d).encode()
    )
    | _trees.map(lambda t: yaml.safe_dump(t).encode())
    | st.binary(max_size=100)
    | st.text(max_size=100).map(str.encode)
    | st.just(b"[" * 5000 + b"]" * 5000)
)
def test_any_config_file_gives_settings_or_a_named_config_error(content: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "creditgate.yaml")
        with open(path, "wb") as file:
            file.write(content)
        try:
            load_settings(path, environ={})
        except ConfigError as err:
            _named(err, set())


# ---- the bugs the fuzzers found, as their shrunk examples ---------------------------------------------


def test_admin_input_postgres_cannot_store_is_a_4xx_not_a_5xx(running: Running) -> None:
    """Each was a 5xx (a 500, or Postgres' refusal as a 503) or, for the id, an account created."""
    account = running.admin("POST", "/accounts", {})["id"]
    auth: dict[str, str | bytes] = {
        "Authorization": f"Bearer {ADMIN_TOKEN}",
        "Content-Type": "application/json",
    }
    grants = f"/admin/accounts/{account}/grants"
    cases: list[tuple[str, str, bytes, dict[str, str | bytes], int, str]] = [
        # decimal.Overflow from Decimal("1e999999") * MICRO: was a 500
        ("POST", grants, b'{"credits": "1e999999"}', {"Idempotency-Key": "k"}, 400, "credits"),
        # a NUL in the note: Postgres refused the row, a 503
        ("POST", grants, b'{"amount": 1, "note": "\\u0000"}', {"Idempotency-Key": "k"}, 400, "note"),
        # an Idempotency-Key that is not UTF-8 (it arrives with surrogates): not encodable, a 5xx
        ("POST", grants, b'{"amount": 1}', {"Idempotency-Key": b"\xff"}, 400, "Idempotency-Key"),
        # a NUL in a path parameter: a 503 from Postgres
        ("POST", "/admin/accounts/%00/keys", b"", {}, 404, "account"),
        ("POST", "/admin/accounts/%00/grants", b'{"amount": 1}', {"Idempotency-Key": "k"}, 404, "account"),
        ("DELETE", "/admin/keys/%00", b"", {}, 404, "key_id"),
        # `$` let a trailing newline into an account id: the account was created
        ("POST", "/admin/accounts", b'{"id": "a\\n"}', {}, 400, "id"),
    ]
    before = running.account_count()
    for method, path, body, headers, status, param in cases:
        got, _, answer = running.call(method, path, body, {**auth, **headers})
        assert (got, assert_error_shape(answer)["param"]) == (status, param), (path, body, answer)
    assert running.money(account) == (0, 0)
    assert running.account_count() == before


@pytest.mark.parametrize(
    ("content", "setting"),
    [
        (b"port: 1\n\xff: x\n", "config"),  # not UTF-8: was a UnicodeDecodeError
        (b"[" * 5000 + b"]" * 5000, "config"),  # nested too deeply: was a RecursionError
    ],
)
def test_an_unreadable_config_file_is_a_config_error(tmp_path: Any, content: bytes, setting: str) -> None:
    path = tmp_path / "creditgate.yaml"
    path.write_bytes(content)
    with pytest.raises(ConfigError) as raised:
        load_settings(str(path), environ={})
    assert raised.value.param == setting
    with pytest.raises(ConfigError, match="Cannot read config file"):
        load_settings(str(tmp_path / "a\x00b"), environ={})  # was a ValueError (embedded null byte)


@pytest.mark.parametrize(
    ("env", "setting"),
    [
        (
            {"CREDITGATE_FORWARD_REQUEST_HEADERS": "[" * 3000 + "]" * 3000},
            "CREDITGATE_FORWARD_REQUEST_HEADERS",
        ),
        ({"CREDITGATE_MODELS": "[" * 3000}, "CREDITGATE_MODELS"),
        # A Fraction of 10**99999999: the loader ran for minutes (a price too, and the lcm of the scales).
        ({"CREDITGATE_POOLED_MULTIPLIER": "1e99999999"}, "pooled_multiplier"),
        ({"CREDITGATE_MODELS": '{"m": {"prompt": "1e-99999999"}}'}, "models.m.prompt"),
        ({"CREDITGATE_MODELS": '{"m": {"prompt": "1000000000.5"}}'}, "models.m.prompt"),
        ({"CREDITGATE_MODELS": '{"m": {"prompt": "0.0000000000000000001"}}'}, "models.m.prompt"),
    ],
)
def test_an_environment_the_loader_choked_on_is_a_named_config_error(
    env: dict[str, str], setting: str
) -> None:
    with pytest.raises(ConfigError) as raised:
        load_settings(environ=env)
    assert raised.value.param == setting
    assert setting in raised.value.message


def test_the_decimal_bounds_keep_every_real_price() -> None:
    prices = {
        "prompt": "0.000000000000000001",
        "completion": "1000000000",
        "request_fee": "1.50000000000000000000",
    }
    load_settings(
        environ={"CREDITGATE_MODELS": json.dumps({"m": prices}), "CREDITGATE_POOLED_MULTIPLIER": "1e2"}
    )
