"""Token usage from provider responses, and an incremental SSE reader that finds it. Pure: no I/O.

- Chat / completions / embeddings bodies: ``usage.prompt_tokens``, ``usage.completion_tokens``,
  ``usage.prompt_tokens_details.cached_tokens``.
- Responses API: ``usage.input_tokens``, ``usage.output_tokens``,
  ``usage.input_tokens_details.cached_tokens``; in a stream, on the ``response.completed``
  (or ``response.incomplete``) event's ``response``.
- Chat / completions streams: the final chunk sent when ``stream_options.include_usage`` is set.
"""

from __future__ import annotations

import decimal

import msgspec

from .pricing import Usage

# Token counts as upstreams send them, kept raw and read exactly (as decimals, never as floats): some
# (LiteLLM, vLLM) send JSON numbers such as ``11.0``. An integral number is that integer; a non-integral
# one is rounded up (the safe billing choice: never charge less than the upstream reported); a negative,
# absurd (above MAX_TOKENS) or non-numeric one voids the usage.
MAX_TOKENS = 10**12
_NULL = msgspec.Raw(b"null")
_ZERO = msgspec.Raw(b"0")


class _Details(msgspec.Struct):
    cached_tokens: msgspec.Raw = _ZERO


class _Usage(msgspec.Struct):
    prompt_tokens: msgspec.Raw = _NULL
    completion_tokens: msgspec.Raw = _ZERO
    input_tokens: msgspec.Raw = _NULL
    output_tokens: msgspec.Raw = _ZERO
    prompt_tokens_details: _Details | None = None
    input_tokens_details: _Details | None = None

    def to_usage(self) -> Usage | None:
        if bytes(self.prompt_tokens) != b"null":
            details = self.prompt_tokens_details
            return _checked(
                self.prompt_tokens, self.completion_tokens, details.cached_tokens if details else _ZERO
            )
        if bytes(self.input_tokens) != b"null":
            details = self.input_tokens_details
            return _checked(
                self.input_tokens, self.output_tokens, details.cached_tokens if details else _ZERO
            )
        return None


def _count(raw: msgspec.Raw) -> int | None:
    """A token count as an integer (non-integral ones rounded up; null is 0), or None when it is
    negative, absurd or not a number."""
    text = bytes(raw)
    if text.isdigit():  # the common case: a plain JSON integer
        count = int(text)
        return count if count <= MAX_TOKENS else None
    if text == b"null":
        return 0
    if not text or text[0] not in b"-0123456789":  # strings, objects, booleans
        return None
    try:
        value = decimal.Decimal(text.decode())
    except (decimal.InvalidOperation, UnicodeDecodeError):
        return None
    if not value.is_finite() or value < 0 or value > MAX_TOKENS:
        return None
    return int(value.to_integral_value(rounding=decimal.ROUND_CEILING))


def _checked(prompt: msgspec.Raw, completion: msgspec.Raw, cached: msgspec.Raw) -> Usage | None:
    p, c, k = _count(prompt), _count(completion), _count(cached)
    if p is None or c is None or k is None:
        return None
    return Usage(prompt_tokens=p, completion_tokens=c, cached_tokens=k)


class _Body(msgspec.Struct):
    usage: _Usage | None = None
    choices: msgspec.Raw = msgspec.Raw(b"null")  # not typed: billing only asks whether it is empty

    def no_choices(self) -> bool:
        """True when no choice carries content, tool calls, a finish reason or logprobs (LiteLLM's usage
        chunk has ``choices: [{"index":0,"delta":{}}]``): a chunk the client would not miss."""
        raw = bytes(self.choices)
        if raw.replace(b" ", b"") in (b"[]", b"null"):
            return True
        try:
            choices = _choices_decoder.decode(raw)
        except msgspec.MsgspecError:
            return False  # an unexpected shape: relay it rather than guess
        return not any(choice.carries() for choice in choices)


class _Delta(msgspec.Struct):
    content: object = None
    tool_calls: object = None
    function_call: object = None
    refusal: object = None
    reasoning_content: object = None


class _Choice(msgspec.Struct):
    delta: _Delta | None = None
    message: _Delta | None = None
    text: object = None
    finish_reason: object = None
    logprobs: object = None

    def carries(self) -> bool:
        parts = [self.text, self.finish_reason, self.logprobs]
        for delta in (self.delta, self.message):
            if delta is not None:
                parts += [delta.content, delta.tool_calls, delta.function_call, delta.refusal]
                parts.append(delta.reasoning_content)
        return any(part not in (None, "", [], {}) for part in parts)


_choices_decoder = msgspec.json.Decoder(list[_Choice])


class _ResponseEvent(msgspec.Struct):
    type: str = ""
    response: _Body | None = None


_body_decoder = msgspec.json.Decoder(_Body)
_event_decoder = msgspec.json.Decoder(_ResponseEvent)


def usage_from_body(body: bytes) -> Usage | None:
    """Usage from a whole JSON response body (any metered route), or None when it has none."""
    try:
        parsed = _body_decoder.decode(body)
    except msgspec.MsgspecError:
        return None
    return parsed.usage.to_usage() if parsed.usage else None


