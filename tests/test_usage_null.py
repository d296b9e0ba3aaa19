"""The SSE reader skips decoding events whose every `"usage"` key is `:null` (OpenAI sends one on each
token chunk): what it records and relays must be exactly what a full decode of each event gives."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from sidecar.pricing import Usage
from sidecar.usage import SSEReader

USAGE = st.fixed_dictionaries(
    {"prompt_tokens": st.integers(0, 10**6), "completion_tokens": st.integers(0, 999)}
)
# Text that looks like the keys the fast path counts, inside JSON strings (where quotes are escaped).
TEXT = st.sampled_from(['"usage":null', '"usage":{"prompt_tokens":1}', "usage", 'a "usage" b', "", "ok"])


@st.composite
def chunks(draw: st.DrawFn) -> dict[str, Any]:
    delta: dict[str, Any] = {"content": draw(TEXT)}
    if draw(st.booleans()):
        delta["usage"] = draw(st.one_of(st.none(), USAGE))  # a nested "usage" key is not the chunk's usage
    chunk: dict[str, Any] = {
        "id": "c",
        "choices": draw(st.sampled_from([[], [{"index": 0, "delta": delta}]])),
    }
    top = draw(st.sampled_from(["absent", "null", "object"]))
    if top == "null":
        chunk["usage"] = None
    elif top == "object":
        chunk["usage"] = draw(USAGE)
    return chunk


def feed(sent: list[dict[str, Any]], separators: tuple[str, str]) -> tuple[Usage | None, list[int]]:
    """The usage recorded and the indexes of the events relayed."""
    reader = SSEReader(strip_usage_chunk=True)
    relayed = []
    for i, chunk in enumerate(sent):
        if reader.feed(f"data: {json.dumps(chunk, separators=separators)}\n\n".encode()):
            relayed.append(i)
    return reader.usage, relayed


@given(st.lists(chunks(), min_size=1, max_size=6))
def test_the_null_fast_path_records_and_relays_what_a_decode_does(sent: list[dict[str, Any]]) -> None:
    # Spaced JSON (`"usage": null`) never takes the fast path: every such event is decoded.
    assert feed(sent, (",", ":")) == feed(sent, (", ", ": "))


def test_a_spaced_usage_object_after_a_null_one_is_still_read() -> None:
    reader = SSEReader()
    reader.feed(
        b'data: {"choices":[{"delta":{"usage":null}}],"usage": {"prompt_tokens":3,"completion_tokens":1}}\n\n'
    )
    assert reader.usage == Usage(3, 1)
