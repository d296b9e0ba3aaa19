"""A vault record's faces: the body a client posts (checked, never quoting the key), what a listing shows
(never the key, its last four characters only), and an account's opened keys for the request path."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator, Mapping
from typing import Any

import msgspec

from ..errors import BadRequest, ServiceUnavailable

MIN_KEY_CHARS, MAX_KEY_CHARS = 8, 4096
MAX_LABEL_CHARS = 100


class KeyBody(msgspec.Struct, forbid_unknown_fields=True):
    provider: str
    key: str
    label: str | None = None


class VaultKeyUnavailable(ServiceUnavailable):
    default_code = "vault_key_unavailable"

    def __init__(self, provider: str, reason: str) -> None:
        super().__init__(
            f"The account's stored key for provider {provider!r} cannot be opened by this gateway "
            f"({reason}); the request was not sent. Store the key again or ask the operator.",
            param="provider",
        )


class StoredKeys(Mapping[str, str]):
    """An account's opened keys by provider; a provider whose key did not open raises
    VaultKeyUnavailable when asked for (never a KeyError: that would send the pooled key)."""

    __slots__ = ("_broken", "_opened")

    def __init__(self, opened: dict[str, str], broken: dict[str, str]) -> None:
        self._opened, self._broken = opened, broken

    def __getitem__(self, provider: str) -> str:
        reason = self._broken.get(provider)
        if reason is not None:
            raise VaultKeyUnavailable(provider, reason)
        return self._opened[provider]

    def __iter__(self) -> Iterator[str]:
        return iter([*self._opened, *self._broken])

    def __len__(self) -> int:
        return len(self._opened) + len(self._broken)

    def __repr__(self) -> str:  # never the keys
        return f"StoredKeys(providers={sorted(self)!r})"


NO_KEYS = StoredKeys({}, {})


def _when(value: dt.datetime) -> str:
    return value.astimezone(dt.UTC).isoformat().replace("+00:00", "Z")


def view(row: Any) -> dict[str, Any]:
    """What a listing shows of a record: never the key, only its last four characters."""
    return {
        "object": "llm_key",
        "id": row["id"],
        "provider": row["provider"],
        "label": row["label"],
        "last4": row["last4"],
        "created_at": _when(row["created_at"]),
        "updated_at": _when(row["updated_at"]),
    }


def checked(body: KeyBody, providers: frozenset[str]) -> tuple[str, str, str | None]:
    """(provider, key, label), or a 400 naming the first bad field (never quoting the key)."""
    if body.provider not in providers:
        known = ", ".join(sorted(providers))
        raise BadRequest(
            f"provider must be the provider of a configured upstream: one of {known}.", param="provider"
        )
    key = body.key
    if not MIN_KEY_CHARS <= len(key) <= MAX_KEY_CHARS or not all("!" <= c <= "~" for c in key):
        raise BadRequest(
            f"key must be {MIN_KEY_CHARS}-{MAX_KEY_CHARS} visible ASCII characters (no spaces).", param="key"
        )
    label = body.label.strip() if body.label is not None else None
    if label is not None and (
        len(label) > MAX_LABEL_CHARS or any(c < " " or c == "\x7f" for c in label) or not _encodable(label)
    ):
        raise BadRequest(
            f"label must be at most {MAX_LABEL_CHARS} characters, no control characters.", param="label"
        )
    return body.provider, key, label or None


def _encodable(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True
