"""A request's attribution, read at admission: its tags (the tags header) and its end user (the OpenAI
`user` field), each checked, a malformed one a 400 naming it. Pure: no I/O."""

from __future__ import annotations

import re
from collections.abc import Mapping

import msgspec

from ..errors import BadRequest
from ..wire import MeteredRequest

MAX_TAGS = 8
MAX_USER_CHARS = 256
_TAG_PART = re.compile(r"[A-Za-z0-9_.:-]{1,64}\Z")
_text = msgspec.json.Decoder(str)


def tags_of(headers: Mapping[str, str], header: str) -> tuple[str, ...]:
    """The tags header's "k=v,k=v" (at most MAX_TAGS, keys unique, each part 1-64 of A-Z a-z 0-9 _ . : -),
    as "k=v" strings; a malformed header is a 400 naming it."""
    raw = headers.get(header, "").strip()
    if not raw:
        return ()
    tags: list[str] = []
    seen: set[str] = set()
    for item in raw.split(","):
        key, eq, value = item.strip().partition("=")
        if not eq or not _TAG_PART.match(key) or not _TAG_PART.match(value) or key in seen:
            raise BadRequest(
                f"The {header} header takes up to {MAX_TAGS} comma-separated key=value tags, each key "
                "(unique) and value 1-64 characters of A-Z a-z 0-9 _ . : -.",
                param=header,
            )
        seen.add(key)
        tags.append(f"{key}={value}")
    if len(tags) > MAX_TAGS:
        raise BadRequest(f"The {header} header has {len(tags)} tags; at most {MAX_TAGS}.", param=header)
    return tuple(tags)


def end_user_of(request: MeteredRequest) -> str | None:
    """The OpenAI `user` field when it is a string (another type is the upstream's to refuse): at most
    MAX_USER_CHARS characters of text Postgres can store, else a 400 naming `user`."""
    raw = bytes(request.user)
    if not raw.startswith(b'"'):
        return None
    user = _text.decode(raw)
    if not user:
        return None
    if len(user) > MAX_USER_CHARS or "\x00" in user or "\n" in user or not _encodable(user):
        raise BadRequest(
            f"user must be at most {MAX_USER_CHARS} characters of text (no NUL or newline).", param="user"
        )
    return user


def _encodable(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:  # a JSON lone-surrogate escape
        return False
    return True
