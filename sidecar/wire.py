"""The few request fields the sidecar reads, decoded with msgspec; validation messages name the field.

The original request bytes are what is forwarded; these types only look at them. Pure: no I/O.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Annotated, Any

import msgspec

from .errors import BadRequest

Count = Annotated[int, msgspec.Meta(ge=1, le=128)]
TokenLimit = Annotated[int, msgspec.Meta(ge=1)]


class StreamOptions(msgspec.Struct):
    include_usage: bool | None = None


class MeteredRequest(msgspec.Struct, kw_only=True):
    model: str
    stream: bool | None = None
    stream_options: StreamOptions | msgspec.UnsetType | None = msgspec.UNSET  # UNSET: not in the body
    n: Count | None = None
    best_of: Count | None = None  # completions: that many generated (and billed) per prompt
    # Read for the worst case only, and only as raw JSON (an empty Raw: not in the body): see unseen_inputs.
    prompt: msgspec.Raw = msgspec.Raw()  # completions: the prompts; Responses: a stored prompt template
    messages: msgspec.Raw = msgspec.Raw()
    input: msgspec.Raw = msgspec.Raw()
    previous_response_id: msgspec.Raw = msgspec.Raw()
    conversation: msgspec.Raw = msgspec.Raw()
    max_tokens: TokenLimit | None = None
    max_completion_tokens: TokenLimit | None = None
    max_output_tokens: TokenLimit | None = None
    temperature: float | None = None  # read for cacheability, never for money
    user: msgspec.Raw = msgspec.Raw()  # the end user, for attribution and caps (a string; else ignored)

    @property
    def output_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens or self.max_output_tokens

    @property
    def choices(self) -> int:
        """Completions generated per prompt: ``max(n, best_of)``."""
        return max(self.n or 1, self.best_of or 1)


_decoder = msgspec.json.Decoder(MeteredRequest)
NESTED_TOO_DEEP = "The request body nests JSON arrays or objects too deeply."
_FIELD = re.compile(r"at `\$\.([A-Za-z_]+)")


def decode_request(body: bytes) -> MeteredRequest:
    if not body:
        raise BadRequest("The request body is empty; send a JSON object.")
    try:
        request = _decoder.decode(body)
    except msgspec.ValidationError as exc:
        message = str(exc)
        match = _FIELD.search(message)
        if "missing required field `model`" in message:
            raise BadRequest("The request must name a `model`.", param="model") from None
        raise BadRequest(f"Invalid request: {message}", param=match.group(1) if match else None) from None
    except msgspec.DecodeError as exc:
        raise BadRequest(f"The request body is not valid JSON: {exc}") from None
    except RecursionError:  # msgspec's own depth limit, even inside fields it skips
        raise BadRequest(NESTED_TOO_DEEP) from None
    if request.best_of is not None and request.n is not None and request.best_of < request.n:
        raise BadRequest(
            f"best_of is {request.best_of}, below n ({request.n}): best_of must be at least n.",
            param="best_of",
        )
    return request


def _present(raw: msgspec.Raw) -> bool:
    return len(raw) > 0 and bytes(raw) != b"null"


def _first(raw: msgspec.Raw) -> bytes:
    return bytes(memoryview(raw)[:1])


_any_list = msgspec.json.Decoder(list[msgspec.Raw])


def _items(raw: msgspec.Raw) -> list[msgspec.Raw]:
    """The elements of a JSON array, undecoded; [] for anything else."""
    if _first(raw) != b"[":
        return []
    return _any_list.decode(raw)


def prompt_count(request: MeteredRequest) -> int:
    """How many prompts a completions request sends: a string, a list of token ids (one prompt each), a
    list of strings or a list of token-id lists (one prompt per element)."""
    items = _items(request.prompt)
    if any(_first(item) in (b'"', b"[") for item in items):
        return len(items)  # strings or token lists: one prompt each (a bare token-id list is one prompt)
    return 1


class _Part(msgspec.Struct):
    """A content part or input item, loosely: only what says its tokens are not in the body's bytes."""

    type: Any = None
    image_url: msgspec.Raw = msgspec.Raw()
    input_audio: msgspec.Raw = msgspec.Raw()
    audio: msgspec.Raw = msgspec.Raw()  # an assistant message's earlier audio, by id
    file: msgspec.Raw = msgspec.Raw()
    file_id: msgspec.Raw = msgspec.Raw()
    file_data: msgspec.Raw = msgspec.Raw()
    file_url: msgspec.Raw = msgspec.Raw()
    content: msgspec.Raw = msgspec.Raw()


