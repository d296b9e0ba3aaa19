"""The pure header filters: exactly what is forwarded each way, in order, duplicates included."""

from __future__ import annotations

import msgspec
import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from sidecar.headers import HeaderNames, answer_headers, request_headers, response_headers, scrub_secrets

Pairs = list[tuple[str, str]]


def proxy(pairs: Pairs) -> CIMultiDictProxy[str]:
    return CIMultiDictProxy(CIMultiDict(pairs))


KEPT = [
    ("Accept", "application/json"),
    ("Content-Type", "application/json"),
    ("User-Agent", "OpenAI/Python 1.54.0"),
    ("X-Stainless-Lang", "python"),
    ("OpenAI-Beta", "assistants=v2"),
    ("Idempotency-Key", "stainless-python-retry-1"),
]
# What a tenant must never choose or pass through the pooled key.
REFUSED = [
    ("OpenAI-Organization", "org-tenant-picks"),
    ("OpenAI-Project", "proj_tenant"),
    ("api-key", "azure-key"),
    ("x-api-key", "anthropic-key"),
    ("Cookie", "session=1"),
    ("X-Forwarded-For", "10.0.0.1"),
    ("X-Forwarded-Host", "evil"),
    ("X-Tag", "a"),
]
AE = ("Accept-Encoding", "identity")


@pytest.mark.parametrize(
    ("incoming", "drop", "credential", "expected"),
    [
        # The SDK's headers pass; hop-by-hop, framing, the client's key and encoding go; ours are appended.
        (
            [
                ("Host", "gw:8080"),
                ("Accept-Encoding", "gzip, deflate"),
                ("Connection", "keep-alive"),
                *KEPT[:3],
                ("Authorization", "Bearer cgk-client"),
                *KEPT[3:],
                ("Content-Length", "187"),
            ],
            [],
            "sk-provider",
            [*KEPT, AE, ("Authorization", "Bearer sk-provider")],
        ),
        # Anything not on the allow-list goes, the org and project a tenant would pick among them.
        ([*REFUSED, *KEPT], [], "sk-provider", [*KEPT, AE, ("Authorization", "Bearer sk-provider")]),
        # No credential (or an empty one): no Authorization at all.
        ([("Authorization", "Bearer cgk-client"), *KEPT], [], None, [*KEPT, AE]),
        ([("authorization", "x"), *KEPT], [], "", [*KEPT, AE]),
        # Every hop-by-hop header, in any case, and the control headers named by drop, in any case.
        (
            [
                ("KEEP-ALIVE", "5"),
                ("proxy-authenticate", "x"),
                ("Proxy-Authorization", "Basic x"),
                ("Proxy-Connection", "close"),
                ("TE", "trailers"),
                ("Trailer", "x"),
                ("Transfer-Encoding", "chunked"),
                ("Upgrade", "h2c"),
                ("X-CreditGate-Provider-Key", "sk-callers-own"),
                ("x-account", "acct-1"),
                *KEPT,
            ],
            ["x-creditgate-provider-key", "X-Account"],
            "sk-callers-own",
            [*KEPT, AE, ("Authorization", "Bearer sk-callers-own")],
        ),
        # Repeated allowed headers keep every value and their order, with their own spelling.
        (
            [("X-Stainless-A", "a"), ("Authorization", "1"), ("x-stainless-a", "b"), ("X-STAINLESS-A", "c")],
            [],
            "k",
            [
                ("X-Stainless-A", "a"),
                ("x-stainless-a", "b"),
                ("X-STAINLESS-A", "c"),
                AE,
                ("Authorization", "Bearer k"),
            ],
        ),
        # A header the Connection header names is hop-by-hop, even an allowed one.
        ([("Connection", "close, User-Agent"), *KEPT], [], None, [*KEPT[:2], *KEPT[3:], AE]),
        ([], [], None, [AE]),
    ],
)
def test_request_headers(incoming: Pairs, drop: list[str], credential: str | None, expected: Pairs) -> None:
    sent = request_headers(proxy(incoming), drop, credential)
    assert isinstance(sent, CIMultiDict)
    assert list(sent.items()) == expected


