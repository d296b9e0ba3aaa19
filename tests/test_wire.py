"""Request decoding and the usage request added to streamed bodies: plain tables, no servers."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from sidecar.errors import BadRequest
from sidecar.wire import decode_request, prompt_count, unseen_inputs, with_usage_requested

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


@pytest.mark.parametrize(
    ("body", "prompts", "choices"),
    [
        (b'{"model":"m"}', 1, 1),
        (b'{"model":"m","prompt":"a b c"}', 1, 1),
        (b'{"model":"m","prompt":[]}', 1, 1),
        (b'{"model":"m","prompt":[1, 2, 3]}', 1, 1),  # a list of token ids is one prompt
        (b'{"model":"m","prompt":["a","b"]}', 2, 1),
        (b'{"model":"m","prompt": [ [1,2] , [3] , [4] ] }', 3, 1),
        (b'{"model":"m","prompt":"x","n":3}', 1, 3),
        (b'{"model":"m","prompt":"x","best_of":4}', 1, 4),
        (b'{"model":"m","prompt":["a","b"],"n":2,"best_of":5}', 2, 5),
    ],
)
def test_prompts_and_choices(body: bytes, prompts: int, choices: int) -> None:
    request = decode_request(body)
    assert (prompt_count(request), request.choices) == (prompts, choices)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (b'{"model":"m","n":3,"best_of":2}', "best_of"),
        (b'{"model":"m","best_of":0}', "best_of"),
        (b'{"model":"m","best_of":"2"}', "best_of"),
        (b'{"model":"m","best_of":2.5}', "best_of"),
    ],
)
def test_invalid_best_of_is_named(body: bytes, param: str) -> None:
    with pytest.raises(BadRequest) as raised:
        decode_request(body)
    assert raised.value.param == param


@pytest.mark.parametrize(
    ("route", "body", "found"),
    [
        ("chat", b'{"model":"m","messages":[{"role":"user","content":"an image, a file, audio"}]}', []),
        ("chat", b'{"model":"m","messages":"not a list"}', []),
        (
            "chat",
            b'{"model":"m","messages":[{"role":"user","content":[{"type":"text","text":"x"},'
            b'{"type":"image_url","image_url":{"url":"u"}},{"type":"input_audio","input_audio":{}},'
            b'{"type":"file","file":{"file_id":"f"}}]},{"role":"assistant","audio":{"id":"a1"}}]}',
            [
                ("image", "messages[0].content[1].image_url"),
                ("audio", "messages[0].content[2].input_audio"),
                ("file", "messages[0].content[3].file"),
                ("audio", "messages[1].audio"),
            ],
        ),
        # Escaped names and unusual part shapes still pass (and count).
        (
            "chat",
            b'{"model":"m","messages":[{"content":[7, null, "s",'
            b' {"type": {"odd": 1}, "image\\u005furl": "u"}]}]}',
            [("image", "messages[0].content[3].image_url")],
        ),
        ("chat", b'{"model":"m","messages":[{"content":[{"type":"text","image_url":null}]}]}', []),
        ("responses", b'{"model":"m","input":"describe the image file"}', []),
        (
            "responses",
            b'{"model":"m","input":[{"role":"user","content":[{"type":"input_image","file_id":"f"},'
            b'{"type":"input_file","file_url":"u"},{"type":"input_audio","input_audio":{}}]},'
            b'{"type":"item_reference","id":"i"}],"previous_response_id":"r","conversation":{"id":"c"},'
            b'"prompt":{"id":"p"}}',
            [
                ("image", "input[0].content[0].file_id"),
                ("file", "input[0].content[1].file_url"),
                ("audio", "input[0].content[2].input_audio"),
                ("stored", "input[1].type"),
                ("stored", "previous_response_id"),
                ("stored", "conversation"),
                ("stored", "prompt"),
            ],
        ),
        ("responses", b'{"model":"m","input":"x","previous_response_id":null}', []),
        # Completions and embeddings prompts are text or token ids only.
        ("completions", b'{"model":"m","prompt":"image file audio"}', []),
    ],
)
def test_unseen_inputs(route: str, body: bytes, found: list[tuple[str, str]]) -> None:
    assert unseen_inputs(decode_request(body), route) == found
