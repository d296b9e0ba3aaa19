"""The pure header filters: exactly what is forwarded each way, in order, duplicates included."""

from __future__ import annotations

import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from sidecar.upstream import request_headers, response_headers

Pairs = list[tuple[str, str]]


def proxy(pairs: Pairs) -> CIMultiDictProxy[str]:
    return CIMultiDictProxy(CIMultiDict(pairs))


KEPT = [
    ("Accept", "application/json"),
    ("Content-Type", "application/json"),
    ("User-Agent", "OpenAI/Python 1.54.0"),
    ("X-Stainless-Lang", "python"),
    ("OpenAI-Organization", "org-1"),
]


@pytest.mark.parametrize(
    ("incoming", "drop", "credential", "expected"),
    [
        # The SDK's headers: hop-by-hop, framing, the client's key and encoding go; ours are appended.
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
            [*KEPT, ("Accept-Encoding", "identity"), ("Authorization", "Bearer sk-provider")],
        ),
        # No credential (or an empty one): no Authorization at all.
        ([("Authorization", "Bearer cgk-client"), *KEPT], [], None, [*KEPT, ("Accept-Encoding", "identity")]),
        ([("authorization", "x"), *KEPT], [], "", [*KEPT, ("Accept-Encoding", "identity")]),
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
            [*KEPT, ("Accept-Encoding", "identity"), ("Authorization", "Bearer sk-callers-own")],
        ),
        # Repeated headers keep every value and their order, with their own spelling; repeated dropped
        # ones all go.
        (
            [("X-Tag", "a"), ("Authorization", "1"), ("x-tag", "b"), ("authorization", "2"), ("X-TAG", "c")],
            [],
            "k",
            [
                ("X-Tag", "a"),
                ("x-tag", "b"),
                ("X-TAG", "c"),
                ("Accept-Encoding", "identity"),
                ("Authorization", "Bearer k"),
            ],
        ),
        # Headers merely containing a dropped name, and a Connection header's listed names, are kept.
        (
            [("X-Host", "h"), ("Authorization-Hint", "a"), ("Connection", "x-custom"), ("X-Custom", "1")],
            [],
            None,
            [
                ("X-Host", "h"),
                ("Authorization-Hint", "a"),
                ("X-Custom", "1"),
                ("Accept-Encoding", "identity"),
            ],
        ),
        ([], [], None, [("Accept-Encoding", "identity")]),
    ],
)
def test_request_headers(incoming: Pairs, drop: list[str], credential: str | None, expected: Pairs) -> None:
    sent = request_headers(proxy(incoming), drop, credential)
    assert isinstance(sent, CIMultiDict)
    assert list(sent.items()) == expected


def test_request_headers_takes_a_plain_mapping_and_leaves_it_alone() -> None:
    incoming = {"Host": "gw", "Authorization": "Bearer c", "X-Tag": "a"}
    assert list(request_headers(incoming, (), "k").items()) == [
        ("X-Tag", "a"),
        ("Accept-Encoding", "identity"),
        ("Authorization", "Bearer k"),
    ]
    assert incoming == {"Host": "gw", "Authorization": "Bearer c", "X-Tag": "a"}


OPENAI = [
    ("Date", "Tue, 05 Nov 2024 10:00:00 GMT"),
    ("Content-Type", "application/json"),
    ("openai-processing-ms", "412"),
    ("x-ratelimit-remaining-tokens", "29999979"),
    ("Set-Cookie", "a=1"),
    ("set-cookie", "b=2"),
    ("Server", "cloudflare"),
]


@pytest.mark.parametrize(
    ("upstream", "expected"),
    [
        # The provider's request id moves to x-upstream-request-id (appended); framing goes.
        (
            [
                *OPENAI[:2],
                ("Transfer-Encoding", "chunked"),
                ("Connection", "keep-alive"),
                *OPENAI[2:4],
                ("x-request-id", "req_upstream"),
                ("Content-Encoding", "gzip"),
                ("Content-Length", "123"),
                *OPENAI[4:],
            ],
            [*OPENAI, ("x-upstream-request-id", "req_upstream")],
        ),
        # No request id: nothing added; one the provider already calls x-upstream-request-id passes.
        (OPENAI, OPENAI),
        ([("X-Upstream-Request-Id", "theirs"), *OPENAI], [("X-Upstream-Request-Id", "theirs"), *OPENAI]),
        # A request id replaces such a header (in its place); with several, the first is kept.
        (
            [("X-Upstream-Request-Id", "theirs"), ("X-Request-ID", "one"), ("x-request-id", "two"), *OPENAI],
            [("x-upstream-request-id", "one"), *OPENAI],
        ),
        # An empty request id is still relayed, as an empty x-upstream-request-id.
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
