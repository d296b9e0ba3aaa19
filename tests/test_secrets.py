"""No key material in any log line or error body: a real ``creditgate serve`` at DEBUG, real keys."""

from __future__ import annotations

import secrets
import uuid
from pathlib import Path

import aiohttp
import msgspec

from .conftest import Upstream, clean_env, new_key_prefix, serve_process


def fragments(secret: str, size: int = 8) -> set[str]:
    return {secret[i : i + size] for i in range(len(secret) - size + 1)}


def leaked(text: str, secret: str) -> list[str]:
    return sorted(f for f in fragments(secret) if f in text)


async def test_no_secret_reaches_a_log_line_or_an_error_body(
    redis_url: str, database_url: str, upstream: Upstream, tmp_path: Path
) -> None:
    provider_key = "sk-" + secrets.token_urlsafe(32)
    admin_token = secrets.token_urlsafe(24)
    byok_key = "sk-" + secrets.token_urlsafe(32)
    wrong_admin = secrets.token_urlsafe(24)
    bad_client_key = "cgk-" + secrets.token_urlsafe(32)
    env = clean_env(
        CREDITGATE_REDIS_URL=redis_url,
        CREDITGATE_DATABASE_URL=database_url,
        CREDITGATE_KEY_PREFIX=new_key_prefix(),
        CREDITGATE_PORT="0",
        CREDITGATE_UPSTREAM_URL=upstream.url,
        CREDITGATE_UPSTREAM_API_KEY=provider_key,
        CREDITGATE_FORWARD_REQUEST_HEADERS="x-demo-*",
        CREDITGATE_ADMIN_TOKEN=admin_token,
        CREDITGATE_LOG_LEVEL="DEBUG",
        CREDITGATE_RECONCILE_INTERVAL_SECONDS="0",
    )
    bodies: list[str] = []  # every body a client got, except the one that hands out a new key
    byok_bodies: list[str] = []  # answers about the BYOK caller's own key: may quote that key
    admin = {"Authorization": f"Bearer {admin_token}"}
    chat = msgspec.json.encode(
        {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
    )
    streamed = msgspec.json.encode(
        {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    )

    async with serve_process(env, tmp_path) as (served, url), aiohttp.ClientSession() as session:

        async def call(method: str, path: str, keep: list[str] = bodies, **kwargs: object) -> int:
            async with session.request(method, f"{url}{path}", **kwargs) as resp:  # type: ignore[arg-type]
                keep.append(await resp.text())
                return resp.status

        async def new_key(account: str) -> str:
            async with session.post(f"{url}/admin/accounts/{account}/keys", headers=admin) as resp:
                assert resp.status == 201
                key: str = (await resp.json())["key"]
                return key

        rich, poor = f"rich-{uuid.uuid4().hex[:6]}", f"poor-{uuid.uuid4().hex[:6]}"
        assert await call("POST", "/admin/accounts", json={"id": rich}, headers=admin) == 201
        assert await call("POST", "/admin/accounts", json={"id": poor}, headers=admin) == 201
        grant = {**admin, "Idempotency-Key": "g"}
        assert (
            await call("POST", f"/admin/accounts/{rich}/grants", json={"credits": "5"}, headers=grant) == 200
        )
        key, poor_key = await new_key(rich), await new_key(poor)
        auth = {"Authorization": f"Bearer {key}"}

        assert await call("GET", f"/admin/accounts/{rich}", headers={"Authorization": wrong_admin}) == 401
        wrong = {"Authorization": f"Bearer {wrong_admin}"}
        assert await call("GET", f"/admin/accounts/{rich}", headers=wrong) == 401
        assert await call("POST", "/v1/chat/completions", data=chat, headers=auth) == 200
        assert await call("POST", "/v1/chat/completions", data=streamed, headers=auth) == 200
        poor_auth = {"Authorization": f"Bearer {poor_key}"}
        assert await call("POST", "/v1/chat/completions", data=chat, headers=poor_auth) == 402
        bad = {"Authorization": f"Bearer {bad_client_key}"}
        assert await call("POST", "/v1/chat/completions", data=chat, headers=bad) == 401
        assert await call("POST", "/v1/chat/completions", data=chat, headers={"Authorization": key}) == 401
        assert await call("POST", "/v1/chat/completions", data=b"{", headers=auth) == 400
        # The provider refuses the pooled key and quotes it: the client gets our own 502 instead.
        echo = {**auth, "x-demo-echo-auth": "1"}
        assert await call("POST", "/v1/chat/completions", data=chat, headers=echo) == 502
        assert await call("POST", "/v1/chat/completions", data=streamed, headers=echo) == 502
        assert (
            await call("POST", "/v1/chat/completions", data=chat, headers={**auth, "x-demo-status": "401"})
            == 502
        )
        # A BYOK caller gets the provider's own answer about its own key.
        byok = {**echo, "x-creditgate-provider-key": byok_key}
        assert await call("POST", "/v1/chat/completions", data=chat, headers=byok, keep=byok_bodies) == 401
        assert await call("GET", "/readyz") == 200
        assert await call("GET", "/metrics") == 200
        assert await served.stop() == 0, served.log

    log = served.log
    # The traps were real: the provider saw its key (and quoted it back), and the sidecar logged at DEBUG.
    assert any(h.get("Authorization") == f"Bearer {provider_key}" for h in upstream.seen_headers)
    assert byok_key in byok_bodies[0]
    assert '"level":"DEBUG"' in log
    assert "settings in effect" in log  # every setting, the provider key and admin token among them
    assert log.count('"msg":"request"') >= 10
    assert "upstream_auth_failed" in "".join(bodies)

    every_secret = {
        "provider key": provider_key,
        "admin token": admin_token,
        "client key": key,
        "poor client key": poor_key,
        "bad client key": bad_client_key,
        "wrong admin token": wrong_admin,
        "byok key": byok_key,
    }
    for name, secret in every_secret.items():
        assert leaked(log, secret) == [], f"{name} in the log"
        assert leaked("\n".join(bodies), secret) == [], f"{name} in a response body"
        if secret != byok_key:
            assert leaked("\n".join(byok_bodies), secret) == [], f"{name} in the BYOK answer"
