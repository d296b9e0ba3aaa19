"""Usage extraction and the incremental SSE reader: plain values, no servers."""

from __future__ import annotations

import pytest

from sidecar.pricing import Usage
from sidecar.usage import SSEReader, usage_from_body

CHAT = b'{"id":"x","choices":[],"usage":{"prompt_tokens":12,"completion_tokens":7,"total_tokens":19}}'
CACHED = b'{"usage":{"prompt_tokens":100,"completion_tokens":1,"prompt_tokens_details":{"cached_tokens":60}}}'
RESPONSES = (
    b'{"object":"response","usage":{"input_tokens":9,"output_tokens":4,'
    b'"input_tokens_details":{"cached_tokens":2}}}'
)
EMBEDDINGS = b'{"object":"list","data":[],"usage":{"prompt_tokens":8,"total_tokens":8}}'


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (CHAT, Usage(12, 7, 0)),
        (CACHED, Usage(100, 1, 60)),
        (RESPONSES, Usage(9, 4, 2)),
        (EMBEDDINGS, Usage(8, 0, 0)),
        (b'{"choices":[]}', None),
        (b'{"usage":null}', None),
        (b'{"usage":{}}', None),
        (b'{"usage":{"prompt_tokens":-1,"completion_tokens":2}}', None),
        (b'{"usage":{"prompt_tokens":"12"}}', None),
        (b"not json", None),
        (b"[]", None),
    ],
)
def test_usage_from_body(body: bytes, expected: Usage | None) -> None:
    assert usage_from_body(body) == expected


def chunk(content: str) -> bytes:
    return b'data: {"choices":[{"index":0,"delta":{"content":"' + content.encode() + b'"}}],"usage":null}\n\n'


USAGE_CHUNK = b'data: {"choices":[],"usage":{"prompt_tokens":5,"completion_tokens":2}}\n\n'
DONE = b"data: [DONE]\n\n"
STREAM = chunk("a") + chunk("b") + USAGE_CHUNK + DONE


@pytest.mark.parametrize("size", [1, 2, 7, 64, len(STREAM)])
def test_reader_reassembles_events_across_any_chunking(size: int) -> None:
    reader = SSEReader()
    out = b""
    for start in range(0, len(STREAM), size):
        out += b"".join(reader.feed(STREAM[start : start + size]))
    assert out == STREAM
    assert reader.flush() == b""
    assert reader.usage == Usage(5, 2)
    assert reader.data_events == 2


def test_reader_strips_only_the_usage_chunk_it_was_asked_to() -> None:
    reader = SSEReader(strip_usage_chunk=True)
    assert reader.feed(STREAM) == [chunk("a"), chunk("b"), DONE]
    assert reader.usage == Usage(5, 2)


def test_a_usage_chunk_that_also_carries_choices_is_kept() -> None:
    both = (
        b'data: {"choices":[{"index":0,"delta":{"content":"hi"}}],'
        b'"usage":{"prompt_tokens":1,"completion_tokens":1}}\n\n'
    )
    reader = SSEReader(strip_usage_chunk=True)
    assert reader.feed(both) == [both]
    assert reader.usage == Usage(1, 1)


def test_crlf_framing_and_comments_pass_through() -> None:
    stream = b": keep-alive\r\n\r\n" + b'data: {"x":1}\r\n\r\n' + b"data: [DONE]\r\n\r\n"
    reader = SSEReader()
    assert b"".join(reader.feed(stream)) == stream
    assert reader.data_events == 1


def test_an_unterminated_tail_is_kept_until_flush() -> None:
    reader = SSEReader()
    assert reader.feed(b"data: partial") == []
    assert reader.flush() == b"data: partial"


def test_responses_stream_usage_comes_from_the_completed_event() -> None:
    completed = (
        b"event: response.completed\n"
        b'data: {"type":"response.completed","response":{"usage":{"input_tokens":3,"output_tokens":2}}}\n\n'
    )
    delta = b'event: response.output_text.delta\ndata: {"type":"response.output_text.delta","delta":"hi"}\n\n'
    reader = SSEReader(strip_usage_chunk=True, kind="responses")
    assert reader.feed(delta + completed) == [delta, completed]
    assert reader.usage == Usage(3, 2)


def test_multiline_data_is_joined() -> None:
    reader = SSEReader()
    event = b'data: {"choices":[],\ndata: "usage":{"prompt_tokens":4,"completion_tokens":0}}\n\n'
    assert reader.feed(event) == [event]
    assert reader.usage == Usage(4, 0)


def feed_in(reader: SSEReader, stream: bytes, size: int) -> list[bytes]:
    events: list[bytes] = []
    for start in range(0, len(stream), size):
        events += reader.feed(stream[start : start + size])
    return events


USAGE_JSON = b'{"choices":[],"usage":{"prompt_tokens":5,"completion_tokens":2}}'
TOKEN_JSON = b'{"choices":[{"index":0,"delta":{"content":"a"}}],"usage":null}'


