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
    max_tokens: TokenLimit | None = None
    max_completion_tokens: TokenLimit | None = None
    max_output_tokens: TokenLimit | None = None
    temperature: float | None = None  # read for cacheability, never for money

    @property
    def output_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens or self.max_output_tokens


_decoder = msgspec.json.Decoder(MeteredRequest)
_FIELD = re.compile(r"at `\$\.([A-Za-z_]+)")


def decode_request(body: bytes) -> MeteredRequest:
    if not body:
        raise BadRequest("The request body is empty; send a JSON object.")
    try:
        return _decoder.decode(body)
    except msgspec.ValidationError as exc:
        message = str(exc)
        match = _FIELD.search(message)
        if "missing required field `model`" in message:
            raise BadRequest("The request must name a `model`.", param="model") from None
        raise BadRequest(f"Invalid request: {message}", param=match.group(1) if match else None) from None
    except msgspec.DecodeError as exc:
        raise BadRequest(f"The request body is not valid JSON: {exc}") from None
    except RecursionError:  # msgspec's own depth limit, even inside fields it skips
        raise BadRequest("The request body nests JSON arrays or objects too deeply.") from None


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
