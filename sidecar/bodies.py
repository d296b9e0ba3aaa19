"""JSON request bodies decoded into their msgspec Struct, or a 400 naming the offending field (a wrong,
unknown or missing one). Pure: no I/O."""

from __future__ import annotations

import re
from typing import Any

import msgspec

from .errors import BadRequest

_FIELD = re.compile(r"at `\$\.([A-Za-z_]+)|(?:unknown|required) field `([^`]+)`")


def decode(raw: bytes, kind: type[Any], what: str = "request body") -> Any:
    """`raw` (empty: `{}`) as a `kind`; a BadRequest "Invalid <what>: ..." with the field as its param."""
    try:
        return msgspec.json.decode(raw or b"{}", type=kind)
    except msgspec.ValidationError as exc:
        found = _FIELD.search(str(exc))
        field = next((g for g in found.groups() if g), None) if found else None
        raise BadRequest(f"Invalid {what}: {exc}", param=field) from None
    except msgspec.DecodeError as exc:
        raise BadRequest(f"The request body is not valid JSON: {exc}") from None
