"""Request decoding and the usage request added to streamed bodies: plain tables, no servers."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from sidecar.errors import BadRequest
from sidecar.wire import decode_request, with_usage_requested

MESSAGES = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize(
    ("body", "expected_options"),
    [
        # No stream_options: spliced in, every other byte as the client sent it.
        (b'{"model":"m","stream":true}', {"include_usage": True}),
        (b'  \n{ "model" : "m", "stream": true }', {"include_usage": True}),
        # Options of the client's own are kept and completed.
        (b'{"model":"m","stream_options":{"include_usage":false}}', {"include_usage": True}),
        (b'{"model":"m","stream_options":{"x":1}}', {"x": 1, "include_usage": True}),
        (b'{"model":"m","stream_options":null}', {"include_usage": True}),
        # An escaped key is still the same key: it is merged, never shadowed by a second member.
        (b'{"model":"m","stream\\u005foptions":{"include_usage":false}}', {"include_usage": True}),
    ],
)
def test_usage_is_requested(body: bytes, expected_options: dict[str, Any]) -> None:
    sent = with_usage_requested(body, decode_request(body))
    decoded = msgspec.json.decode(sent)
    assert decoded["stream_options"] == expected_options
    assert {k: v for k, v in decoded.items() if k != "stream_options"} == {
        k: v for k, v in msgspec.json.decode(body).items() if k != "stream_options"
    }


def test_a_body_without_options_is_spliced_not_reencoded() -> None:
    body = b'{"model": "m",   "messages": [{"role": "user", "content": "caf\\u00e9"}], "stream": true}'
    sent = with_usage_requested(body, decode_request(body))
    assert sent == b'{"stream_options":{"include_usage":true},' + body[1:]


def test_a_body_with_one_member_stays_valid() -> None:
    body = b'{"model":"m"}'
    assert msgspec.json.decode(with_usage_requested(body, decode_request(body))) == {
        "stream_options": {"include_usage": True},
        "model": "m",
    }


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (b'{"messages": []}', "model"),
        (b'{"model": "m", "n": 0}', "n"),
        (b'{"model": "m", "max_tokens": "5"}', "max_tokens"),
        (b'{"model": "m", "temperature": true}', "temperature"),
    ],
)
def test_invalid_fields_are_named(body: bytes, param: str) -> None:
    with pytest.raises(BadRequest) as raised:
        decode_request(body)
    assert raised.value.param == param
