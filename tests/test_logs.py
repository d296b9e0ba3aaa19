"""Log lines: JSON (or text) shape, the one request line per request, and redaction."""

from __future__ import annotations

import json
import logging
import sys

import msgspec
import pytest

from sidecar.logs import REDACTED, JsonFormatter, Redactor, TextFormatter, formatter, secrets_of

from .conftest import ADMIN_TOKEN, PROVIDER_KEY, Sidecar, SidecarFactory, make_settings
from .support import HELLO, MODELS, post, record, settled


def test_redactor_removes_configured_secrets_and_key_patterns() -> None:
    redact = Redactor(["s3cret-admin-token", "sk-configured-provider-key"])
    text = (
        "admin s3cret-admin-token; pooled sk-configured-provider-key; client cgk-AbC_12-xyz; "
        "provider said: Incorrect API key provided: sk-ab***yz. header Authorization: Bearer tok.en-1; "
        "redis://user:hunter22@host:6379/0 and postgresql://postgres@db/x; task-runner sk-abc"
    )
    out = redact(text)
    for gone in ("s3cret", "configured-provider", "AbC_12", "sk-ab***yz", "tok.en-1", "hunter22"):
        assert gone not in out
    # what is not secret is left alone: user names, hosts, words that merely contain "sk-"
    assert "postgresql://postgres@db/x" in out
    assert "redis://[redacted]@host:6379/0" in out
    assert "task-runner sk-abc" in out
    assert out.count(REDACTED) == 6


def test_secrets_of_settings() -> None:
    settings = make_settings(
        "redis://:redis-pass-123@127.0.0.1:6379/0",
        "postgresql://app:pg-pass-456@127.0.0.1/db",
        upstreams={"other": {"base_url": "http://x/v1", "api_key": "other-provider-key"}},
    )
    assert set(secrets_of(settings)) >= {
        ADMIN_TOKEN,
        PROVIDER_KEY,
        "other-provider-key",
        "redis-pass-123",
        "pg-pass-456",
    }


def test_query_parameter_passwords_are_secrets_and_redacted() -> None:
    """libpq and redis-py take the password as a query parameter too; the DEBUG settings line used to
    print it in clear."""
    settings = make_settings(
        "redis://127.0.0.1:6379/0?password=redis-query-pass",
        "postgresql://app@127.0.0.1/db?sslmode=disable&password=pg-query-pass&application_name=cg",
    )
    assert {"redis-query-pass", "pg-query-pass"} <= set(secrets_of(settings))
    line = formatter(settings).format(
        record("settings in effect: %s", msgspec.json.encode(settings).decode())
    )
    assert "redis-query-pass" not in line
    assert "pg-query-pass" not in line
    assert "application_name=cg" in line
    # By pattern as well, for URLs the settings do not hold.
    out = Redactor()("dsn postgresql://h/db?PASSWORD=other-pass&x=1 and redis://h/0?sslpassword=tls-pass")
    assert "other-pass" not in out
    assert "tls-pass" not in out
    assert "&x=1" in out


def test_json_lines_carry_extras_and_redacted_exceptions() -> None:
    fmt = JsonFormatter(Redactor(["the-admin-token"]))
    line = json.loads(fmt.format(record("token %s here", "the-admin-token", account="acme", tokens=3)))
    assert line["level"] == "WARNING"
    assert line["logger"] == "creditgate.test"
    assert line["msg"] == f"token {REDACTED} here"
    assert (line["account"], line["tokens"]) == ("acme", 3)
    assert line["ts"].endswith("Z")
    try:
        raise RuntimeError("failed with cgk-leakedkey123")
    except RuntimeError:
        rec = record("boom")
        rec.exc_info = sys.exc_info()
    line = json.loads(fmt.format(rec))
    assert "RuntimeError" in line["exc"]
    assert "leakedkey123" not in line["exc"]
    nested = fmt.format(record("headers", headers={"Authorization": "Bearer the-admin-token"}))
    assert "the-admin-token" not in nested
    assert json.loads(nested)["headers"] == {"Authorization": REDACTED}
    text = TextFormatter(Redactor())
    assert text.format(record("hello", account="acme")).endswith("creditgate.test hello account=acme")


def test_log_format_setting_picks_the_formatter() -> None:
    assert isinstance(formatter(make_settings("redis://r", "postgresql://x/y")), JsonFormatter)
    text = make_settings("redis://r", "postgresql://x/y", log_format="text")
    assert isinstance(formatter(text), TextFormatter)


def request_lines(caplog: pytest.LogCaptureFixture) -> list[dict[str, object]]:
    fmt = JsonFormatter(Redactor())
    return [json.loads(fmt.format(r)) for r in caplog.records if r.name == "creditgate.request"]


async def test_one_request_line_per_request(
    make_sidecar: SidecarFactory, caplog: pytest.LogCaptureFixture
) -> None:
    sc: Sidecar = await make_sidecar(models=MODELS)
    account, key = await sc.account(1_000_000)
    caplog.set_level(logging.INFO, logger="creditgate.request")
    body = {"model": "tm", "messages": HELLO, "max_tokens": 10}
    resp = await post(sc, "/v1/chat/completions", body, key, **{"x-demo-cached-tokens": "1"})
    assert resp.status == 200
    streamed = await post(sc, "/v1/chat/completions", {**body, "stream": True}, key)
    await streamed.read()
    await settled(sc)
    bad = await post(sc, "/v1/chat/completions", body, "cgk-wrong")
    assert bad.status == 401
    lines = request_lines(caplog)
    assert len(lines) == 3
    ok, stream, unauthorized = lines
    assert ok["request_id"] == resp.headers["x-request-id"]
    assert {k: ok[k] for k in ("account", "route", "model", "status", "cache", "stream", "outcome")} == {
        "account": account,
        "route": "chat",
        "model": "test-model",
        "status": 200,
        "cache": "bypass",
        "stream": False,
        "outcome": "ok",
    }
    assert (ok["prompt_tokens"], ok["cached_tokens"], ok["completion_tokens"]) == (5, 1, 10)
    assert ok["charge"] == int(resp.headers["x-creditgate-charged"])
    assert isinstance(ok["hold"], int)
    assert ok["hold"] >= ok["charge"]
    for field in ("duration_ms", "upstream_ms", "first_byte_ms", "overhead_ms"):
        assert isinstance(ok[field], float), field
    assert stream["request_id"] == streamed.headers["x-request-id"]
    assert stream["stream"] is True
    assert stream["hold"] == int(streamed.headers["x-creditgate-held"])
    assert (unauthorized["status"], unauthorized["account"], unauthorized["model"]) == (401, None, "other")
    assert unauthorized["error_code"] == "invalid_api_key"
    assert unauthorized["upstream_ms"] is None


async def test_log_requests_off(make_sidecar: SidecarFactory, caplog: pytest.LogCaptureFixture) -> None:
    sc = await make_sidecar(models=MODELS, log_requests=False)
    _, key = await sc.account(1_000_000)
    caplog.set_level(logging.INFO, logger="creditgate.request")
    resp = await sc.client.post(
        "/v1/chat/completions",
        data=msgspec.json.encode({"model": "tm", "messages": HELLO}),
        headers={"Authorization": f"Bearer {key}"},
    )
    assert resp.status == 200
    assert request_lines(caplog) == []
