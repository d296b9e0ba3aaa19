"""Talking to the provider: the upstream table and the client session (header rules: headers.py)."""

from __future__ import annotations

from dataclasses import dataclass

import aiohttp

from .config import Settings
from .headers import HeaderNames


@dataclass(frozen=True, slots=True)
class Upstream:
    name: str
    base_url: str  # without the trailing slash, e.g. https://api.openai.com/v1
    api_key: str | None
    organization: str | None = None  # sent as OpenAI-Organization on pooled calls
    project: str | None = None  # sent as OpenAI-Project on pooled calls
    provider: str = ""  # whose API it is, for the vault's keys; "" reads as the upstream's name

    @property
    def vault_provider(self) -> str:
        return self.provider or self.name

    @property
    def secrets(self) -> tuple[str, ...]:
        """What a pooled error body must never show a client."""
        return tuple(v for v in (self.api_key, self.organization, self.project) if v)


def upstreams_from(settings: Settings, demo_url: str | None = None) -> dict[str, Upstream]:
    table = {
        name: Upstream(
            name,
            conf.base_url.rstrip("/"),
            conf.key(),
            conf.organization,
            conf.project,
            conf.provider or name,
        )
        for name, conf in settings.upstream_table().items()
    }
    if demo_url is not None:
        table["default"] = Upstream("default", demo_url.rstrip("/"), "demo-provider-key")
    return table


def forwarded_extra(settings: Settings) -> HeaderNames:
    """The operator's extra forwarded headers; with the built-in demo upstream, its x-demo-* steering."""
    demo = ["x-demo-*"] if settings.demo_upstream else []
    return HeaderNames.of([*settings.forward_request_headers, *demo])


def create_session(settings: Settings) -> aiohttp.ClientSession:
    connector = aiohttp.TCPConnector(
        limit=settings.upstream_max_connections, ttl_dns_cache=300, enable_cleanup_closed=True
    )
    timeout = aiohttp.ClientTimeout(
        total=None,
        sock_connect=settings.upstream_connect_timeout_seconds,
        sock_read=settings.upstream_read_timeout_seconds,
    )
    # Upstream bodies are asked for uncompressed; one that is compressed anyway is decoded (and relayed
    # without its content-encoding), so usage can always be read.
    return aiohttp.ClientSession(connector=connector, timeout=timeout, skip_auto_headers=("User-Agent",))
