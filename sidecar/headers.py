"""Header rules, pure: which client headers go upstream and which provider headers come back, and the
scrubbing of secrets from pooled error bodies.

Both directions are allow-lists: a header goes upstream, or back to the client, only when it is named
here (or by the operator's ``forward_request_headers`` / ``relay_response_headers``). So a client's key
never reaches an upstream (its Authorization is replaced by the provider key, or by the caller's own key
on BYOK requests), a tenant cannot pick which of the operator's organizations or projects the pooled key
acts in, and a provider key, cookie or organization id never reaches a client.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import msgspec
from multidict import CIMultiDict, CIMultiDictProxy

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
class HeaderNames:
    """A set of header names, lower-case, and name prefixes (a pattern ending in ``*``)."""

    names: frozenset[str] = frozenset()
    prefixes: tuple[str, ...] = ()

    @classmethod
    def of(cls, patterns: Iterable[str]) -> HeaderNames:
        lowered = [p.strip().lower() for p in patterns if p.strip()]
        return cls(
            frozenset(p for p in lowered if not p.endswith("*")),
            tuple(p[:-1] for p in lowered if p.endswith("*")),
        )

    def __contains__(self, lowered: object) -> bool:
        return isinstance(lowered, str) and (lowered in self.names or lowered.startswith(self.prefixes))


NO_HEADERS = HeaderNames()


# Client headers that go upstream: what the OpenAI SDKs send to describe the request and themselves.
# Accept-Encoding is always replaced by identity; Authorization by the credential.
FORWARDED = HeaderNames.of(
    ["content-type", "accept", "user-agent", "openai-beta", "idempotency-key", "x-stainless-*"]
)
# Of those, the ones that cannot change the answer (the cache key covers the rest in shared scope).
NEUTRAL = HeaderNames.of(["content-type", "accept", "user-agent", "idempotency-key", "x-stainless-*"])
# A BYOK caller's org and project: about the caller's own key, so they pass on BYOK calls only.
BYOK_PAIR = ("openai-organization", "openai-project")
BYOK_FORWARDED = HeaderNames.of(BYOK_PAIR)
# Provider headers relayed to the client: the answer's type, timing, version and rate-limit advice.
RELAYED = HeaderNames.of(
    [
        "content-type",
        "openai-processing-ms",
        "openai-version",
        "openai-model",
        "retry-after",
        "retry-after-ms",
        "x-should-retry",
        "x-ratelimit-*",
    ]
)
# On BYOK answers the org and project the caller's own key acted in are the caller's to see.
BYOK_RELAYED = HeaderNames.of(["openai-organization", "openai-project"])
# Never relayed or forwarded, whatever the settings say: ours, the credentials and the framing.
NEVER = HeaderNames.of(
    ["x-creditgate-*", "creditgate-*", "authorization", "proxy-authorization", *sorted(HOP_BY_HOP)]
)


def _connection_listed(headers: Mapping[str, str]) -> list[str]:
    """The names a ``Connection`` header lists: hop-by-hop for this connection only (RFC 9110 §7.6.1)."""
    if isinstance(headers, CIMultiDictProxy | CIMultiDict):
        values = headers.getall("connection", ())
    else:
        values = [value for name, value in headers.items() if name.lower() == "connection"]
    return [token.strip().lower() for value in values for token in value.split(",") if token.strip()]


@functools.lru_cache(maxsize=256)
def _union(
    rules: tuple[HeaderNames, ...], drop: tuple[str, ...]
) -> tuple[frozenset[str], tuple[str, ...], frozenset[str], dict[str, bool]]:
    """The names and prefixes of `rules` together, the names refused whatever the prefixes say (`drop`
    and what is never passed on), and a memo of the decision per header name as spelt (computed once per
    combination: a proxy has a handful, and clients send the same few names again and again)."""
    refused = frozenset(name.lower() for name in drop) | NEVER.names
    names = frozenset().union(*(rule.names for rule in rules)) - refused
    prefixes = tuple(p for rule in rules for p in rule.prefixes)
    return names, prefixes, refused, {}


_MEMO_LIMIT = 1024  # names remembered per combination; past it, decided each time (no unbounded growth)


def _decide(name: str, names: frozenset[str], prefixes: tuple[str, ...], refused: frozenset[str]) -> bool:
    lowered = name.lower()
    return lowered in names or bool(
        prefixes
        and lowered.startswith(prefixes)
        and lowered not in refused
        and not lowered.startswith(NEVER.prefixes)
    )


def _kept(
    headers: Mapping[str, str], allowed: tuple[HeaderNames, ...], drop: tuple[str, ...] = ()
) -> CIMultiDict[str]:
    """The headers named in one of `allowed` (order, spelling and repeats kept), minus `drop`, those the
    Connection header lists and those never passed on."""
    names, prefixes, refused, memo = _union(allowed, drop)
    listed = _connection_listed(headers)
    kept: CIMultiDict[str] = CIMultiDict()
    for name, value in headers.items():
        keep = memo.get(name)
        if keep is None:
            keep = _decide(name, names, prefixes, refused)
            if len(memo) < _MEMO_LIMIT:
                memo[name] = keep
        if keep and not (listed and name.lower() in listed):
            kept.add(name, value)
    return kept


def request_headers(
    incoming: Mapping[str, str],
    drop: Iterable[str],
    credential: str | None,
    *,
    byok: bool = False,
    organization: str | None = None,
    project: str | None = None,
    extra: HeaderNames = NO_HEADERS,
) -> CIMultiDict[str]:
    """Headers to send upstream: the client's that are on the allow-list (plus the operator's `extra`),
    minus the sidecar's own control headers (`drop`), with the credential in place of the client's key.
    A BYOK caller's OpenAI-Organization / OpenAI-Project pass (they are about its own key); on pooled
    calls they are the upstream's configured ones, or none."""
    allowed = (FORWARDED, extra, BYOK_FORWARDED) if byok else (FORWARDED, extra)
    refused = ("accept-encoding", *(() if byok else BYOK_PAIR), *drop)  # a tuple: cached by _union
    headers = _kept(incoming, allowed, refused)
    headers["Accept-Encoding"] = "identity"  # usage is read from the body: keep it uncompressed
    if not byok:
        if organization:
            headers["OpenAI-Organization"] = organization
        if project:
            headers["OpenAI-Project"] = project
    if credential:
        headers["Authorization"] = f"Bearer {credential}"
    return headers