_part = msgspec.json.Decoder(_Part)
# Bytes any of the fields above must contain; a body region with none of them is not decoded at all
# (a `\u` escape in a name could spell any of them).
_MARKERS = (b"image", b"audio", b"file", b"item_reference", b"\\u")
_MARKED = re.compile(b"|".join(re.escape(m) for m in _MARKERS)).search  # one C scan for any of them
IMAGE, AUDIO, FILE, STORED = "image", "audio", "file", "stored"
_TYPES = {
    "image_url": IMAGE,
    "input_image": IMAGE,
    "input_audio": AUDIO,
    "file": FILE,
    "input_file": FILE,
    "item_reference": STORED,
}


def _kind(part: _Part) -> tuple[str, str] | None:
    """What a part brings that its bytes do not bound, and the field that says so."""
    kind = _TYPES.get(part.type) if isinstance(part.type, str) else None
    for field, implied in (
        ("image_url", IMAGE),
        ("input_audio", AUDIO),
        ("audio", AUDIO),
        ("file", FILE),
        ("file_id", FILE),
        ("file_data", FILE),
        ("file_url", FILE),
    ):
        if _present(getattr(part, field)):
            return (kind or implied), field
    return (kind, "type") if kind else None


def _scan(raw: msgspec.Raw, where: str, found: list[tuple[str, str]], depth: int = 0) -> None:
    """Collect (kind, param) for every part of a list of messages, items or content parts."""
    for i, item in enumerate(_items(raw)):
        if _first(item) != b"{" or not _MARKED(item):
            continue
        part = _part.decode(item)
        kind = _kind(part)
        if kind is not None:
            found.append((kind[0], f"{where}[{i}].{kind[1]}"))
        if depth == 0 and _present(part.content):
            _scan(part.content, f"{where}[{i}].content", found, depth + 1)


def unseen_inputs(request: MeteredRequest, route_kind: str) -> list[tuple[str, str]]:
    """The inputs whose tokens the body's bytes do not bound: images, audio, files and stored state,
    each as (kind, the param naming it), e.g. ("image", "messages[0].content[1].image_url")."""
    found: list[tuple[str, str]] = []
    if route_kind == "chat":
        if _present(request.messages) and _MARKED(request.messages):
            _scan(request.messages, "messages", found)
    elif route_kind == "responses":
        if _present(request.input) and _MARKED(request.input):
            _scan(request.input, "input", found)
        for field in ("previous_response_id", "conversation", "prompt"):
            if _present(getattr(request, field)):
                found.append((STORED, field))
    return found


@dataclass(frozen=True, slots=True)
class Route:
    """A metered route: its upstream path and whether `n` multiplies the output."""

    path: str  # relative to the upstream base URL (which ends in /v1)
    kind: str  # "chat", "completions", "embeddings", "responses"
    has_output: bool = True
    has_n: bool = True


ROUTES = {
    "/v1/chat/completions": Route("chat/completions", "chat"),
    "/v1/completions": Route("completions", "completions"),
    "/v1/embeddings": Route("embeddings", "embeddings", has_output=False, has_n=False),
    "/v1/responses": Route("responses", "responses", has_n=False),
}

_json_encoder = msgspec.json.Encoder()
_INCLUDE_USAGE = b'"stream_options":{"include_usage":true},'


def with_usage_requested(body: bytes, request: MeteredRequest) -> bytes:
    """The body with ``stream_options.include_usage`` set, so the stream ends with a usage chunk.

    `request` is `body` decoded. A body without ``stream_options`` (the usual case) gets the member spliced
    in after its opening brace, bytes untouched otherwise; one with options of its own is re-encoded."""
    if request.stream_options is msgspec.UNSET:
        start = body.index(b"{") + 1  # the body decoded as an object with a model: a member follows
        return body[:start] + _INCLUDE_USAGE + body[start:]
    data: dict[str, Any] = msgspec.json.decode(body)
    options = data.get("stream_options")
    data["stream_options"] = {**(options if isinstance(options, dict) else {}), "include_usage": True}
    return _json_encoder.encode(data)