@pytest.mark.parametrize(
    ("byok", "expected"),
    [
        # Pooled: the upstream's own org and project replace whatever the tenant sent.
        (
            False,
            [
                *KEPT,
                AE,
                ("OpenAI-Organization", "org-operator"),
                ("OpenAI-Project", "proj_operator"),
                ("Authorization", "Bearer k"),
            ],
        ),
        # BYOK: the caller's org and project are about its own key, and pass.
        (
            True,
            [
                *KEPT[:1],
                ("OpenAI-Organization", "org-own"),
                ("OpenAI-Project", "proj_own"),
                *KEPT[1:],
                AE,
                ("Authorization", "Bearer k"),
            ],
        ),
    ],
)
def test_request_headers_org_and_project(byok: bool, expected: Pairs) -> None:
    incoming = [*KEPT[:1], ("OpenAI-Organization", "org-own"), ("OpenAI-Project", "proj_own"), *KEPT[1:]]
    sent = request_headers(
        proxy(incoming), [], "k", byok=byok, organization="org-operator", project="proj_operator"
    )
    assert list(sent.items()) == expected


def test_request_headers_extra_names_and_prefixes_never_our_own() -> None:
    extra = HeaderNames.of(["X-Tag", "x-demo-*"])
    incoming = [("X-Tag", "a"), ("x-demo-tokens", "5"), ("X-Other", "no"), ("x-creditgate-charged", "0")]
    assert list(request_headers(proxy(incoming), [], None, extra=extra).items()) == [
        ("X-Tag", "a"),
        ("x-demo-tokens", "5"),
        AE,
    ]


def test_request_headers_takes_a_plain_mapping_and_leaves_it_alone() -> None:
    incoming = {"Host": "gw", "Authorization": "Bearer c", "User-Agent": "a", "X-Tag": "a"}
    assert list(request_headers(incoming, (), "k").items()) == [
        ("User-Agent", "a"),
        AE,
        ("Authorization", "Bearer k"),
    ]
    assert incoming == {"Host": "gw", "Authorization": "Bearer c", "User-Agent": "a", "X-Tag": "a"}


def test_answer_headers_are_the_forwarded_ones_that_can_change_the_answer() -> None:
    incoming = [*KEPT, ("x-demo-tokens", "5"), ("X-Other", "no"), ("openai-beta", "b")]
    assert answer_headers(proxy(incoming), HeaderNames.of(["x-demo-*"])) == [
        ("openai-beta", "assistants=v2"),
        ("openai-beta", "b"),
        ("x-demo-tokens", "5"),
    ]
    assert answer_headers(proxy(KEPT[:4])) == []


OPENAI = [
    ("Content-Type", "application/json"),
    ("openai-processing-ms", "412"),
    ("openai-version", "2020-10-01"),
    ("x-ratelimit-remaining-tokens", "29999979"),
    ("retry-after", "2"),
]
# What never reaches a client of the pooled key.
NOT_RELAYED = [
    ("Date", "Tue, 05 Nov 2024 10:00:00 GMT"),
    ("Set-Cookie", "__cf_bm=1"),
    ("set-cookie", "b=2"),
    ("openai-organization", "org-operator"),
    ("openai-project", "proj_operator"),
    ("Access-Control-Allow-Origin", "*"),
    ("Access-Control-Allow-Credentials", "true"),
    ("x-creditgate-charged", "0"),
    ("X-CreditGate-Balance", "999"),
    ("Server", "cloudflare"),
    ("X-Upstream-Request-Id", "theirs"),
]