@pytest.mark.parametrize(
    ("events", "relayed", "data_events", "usage"),
    [
        # Each framing alone, the usage chunk withheld in each.
        (
            [b"data: " + TOKEN_JSON + b"\n\n", b"data: " + USAGE_JSON + b"\n\n", b"data: [DONE]\n\n"],
            [0, 2],
            1,
            Usage(5, 2),
        ),
        (
            [
                b"data: " + TOKEN_JSON + b"\r\n\r\n",
                b"data: " + USAGE_JSON + b"\r\n\r\n",
                b"data: [DONE]\r\n\r\n",
            ],
            [0, 2],
            1,
            Usage(5, 2),
        ),
        (
            [b"data: " + TOKEN_JSON + b"\r\r", b"data: " + USAGE_JSON + b"\r\r", b"data: [DONE]\r\r"],
            [0, 2],
            1,
            Usage(5, 2),
        ),
        # Framings mixed in one stream; CRLF lines ended by a bare "\n\n".
        (
            [
                b": comment\r\r",
                b"data: " + TOKEN_JSON + b"\r\n\r\n",
                b"event: x\r\ndata: " + TOKEN_JSON + b"\r\n\n",
                b"data: " + USAGE_JSON + b"\n\n",
                b"data: [DONE]\r\n\r\n",
            ],
            [0, 1, 2, 4],
            2,
            Usage(5, 2),
        ),
        # The earliest end wins: "\r\r" (its CR blank line taking the LF after it as CRLF), then an
        # empty line of its own, before the "\n\n" right after it.
        ([b"data: " + TOKEN_JSON + b"\r\r\n", b"\n", b"data: [DONE]\n\n"], [0, 1, 2], 1, None),
        # A CR blank line after an LF line, and an LF-only blank line after a CRLF line.
        ([b"data: " + TOKEN_JSON + b"\n\r", b"data: " + TOKEN_JSON + b"\r\n\n"], [0, 1], 2, None),
        # Multi-line data (LF and CRLF), "data:" without its space, event and comment lines around it.
        (
            [
                b'event: delta\ndata: {"choices":[{"index":0,\ndata: "delta":{}}]}\n\n',
                b": keep-alive\n\n",
                b'data: {"choices":[],\r\ndata: "usage":{"prompt_tokens":4,"completion_tokens":1}}\r\n\r\n',
                b"data:" + USAGE_JSON + b"\n\n",
            ],
            [0, 1],
            1,
            Usage(5, 2),
        ),
        # Not data: "data:" inside another field, an empty data line, [DONE] without its space.
        ([b"event: data: x\n\n", b"data:\n\n", b"data:[DONE]\n\n", b"id: 1\n\n"], [0, 1, 2, 3], 0, None),
        # Two leading spaces keep one; a usage chunk that is not JSON is relayed and counted.
        ([b'data:  {"usage":1}\n\n', b'data: {"usage": oops\n\n'], [0, 1], 2, None),
    ],
)
@pytest.mark.parametrize("size", [1, 3, 64, 100_000])
def test_reader_framing_table(
    events: list[bytes], relayed: list[int], data_events: int, usage: Usage | None, size: int
) -> None:
    """Whatever the framing and chunking: the events come out whole and byte-identical, the usage chunk
    (and only it) withheld, usage and the token count read as from the whole stream."""
    reader = SSEReader(strip_usage_chunk=True)
    out = feed_in(reader, b"".join(events), size)
    rest = reader.flush()  # a last event whose CR blank line is the last byte waits for the end
    assert out + ([rest] if rest else []) == [events[i] for i in relayed]
    assert (reader.data_events, reader.usage) == (data_events, usage)


@pytest.mark.parametrize("size", [1, 2, 5, 100])
def test_a_terminator_split_across_chunks_waits_for_its_end(size: int) -> None:
    reader = SSEReader()
    stream = b"data: 1\r\n\r\ndata: 2\r\r" + b"data: 3\n\ndata: tail\r\n\r"
    assert feed_in(reader, stream, size) == [b"data: 1\r\n\r\n", b"data: 2\r\r", b"data: 3\n\n"]
    assert reader.flush() == b"data: tail\r\n\r"
    assert reader.data_events == 4  # the unterminated tail is read too


LAST_CHUNK = (
    b'data: {"choices":[{"index":0,"delta":{"content":"see response.completed"},"finish_reason":"stop"}],'
    b'"usage":{"prompt_tokens":5,"completion_tokens":3}}\n\n'
)
LITELLM_USAGE = (
    b'data: {"choices":[{"index":0,"delta":{}}],"usage":{"prompt_tokens":11.0,"completion_tokens":4.0}}\n\n'
)