def split_event(event: bytes) -> bytes:
    """The data of one SSE event (``data:`` lines joined by newlines)."""
    line = event.rstrip(b"\r\n")
    if line.startswith(b"data: ") and b"\n" not in line and b"\r" not in line:
        return line[6:]  # the usual event: one data line
    lines = []
    for line in event.splitlines():
        if line.startswith(b"data:"):
            value = line[5:]
            lines.append(value[1:] if value.startswith(b" ") else value)
    return b"\n".join(lines)


class SSEReader:
    """Splits a byte stream into whole SSE events (terminator included, so relaying is byte-identical)
    and watches them for usage.

    ``feed`` returns the events to relay. With ``strip_usage_chunk`` the chat/completions usage chunk
    (``choices: []`` with a usage object), which the sidecar asked for on the client's behalf, is
    recorded but not returned.
    """

    def __init__(self, *, strip_usage_chunk: bool = False, kind: str = "chat") -> None:
        self._buffer = b""
        self.responses = kind == "responses"  # the decoder is chosen by route, never by the content
        self.strip_usage_chunk = strip_usage_chunk
        self.usage: Usage | None = None
        self.data_events = 0  # events carrying data other than [DONE]: about one token each
        self.done = False  # [DONE] or the Responses final event seen: no later usage to wait for

    def feed(self, chunk: bytes) -> list[bytes]:
        if not self._buffer and _one_lf_event(chunk):  # the usual read: no scan for ends needed
            return [chunk] if self._watch(chunk) else []
        buffer = self._buffer + chunk if self._buffer else chunk
        events: list[bytes] = []
        start = 0
        while True:
            end = _event_end(buffer, start)
            if end < 0:
                break
            event = buffer[start:end]
            start = end
            if self._watch(event):
                events.append(event)
        self._buffer = buffer[start:]
        return events

    def flush(self) -> bytes:
        """Whatever is left unterminated when the stream ends: read for usage like any event, and
        relayed as is (unless it is a withheld usage chunk)."""
        rest, self._buffer = self._buffer, b""
        if rest and not self._watch(rest):
            return b""
        return rest

    def _watch(self, event: bytes) -> bool:
        """Record usage carried by the event; False when the event is to be withheld from the client."""
        if b"data:" not in event:
            return True
        data = split_event(event)
        if not data:
            return True
        if data == b"[DONE]":
            self.done = True
            return True
        self.data_events += 1
        keys = data.count(b'"usage"')
        if not keys:
            return True
        if self.responses:
            try:
                parsed = _event_decoder.decode(data)
            except msgspec.MsgspecError:
                return True
            if parsed.type in ("response.completed", "response.incomplete") and parsed.response is not None:
                usage = parsed.response.usage
                self.usage = usage.to_usage() if usage else self.usage
                self.done = True
            return True
        if keys == data.count(b'"usage":null'):
            # OpenAI's `"usage":null` on every token chunk: no usage here, nothing to decode. (A `"usage"`
            # not followed by `:null` — a value, or other spacing — is decoded below.)
            return True
        try:
            chunk = _body_decoder.decode(data)
        except msgspec.MsgspecError:
            return True
        if chunk.usage is None:
            return True
        self.usage = chunk.usage.to_usage() or self.usage
        self.data_events -= 1  # the usage chunk carries no tokens of its own
        return not (self.strip_usage_chunk and chunk.no_choices())


def _one_lf_event(chunk: bytes) -> bool:
    """Whether `chunk` is exactly one whole event with LF line ends (its only blank line at its end)."""
    return (
        len(chunk) > 2 and chunk.find(b"\n\n") == len(chunk) - 2 and chunk[0] != 0x0A and b"\r" not in chunk
    )


def _event_end(buffer: bytes, start: int) -> int:
    r"""Index just past the blank line that ends the event starting at ``start``, or -1.

    Lines end in LF, CRLF or CR (the SSE spec), so an event ends where a line end is followed by an
    empty line: "\n\n", "\n\r" or "\r\r" (a CRLF line end is covered by its LF, and a CR blank line
    takes the LF after it, when one is there, as its CRLF: an event whose CR blank line is the last byte
    so far waits for the next). The earliest such end wins."""
    lead = buffer[start : start + 1]
    if lead == b"\n":  # an empty line right after the last event's end: an empty event of its own
        return start + 1
    if lead == b"\r":
        if start + 1 == len(buffer):
            return -1
        return start + 2 if buffer[start + 1] == 0x0A else start + 1
    end = buffer.find(b"\n\n", start)
    # The common case: no "\r" before that "\n\n" (or at all, without one), so no other end comes first.
    first_cr = buffer.find(b"\r", start, end if end >= 0 else len(buffer))
    if first_cr < 0:
        return end + 2 if end >= 0 else -1
    best = end if end >= 0 else len(buffer)  # where the earliest end found so far starts
    stop = end + 2 if end >= 0 else -1
    for terminator in (b"\n\r", b"\r\r"):
        index = buffer.find(terminator, max(first_cr - 1, start), best)
        if index >= 0:
            best, stop = index, index + 2
    if stop >= 0 and buffer[stop - 1] == 0x0D:  # a CR blank line: its CRLF if an LF follows
        if stop == len(buffer):
            return -1  # not known yet: wait for the next byte (the end of the stream flushes it)
        if buffer[stop] == 0x0A:
            stop += 1
    return stop