@pytest.mark.parametrize(
    ("upstream", "expected"),
    [
        # The provider's request id moves to x-upstream-request-id (appended); the rest is dropped.
        (
            [
                *NOT_RELAYED[:2],
                *OPENAI[:2],
                ("Transfer-Encoding", "chunked"),
                ("Connection", "keep-alive"),
                *OPENAI[2:4],
                ("x-request-id", "req_upstream"),
                ("Content-Encoding", "gzip"),
                ("Content-Length", "123"),
                *NOT_RELAYED[2:],
                *OPENAI[4:],
            ],
            [*OPENAI, ("x-upstream-request-id", "req_upstream")],
        ),
        (OPENAI, OPENAI),
        # With several request ids, the first is kept; an empty one is still relayed.
        (
            [("X-Request-ID", "one"), ("x-request-id", "two"), *OPENAI],
            [*OPENAI, ("x-upstream-request-id", "one")],
        ),
        ([("x-request-id", ""), *OPENAI], [*OPENAI, ("x-upstream-request-id", "")]),
        # Every hop-by-hop header in any case, and request-only ones (Host) if a provider sent them.
        (
            [
                ("KEEP-ALIVE", "timeout=5"),
                ("Proxy-Authenticate", "x"),
                ("proxy-authorization", "x"),
                ("Proxy-Connection", "x"),
                ("te", "x"),
                ("Trailer", "x"),
                ("Upgrade", "x"),
                ("Host", "x"),
                ("CONTENT-ENCODING", "br"),
                *OPENAI,
            ],
            OPENAI,
        ),
        ([], []),
    ],
)
def test_response_headers(upstream: Pairs, expected: Pairs) -> None:
    relayed = response_headers(proxy(upstream))
    assert isinstance(relayed, CIMultiDict)
    assert list(relayed.items()) == expected


def test_response_headers_byok_sees_its_own_org_and_extras_never_ours() -> None:
    upstream = proxy([*NOT_RELAYED, *OPENAI, ("x-custom", "1")])
    relayed = response_headers(upstream, byok=True, extra=HeaderNames.of(["x-custom", "x-creditgate-*"]))
    assert list(relayed.items()) == [
        ("openai-organization", "org-operator"),
        ("openai-project", "proj_operator"),
        *OPENAI,
        ("x-custom", "1"),
    ]


def _error(message: str) -> bytes:
    return msgspec.json.encode({"error": {"message": message, "type": "x", "code": None}})


@pytest.mark.parametrize(
    ("body", "literals", "expected"),
    [
        (
            _error("Rate limit reached for gpt-4o in organization org-AbC123xyz on tokens per min."),
            (),
            _error("Rate limit reached for gpt-4o in organization [redacted] on tokens per min."),
        ),
        (
            _error("Incorrect API key provided: sk-proj-ab****************yz. Use sk-ant-api03-XYZ_w."),
            (),
            _error("Incorrect API key provided: [redacted]. Use [redacted]."),
        ),
        (_error("project proj_Q1w2E3r4 over quota"), (), _error("project [redacted] over quota")),
        # The configured key, org and project, whatever their shape; quotes and escapes stay JSON.
        (
            _error('key "secret-pooled" of acme-org said "no"\nsk-x1'),
            ("secret-pooled", "acme-org"),
            _error('key "[redacted]" of [redacted] said "no"\n[redacted]'),
        ),
        # Words that merely contain the shapes stay; a clean body is returned as it was, byte for byte.
        (b'{"error": {"message": "task-force org-"}}', (), b'{"error": {"message": "task-force org-"}}'),
        # Not JSON: scrubbed as text.
        (b"<html>bad key sk-abc123</html>", (), b"<html>bad key [redacted]</html>"),
    ],
)
def test_scrub_secrets(body: bytes, literals: tuple[str, ...], expected: bytes) -> None:
    scrubbed = scrub_secrets(body, literals)
    assert scrubbed == expected
    if body.startswith(b"{"):
        msgspec.json.decode(scrubbed)


def test_dropped_control_headers_win_over_an_extra_prefix() -> None:
    incoming = [("X-Account", "acct-1"), ("X-Tag", "a"), ("X-CreditGate-Provider-Key", "sk-own")]
    sent = request_headers(proxy(incoming), ["x-account"], None, extra=HeaderNames.of(["x-*"]))
    assert list(sent.items()) == [("X-Tag", "a"), AE]