def answer_headers(incoming: Mapping[str, str], extra: HeaderNames = NO_HEADERS) -> list[tuple[str, str]]:
    """The forwarded client headers that can change the answer (``openai-beta`` and the operator's
    extras), as sorted (lower-case name, value) pairs: what a shared cache entry must be keyed on."""
    kept = _kept(incoming, (FORWARDED, extra))
    return sorted((name.lower(), value) for name, value in kept.items() if name.lower() not in NEUTRAL)


def response_headers(
    upstream: CIMultiDictProxy[str], *, byok: bool = False, extra: HeaderNames = NO_HEADERS
) -> CIMultiDict[str]:
    """Headers to relay to the client: the provider's that are on the allow-list (plus the operator's
    `extra`); never a cookie, CORS, the pooled key's organization, or a header of ours. The provider's
    own request id is kept as ``x-upstream-request-id`` since ``x-request-id`` is the sidecar's."""
    allowed = (RELAYED, extra, BYOK_RELAYED) if byok else (RELAYED, extra)
    headers = _kept(upstream, allowed)
    upstream_id = upstream.getall("x-request-id", None)
    if upstream_id:
        headers["x-upstream-request-id"] = upstream_id[0]
    return headers


# Key-like strings a provider's error may quote: secret keys (sk-…, sk-proj-…, sk-ant-…, masked or
# not), organization ids (org-…) and project ids (proj_…).
_SECRET = re.compile(
    r"(?<![A-Za-z0-9])"
    r"(?:sk-(?:[A-Za-z0-9_*-]|\.(?=[A-Za-z0-9_*.]))+|org-[A-Za-z0-9]{4,}|proj_[A-Za-z0-9]{4,})"
)
REDACTED = "[redacted]"


def _scrub_text(text: str, literals: tuple[str, ...]) -> str:
    for literal in literals:
        text = text.replace(literal, REDACTED)
    return _SECRET.sub(REDACTED, text)


def _scrub_value(value: Any, literals: tuple[str, ...]) -> Any:
    if isinstance(value, str):
        return _scrub_text(value, literals)
    if isinstance(value, list):
        return [_scrub_value(item, literals) for item in value]
    if isinstance(value, dict):
        return {_scrub_text(k, literals): _scrub_value(v, literals) for k, v in value.items()}
    return value


def scrub_secrets(body: bytes, literals: Iterable[str] = ()) -> bytes:
    """A pooled error body with every key, organization and project id in it replaced by [redacted]:
    `literals` (the upstream's own key, org and project) and anything shaped like one. A JSON body stays
    valid JSON (its strings are scrubbed, then it is encoded again); any other body is scrubbed as text."""
    secrets = tuple(sorted((s for s in literals if s), key=len, reverse=True))
    try:
        decoded = msgspec.json.decode(body)
    except msgspec.DecodeError:
        return _scrub_text(body.decode("utf-8", "replace"), secrets).encode()
    scrubbed = _scrub_value(decoded, secrets)
    return body if scrubbed == decoded else msgspec.json.encode(scrubbed)
