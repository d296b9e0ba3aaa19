"""Talking to the provider: pure header filters, the upstream table and the client session.

A client's key never reaches an upstream (its Authorization is replaced by the provider key, or by the
caller's own key on BYOK requests) and a provider key never reaches a client (responses carry no
request headers back).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import aiohttp
from multidict import CIMultiDict, CIMultiDictProxy

from .config import Settings

# RFC 9110 §7.6.1 connection-specific headers, plus the framing ones aiohttp sets itself.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
    }
)


@dataclass(frozen=True, slots=True)
class Upstream:
    name: str
    base_url: str  # without the trailing slash, e.g. https://api.openai.com/v1
    api_key: str | None


def upstreams_from(settings: Settings, demo_url: str | None = None) -> dict[str, Upstream]:
    table = {
        name: Upstream(name, conf.base_url.rstrip("/"), conf.key())
        for name, conf in settings.upstream_table().items()
    }
    if demo_url is not None:
        table["default"] = Upstream("default", demo_url.rstrip("/"), "demo-provider-key")
    return table


# What never goes back to a client: hop-by-hop and framing, and the encoding of a body aiohttp decoded.
_NOT_RELAYED = (*HOP_BY_HOP, "content-encoding")


def _without(headers: Mapping[str, str], names: Iterable[str]) -> CIMultiDict[str]:
    """A copy of ``headers`` (order, spelling and repeats kept) minus every header called one of ``names``,
    in any case. Copying in C and deleting the few names present is several times cheaper than filtering
    header by header in Python."""
    kept = CIMultiDict(headers)
    for name in names:
        if name in kept:
            del kept[name]
    return kept


def request_headers(
    incoming: Mapping[str, str], drop: Iterable[str], credential: str | None
) -> CIMultiDict[str]:
    """Headers to send upstream: the client's, minus hop-by-hop, the client credential and the
    sidecar's own control headers, with the provider credential in their place."""
    headers = _without(incoming, (*HOP_BY_HOP, "authorization", "accept-encoding", *drop))
    headers["Accept-Encoding"] = "identity"  # usage is read from the body: keep it uncompressed
    if credential:
        headers["Authorization"] = f"Bearer {credential}"
    return headers


def response_headers(upstream: CIMultiDictProxy[str]) -> CIMultiDict[str]:
    """Headers to relay to the client: the provider's, minus hop-by-hop and framing; the provider's own
    request id is kept as ``x-upstream-request-id`` since ``x-request-id`` is the sidecar's."""
    headers = _without(upstream, _NOT_RELAYED)
    upstream_id = headers.popall("x-request-id", None)
    if upstream_id:
        headers["x-upstream-request-id"] = upstream_id[0]
    return headers


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
