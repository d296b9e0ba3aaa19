"""The BYOK vault's scene: a sidecar with two recording fake upstreams (`default`, its provider its own
name, and `east`, whose provider is `acme`), a master key, and helpers to store keys and call models."""

from __future__ import annotations

import base64
import os
from collections.abc import AsyncIterator
from typing import Any

import msgspec
import pytest
from multidict import CIMultiDictProxy

from .conftest import PROVIDER_KEY, Sidecar, SidecarFactory
from .support_fake_provider import Fake, start_fake

START = 10_000_000
EAST_POOL_KEY = "sk-pool-key-of-east-upstream"
# Customer keys in no provider's shape: the log's patterns (sk-…) would not hide them; never logging does.
VAULT_KEY = "AIzaCustomerVaultKey0123456789abcdefWXYZ"
INLINE_KEY = "AIzaCustomerInlineKey9876543210fedcbaQRST"
POOLED_CHARGE = 11_250  # 5 prompt and 2 completion tokens of the fake at 1 and 2 credits per 1K, x 1.25
BYOK_CHARGE = 9_000  # the same at the BYOK multiplier (1)


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


MASTER = b64(os.urandom(32))
NEW_MASTER = b64(os.urandom(32))
MODELS = {
    "gpt-4o-mini": {"prompt": "1", "completion": "2", "max_output_tokens": 100},
    "acme-model": {"prompt": "1", "completion": "2", "max_output_tokens": 100, "upstream": "east"},
}


@pytest.fixture
async def fake() -> AsyncIterator[Fake]:
    f = await start_fake()
    yield f
    await f.server.close()


@pytest.fixture
async def east() -> AsyncIterator[Fake]:
    f = await start_fake()
    yield f
    await f.server.close()


async def vault_sidecar(make_sidecar: SidecarFactory, fake: Fake, east: Fake, **overrides: Any) -> Sidecar:
    upstreams = {
        "default": {"base_url": fake.url, "api_key": PROVIDER_KEY},
        "east": {"base_url": east.url, "api_key": EAST_POOL_KEY, "provider": "acme"},
    }
    settings: dict[str, Any] = {
        "upstream_url": None,
        "upstreams": upstreams,
        "models": MODELS,
        "vault_master_key": MASTER,
        "cache_enabled": False,  # every call reaches the fakes
        **overrides,
    }
    return await make_sidecar(**settings)


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def store_key(sc: Sidecar, api_key: str, provider: str, key: str, label: str | None = None) -> Any:
    resp = await sc.client.post(
        "/v1/account/llm-keys",
        json={"provider": provider, "key": key, "label": label},
        headers=bearer(api_key),
    )
    body = await resp.json()
    assert resp.status in (200, 201), body
    return body


async def chat(
    sc: Sidecar, api_key: str, model: str = "gpt-4o-mini", **headers: str
) -> tuple[int, CIMultiDictProxy[str], bytes]:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
    resp = await sc.client.post(
        "/v1/chat/completions", data=msgspec.json.encode(body), headers={**bearer(api_key), **headers}
    )
    async with resp:
        return resp.status, resp.headers, await resp.read()


def sent_key(fake: Fake) -> str:
    """The provider key the fake saw on its last request."""
    return fake.seen[-1]["Authorization"].removeprefix("Bearer ")