@pytest.mark.parametrize(
    ("kind", "stream", "expected"),
    [
        # 1. a chat chunk whose text says "response." is still a chat chunk: the route picks the decoder
        ("chat", LAST_CHUNK, Usage(5, 3)),
        ("completions", LAST_CHUNK, Usage(5, 3)),
        # 3. a last event without its blank line is read at flush
        ("chat", LAST_CHUNK[:-2], Usage(5, 3)),
        ("chat", LAST_CHUNK[:-1], Usage(5, 3)),
        (
            "responses",
            b'data: {"type":"response.completed","response":{"usage":{"input_tokens":3,"output_tokens":2}}}',
            Usage(3, 2),
        ),
        # 4. integral floats, and choices of an unexpected shape
        ("chat", LITELLM_USAGE, Usage(11, 4)),
        (
            "chat",
            b'data: {"choices":{"odd":1},"usage":{"prompt_tokens":2,"completion_tokens":1}}\n\n',
            Usage(2, 1),
        ),
        (
            "chat",
            b'data: {"choices":[],"usage":{"prompt_tokens":2.5,"completion_tokens":0.1}}\n\n',
            Usage(3, 1),
        ),
        ("chat", b'data: {"choices":[],"usage":{"prompt_tokens":-1.0,"completion_tokens":1}}\n\n', None),
        ("chat", b'data: {"choices":[],"usage":{"prompt_tokens":1e300,"completion_tokens":1}}\n\n', None),
    ],
)
def test_usage_read_from_real_upstream_streams(kind: str, stream: bytes, expected: Usage | None) -> None:
    for size in range(1, len(stream) + 1):
        reader = SSEReader(kind=kind)
        relayed = feed_in(reader, stream, size)
        assert b"".join(relayed) + reader.flush() == stream
        assert reader.usage == expected


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b'{"choices":[],"usage":{"prompt_tokens":11.0,"completion_tokens":4.0}}', Usage(11, 4)),
        (b'{"choices":"??","usage":{"prompt_tokens":11,"completion_tokens":4}}', Usage(11, 4)),
        (b'{"usage":{"prompt_tokens":1.5,"completion_tokens":0}}', Usage(2, 0)),
        (b'{"usage":{"prompt_tokens":10000000000000,"completion_tokens":0}}', None),
    ],
)
def test_usage_from_real_upstream_bodies(body: bytes, expected: Usage | None) -> None:
    assert usage_from_body(body) == expected


@pytest.mark.parametrize(
    ("stream", "withheld"),
    [
        (LITELLM_USAGE, True),  # LiteLLM: a usage chunk with an empty delta is the sidecar's to withhold
        (b'data: {"choices":[{"index":0,"delta":{"content":""}}],"usage":{"prompt_tokens":1}}\n\n', True),
        (LAST_CHUNK, False),  # content and usage: relayed, usage still recorded
        (
            b'data: {"choices":[{"index":0,"delta":{},"finish_reason":"stop"}],'
            b'"usage":{"prompt_tokens":1}}\n\n',
            False,
        ),
        (
            b'data: {"choices":[{"delta":{"tool_calls":[{"index":0}]}}],"usage":{"prompt_tokens":1}}\n\n',
            False,
        ),
        (b'data: {"choices":[{"text":"hi"}],"usage":{"prompt_tokens":1}}\n\n', False),
        (b'data: {"choices":"??","usage":{"prompt_tokens":1}}\n\n', False),
    ],
)
def test_a_usage_chunk_carrying_nothing_is_withheld(stream: bytes, withheld: bool) -> None:
    reader = SSEReader(strip_usage_chunk=True)
    assert reader.feed(stream) == ([] if withheld else [stream])
    assert reader.usage is not None


def test_the_reader_knows_the_stream_is_done_only_at_done() -> None:
    # vLLM with continuous_usage_stats: a cumulative usage on every chunk; the last one is the bill.
    reader = SSEReader()
    reader.feed(
        b'data: {"choices":[{"delta":{"content":"a"}}],"usage":{"prompt_tokens":5,"completion_tokens":0}}\n\n'
    )
    assert reader.usage == Usage(5, 0)
    assert not reader.done
    reader.feed(
        b'data: {"choices":[{"delta":{"content":"b"}}],"usage":{"prompt_tokens":5,"completion_tokens":2}}\n\n'
    )
    assert reader.usage == Usage(5, 2)
    assert not reader.done
    reader.feed(b"data: [DONE]\n\n")
    assert reader.done


@pytest.mark.parametrize(
    "stream",
    [
        b'data: {"choices":[],"usage":{"prompt_tokens":2,"completion_tokens":1}}\n\r\n'
        + b"data: [DONE]\n\r\n",
        b'data: {"choices":[],"usage":{"prompt_tokens":2,"completion_tokens":1}}\r\n\r\n'
        + b"data: [DONE]\n\n",
        b'data: {"choices":[],"usage":{"prompt_tokens":2,"completion_tokens":1}}\r\r' + b"data: [DONE]\r\n\n",
        b': ping\n\r\ndata:{"choices":[],\ndata:"usage":{"prompt_tokens":2,"completion_tokens":1}}\n\r\n',
    ],
)
def test_lf_lines_with_a_crlf_blank_line_end_the_event(stream: bytes) -> None:
    for size in range(1, len(stream) + 1):
        reader = SSEReader()
        relayed = feed_in(reader, stream, size)
        assert b"".join(relayed) == stream  # every event ended: nothing left for flush
        assert reader.usage == Usage(2, 1)
