"""What a new user hits first: the models list is the gateway's own price table."""

from __future__ import annotations

from typing import Any

import pytest

from .conftest import Sidecar, SidecarFactory, Upstream

MODELS: dict[str, Any] = {
    "test-model": {"prompt": "1", "completion": "1", "aliases": ["test-alias"]},
    "test-embed": {"prompt": "1"},
}


@pytest.fixture
async def priced(make_sidecar: SidecarFactory) -> Sidecar:
    return await make_sidecar(models=MODELS)


def model(name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": 0, "owned_by": "default"}


async def test_models_lists_the_priced_models_and_aliases_without_calling_upstream(
    priced: Sidecar, upstream: Upstream
) -> None:
    account, key = await priced.account(0)
    auth = {"Authorization": f"Bearer {key}"}
    resp = await priced.client.get("/v1/models", headers=auth)
    assert resp.status == 200
    assert await resp.json() == {
        "object": "list",
        "data": [model("test-model"), model("test-embed"), model("test-alias")],
    }
    for name in ("test-model", "test-alias"):
        resp = await priced.client.get(f"/v1/models/{name}", headers=auth)
        assert (resp.status, await resp.json()) == (200, model(name))
    resp = await priced.client.get("/v1/models/gpt-9", headers=auth)
    assert resp.status == 404
    error = (await resp.json())["error"]
    assert (error["code"], error["type"]) == ("model_not_found", "invalid_request_error")
    assert (await priced.client.get("/v1/models")).status == 401
    assert (await priced.client.get("/v1/models/test-model")).status == 401
    assert upstream.calls() == 0
    assert upstream.seen_headers == []
    assert (await priced.balance(account))["balance"] == 0


@pytest.mark.parametrize(
    "path",
    [
        "/v1/models/a/b",
        "/v1/models/test-model/extra",
        "/v1/models/..%2Ffiles",
        "/v1/models/%2e%2e/files",
        "/v1/models/..%2F..%2Fadmin",
        "/v1/models/../files",
        "/v1/models/.",
        "/v1/models/..",
    ],
)
async def test_models_paths_other_than_one_priced_id_are_404_and_reach_nothing(
    priced: Sidecar, upstream: Upstream, path: str
) -> None:
    _, key = await priced.account(0)
    resp = await priced.client.get(path, headers={"Authorization": f"Bearer {key}"}, allow_redirects=False)
    assert resp.status == 404, await resp.text()
    assert "error" in await resp.json()
    assert upstream.calls() == 0
    assert upstream.seen_headers == []
