"""Metrics: a scripted mix of requests, then the values /metrics reports for it (not just the names)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from prometheus_client.parser import text_string_to_metric_families

from sidecar.app import FLUSHER, create_app
from sidecar.metrics import Metrics
from sidecar.observe import RequestRecord
from sidecar.pricing import Usage

from .conftest import Sidecar, SidecarFactory, Upstream, make_settings
from .support import HELLO, MODELS, Samples, hold_for, pooled, post, scrape, settled, value
from .support_faults import RedisFaultProxy, fault_proxy


def chat(max_tokens: int, model: str = "test-model", **extra: object) -> dict[str, object]:
    return {"model": model, "messages": HELLO, "max_tokens": max_tokens, **extra}


async def test_scripted_mix_gives_exact_metric_values(make_sidecar: SidecarFactory) -> None:
    sc = await make_sidecar(models=MODELS, reconcile_interval_seconds=0)
    account, key = await sc.account(10_000_000)
    _, poor_key = await sc.account(1000)

    # 1. success, with 2 cached prompt tokens: 3 x 1000 + 2 x 500 + 10 x 2000
    ok = chat(10)
    resp = await post(sc, "/v1/chat/completions", ok, key, **{"x-demo-cached-tokens": "2"})
    assert resp.status == 200
    assert int(resp.headers["x-creditgate-charged"]) == pooled(24_000)
    h1 = hold_for(msgspec.json.encode(ok), limit=10)

    # 2. a stream, by the model's alias (labelled with the model's name)
    streamed = chat(10, model="tm", stream=True)
    resp = await post(sc, "/v1/chat/completions", streamed, key)
    assert resp.status == 200
    assert (await resp.read()).endswith(b"data: [DONE]\n\n")
    h2 = int(resp.headers["x-creditgate-held"])
    assert h2 == hold_for(msgspec.json.encode(streamed), limit=10)

    # 3. the upstream fails: nothing charged, the hold released
    resp = await post(sc, "/v1/chat/completions", ok, key, **{"x-demo-status": "500"})
    assert resp.status == 500

    # 4. an overdraft: 50 tokens against a limit of 1
    over = chat(1)
    resp = await post(
        sc, "/v1/chat/completions", over, key, **{"x-demo-tokens": "50", "x-demo-ignore-limit": "1"}
    )
    assert int(resp.headers["x-creditgate-charged"]) == pooled(5_000 + 100_000)
    h4 = hold_for(msgspec.json.encode(over), limit=1)
    assert h4 < pooled(105_000)

    # 5. 402, 6. a bad key, 7. an unpriced model
    assert (await post(sc, "/v1/chat/completions", ok, poor_key)).status == 402
    assert (await post(sc, "/v1/chat/completions", ok, "cgk-nope")).status == 401
    assert (await post(sc, "/v1/chat/completions", chat(10, model="gpt-9"), key)).status == 400

    # 8. embeddings (3 prompt tokens at 100), 9. the models list
    embed = {"model": "test-embed", "input": "a b c"}
    resp = await post(sc, "/v1/embeddings", embed, key)
    assert int(resp.headers["x-creditgate-charged"]) == pooled(300)
    h8 = pooled(len(msgspec.json.encode(embed)) * 100)  # every body byte a token, at 100 each
    resp = await sc.client.get("/v1/models", headers={"Authorization": f"Bearer {key}"})
    assert resp.status == 200

    # 10. a deterministic request twice: a miss (charged), then a cache hit (free; what it saved counted)
    deterministic = chat(10, temperature=0)
    resp = await post(sc, "/v1/chat/completions", deterministic, key)
    assert (resp.headers["X-Cache"], int(resp.headers["x-creditgate-charged"])) == ("MISS", pooled(25_000))
    resp = await post(sc, "/v1/chat/completions", deterministic, key)
    assert (resp.headers["X-Cache"], int(resp.headers["x-creditgate-charged"])) == ("HIT", 0)
    h10 = hold_for(msgspec.json.encode(deterministic), limit=10)

    await settled(sc)
    # Debits 1, 2, 4, 8 and 10's miss, and the hit's zero-charge row, reach the ledger.
    await sc.client.app[FLUSHER].wait_for_rows(6)
    m = await scrape(sc)

    charged_chat = pooled(24_000) + pooled(25_000) + pooled(105_000) + pooled(25_000)
    balance = (await sc.balance(account))["balance"]
    assert 10_000_000 - balance == charged_chat + pooled(300)

    req = "creditgate_requests_total"
    chat_model = {"route": "chat", "model": "test-model"}
    # Requests that are not deterministic bypass the cache; ones that fail before they are read: "off".
    assert value(m, req, **chat_model, status_class="2xx", cache="bypass") == 3
    assert value(m, req, **chat_model, status_class="5xx", cache="bypass") == 1
    assert value(m, req, **chat_model, status_class="4xx", cache="bypass") == 1  # the 402
    assert value(m, req, **chat_model, status_class="2xx", cache="miss") == 1
    assert value(m, req, **chat_model, status_class="2xx", cache="hit") == 1
    assert value(m, req, route="chat", model="other", status_class="4xx", cache="off") == 2
    assert value(m, req, route="embeddings", model="test-embed", status_class="2xx", cache="miss") == 1
    assert value(m, req, route="models", model="other", status_class="2xx", cache="off") == 1

    assert value(m, "creditgate_held_microcredits_total", **chat_model) == h1 + h2 + h1 + h4 + h10
    assert value(m, "creditgate_charged_microcredits_total", **chat_model) == charged_chat
    released = (h1 - pooled(24_000)) + (h2 - pooled(25_000)) + h1 + (h10 - pooled(25_000))
    assert value(m, "creditgate_released_microcredits_total", **chat_model) == released  # none from 4
    embed_model = {"route": "embeddings", "model": "test-embed"}
    assert value(m, "creditgate_held_microcredits_total", **embed_model) == h8
    assert value(m, "creditgate_charged_microcredits_total", **embed_model) == pooled(300)
    assert value(m, "creditgate_cache_saved_microcredits_total", **chat_model) == pooled(25_000)
    assert value(m, "creditgate_overdrafts_total", **chat_model) == 1
    assert value(m, "creditgate_payment_required_total", route="chat", reason="insufficient_credits") == 1

    tokens = "creditgate_tokens_total"  # what the upstream processed: the cache hit adds none
    assert value(m, tokens, **chat_model, type="prompt") == 3 + 5 + 5 + 5
    assert value(m, tokens, **chat_model, type="cached_prompt") == 2
    assert value(m, tokens, **chat_model, type="completion") == 10 + 10 + 50 + 10
    assert value(m, tokens, **embed_model, type="prompt") == 3

    assert value(m, "creditgate_request_duration_seconds_count", route="chat") == 9
    assert value(m, "creditgate_overhead_seconds_count", route="chat") == 9
    assert value(m, "creditgate_request_duration_seconds_count", route="models") == 1
    assert value(m, "creditgate_upstream_duration_seconds_count", **chat_model) == 5
    assert value(m, "creditgate_upstream_first_byte_seconds_count", **chat_model) == 5
    assert value(m, "creditgate_upstream_duration_seconds_count", **embed_model) == 1
    # the overhead never exceeds the whole request time
    assert value(m, "creditgate_overhead_seconds_sum", route="chat") <= value(
        m, "creditgate_request_duration_seconds_sum", route="chat"
    )

    script = "creditgate_redis_script_duration_seconds_count"
    assert value(m, script, script="reserve") == 5  # 1-4 and the 402
    assert value(m, script, script="lookup_reserve") == 3  # the cacheable ones: 8 and both of 10
    assert value(m, script, script="settle") == 7
    assert value(m, script, script="credit") == 2  # the two grants

    assert value(m, "creditgate_holds_active") == 0
    assert value(m, "creditgate_ledger_rows_written_total") == 6
    assert value(m, "creditgate_flush_batch_rows_sum") == 6
    assert value(m, "creditgate_flush_duration_seconds_count") == value(
        m, "creditgate_flush_batch_rows_count"
    )
    assert value(m, "creditgate_flush_failures_total") == 0
    assert value(m, "creditgate_outbox_backlog_entries") == 0
    assert value(m, "creditgate_outbox_oldest_age_seconds") == 0
    assert value(m, "creditgate_ledger_drift_accounts") == 0
    build = [k for k in m if k[0] == "creditgate_build_info"]
    assert len(build) == 1
    assert dict(build[0][1])["version"] == "0.1.0"
    assert m[build[0]] == 1


async def test_held_streams_are_active_holds(make_sidecar: SidecarFactory) -> None:
    sc = await make_sidecar(models=MODELS)
    _, key = await sc.account(10_000_000)
    resp = await post(
        sc, "/v1/chat/completions", chat(10, stream=True), key, **{"x-demo-token-delay-ms": "20"}
    )
    await resp.content.readany()  # the stream has started: its hold is live
    assert value(await scrape(sc), "creditgate_holds_active") == 1
    await resp.read()
    await settled(sc)
    assert value(await scrape(sc), "creditgate_holds_active") == 0


def test_each_app_has_its_own_registry() -> None:
    one, two = Metrics(), Metrics()
    one.requests.labels("chat", "m", "2xx", "off").inc()
    assert b'creditgate_requests_total{cache="off",model="m",route="chat",status_class="2xx"} 1.0' in (
        one.render()
    )
    assert b"creditgate_requests_total{" not in two.render()


def test_exposed_metrics_are_exactly_the_dashboard_contract() -> None:
    """helm/creditgate/dashboards/metrics.txt is what the dashboard is built on: same names, types, labels."""
    contract: dict[str, tuple[str, frozenset[str]]] = {}
    for line in (
        (Path(__file__).parent.parent / "helm/creditgate/dashboards/metrics.txt").read_text().splitlines()
    ):
        if line.strip() and not line.startswith("#"):
            name, kind, labels = line.split()
            contract[name] = (kind, frozenset() if labels == "-" else frozenset(labels.split(",")))
    metrics = Metrics()
    for charge in (3, 7):  # a release, then an overdraft
        rec = RequestRecord("chat", 0.0, model="m", status=402, error_code="insufficient_credits", hold=5)
        rec.usage, rec.settled, rec.charge, rec.saved, rec.ended = Usage(3, 2, 1), True, charge, 1, 1.0
        rec.upstream_started, rec.upstream_first_byte, rec.upstream_ended = 0.1, 0.2, 0.9
        metrics.observe_request(rec)
    missing = RequestRecord("chat", 0.0, model="m", status=200, hold=5)
    missing.outcome, missing.ended = "no_usage_estimated", 1.0
    metrics.observe_request(missing)
    metrics.observe_script("reserve", 1000)
    metrics.observe_flush(10, 0.01)
    exposed: dict[str, tuple[str, frozenset[str]]] = {}
    for family in text_string_to_metric_families(metrics.render().decode()):
        name = family.name + ("_total" if family.type == "counter" else "")
        names = {k for s in family.samples for k in s.labels} - {"le"}
        exposed[name] = (family.type, frozenset(names))
    assert exposed == contract


def _samples(metrics: Metrics) -> Samples:
    samples: Samples = {}
    for family in text_string_to_metric_families(metrics.render().decode()):
        for s in family.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return samples


def test_repeated_label_sets_count_into_their_own_series_and_unused_series_stay_absent() -> None:
    """observe_request binds each series once and reuses it: several models on one route, and routes
    sharing a model, still count apart, and a series appears only once something was recorded in it."""
    metrics = Metrics()
    for _ in range(2):  # each record twice: the second time through the reused children
        a = RequestRecord("chat", 0.0, model="a", status=200, cache="miss", hold=10)
        a.usage, a.settled, a.charge, a.ended = Usage(5, 3, 2), True, 4, 1.0
        a.upstream_started, a.upstream_first_byte, a.upstream_ended = 0.25, 0.5, 0.75
        metrics.observe_request(a)
        b = RequestRecord("chat", 0.0, model="b", status=200, cache="hit", saved=7)
        b.ended = 0.5
        metrics.observe_request(b)
        e = RequestRecord("embeddings", 0.0, model="a", status=402, error_code="insufficient_credits")
        e.ended = 0.25
        metrics.observe_request(e)
    m = _samples(metrics)
    chat_a, chat_b = {"route": "chat", "model": "a"}, {"route": "chat", "model": "b"}
    req = "creditgate_requests_total"
    assert value(m, req, **chat_a, status_class="2xx", cache="miss") == 2
    assert value(m, req, **chat_b, status_class="2xx", cache="hit") == 2
    assert value(m, req, route="embeddings", model="a", status_class="4xx", cache="off") == 2
    assert value(m, "creditgate_held_microcredits_total", **chat_a) == 20
    assert value(m, "creditgate_charged_microcredits_total", **chat_a) == 8
    assert value(m, "creditgate_released_microcredits_total", **chat_a) == 12
    assert value(m, "creditgate_cache_saved_microcredits_total", **chat_b) == 14
    assert value(m, "creditgate_tokens_total", **chat_a, type="prompt") == 6
    assert value(m, "creditgate_tokens_total", **chat_a, type="cached_prompt") == 4
    assert value(m, "creditgate_tokens_total", **chat_a, type="completion") == 6
    assert (
        value(m, "creditgate_payment_required_total", route="embeddings", reason="insufficient_credits") == 2
    )
    assert value(m, "creditgate_request_duration_seconds_count", route="chat") == 4
    assert value(m, "creditgate_request_duration_seconds_sum", route="chat") == 3.0
    assert value(m, "creditgate_upstream_duration_seconds_sum", **chat_a) == 1.0
    assert value(m, "creditgate_upstream_first_byte_seconds_sum", **chat_a) == 0.5
    assert value(m, "creditgate_request_duration_seconds_count", route="embeddings") == 2
    # Only what was recorded: no money, token or upstream series for b or for embeddings, no overdrafts.
    present = {(name, dict(labels).get("route"), dict(labels).get("model")) for name, labels in m}
    for name in (
        "creditgate_held_microcredits_total",
        "creditgate_charged_microcredits_total",
        "creditgate_released_microcredits_total",
        "creditgate_tokens_total",
        "creditgate_upstream_duration_seconds_count",
        "creditgate_upstream_first_byte_seconds_count",
    ):
        assert {(route, model) for n, route, model in present if n == name} == {("chat", "a")}, name
    assert {(route, model) for n, route, model in present if n.startswith("creditgate_cache_saved")} == {
        ("chat", "b")
    }
    assert not any(n == "creditgate_overdrafts_total" for n, _, _ in present)


@pytest.fixture
async def faults(redis_url: str) -> AsyncIterator[RedisFaultProxy]:
    async with fault_proxy(redis_url) as proxy:
        yield proxy


async def test_redis_up_reports_whether_redis_answered_the_scrape(
    faults: RedisFaultProxy, database_url: str, upstream: Upstream, aiohttp_client: Any
) -> None:
    """creditgate_redis_up (what the Redis-unavailable alert reads): each scrape reads the outbox backlog
    from Redis; 1 when Redis answered it, 0 when it did not answer within the scrape's timeout (a real
    Redis behind a proxy that holds every reply back), 1 again once Redis answers."""
    settings = make_settings(
        faults.url, database_url, upstream_url=upstream.url, models=MODELS, reconcile_interval_seconds=0
    )
    sc = Sidecar(await aiohttp_client(create_app(settings)), settings)
    up: tuple[str, frozenset[tuple[str, str]]] = ("creditgate_redis_up", frozenset())
    assert (await scrape(sc))[up] == 1
    faults.hold_replies()
    try:
        assert (await scrape(sc))[up] == 0
    finally:
        faults.release_replies()
    assert (await scrape(sc))[up] == 1
