"""Sealing a provider key: AES-256-GCM (the `cryptography` package's AESGCM), a fresh random 96-bit
nonce for every seal, and associated data that binds the sealed key to its account, provider and
record id, so a sealed key copied to another account, provider or record does not open.

A `KeyRing` holds the master keys by id: the current one seals, any of them opens (the records carry
the id of the key that sealed them; rotation moves them to the current one)."""

from __future__ import annotations

import base64
import binascii
import os
from dataclasses import dataclass, field

import msgspec
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ..errors import ConfigError

NONCE_BYTES = 12  # 96 bits: GCM's own nonce size
KEY_BYTES = 32  # AES-256
AAD_CONTEXT = "creditgate-vault/1"


class CannotOpen(Exception):
    """A sealed key that does not open: an unknown master key id, a wrong key, altered bytes, or
    associated data that is not the record's (it was moved). Carries no key material."""


def master_key_of(text: str, setting: str) -> bytes:
    """32 bytes from their base64 text (standard or URL-safe alphabet); ConfigError naming `setting`."""
    raw = text.strip().replace("-", "+").replace("_", "/")
    try:
        key = base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError):
        key = b""
    if len(key) != KEY_BYTES:
        raise ConfigError(
            f"{setting} must be the base64 of {KEY_BYTES} random bytes (e.g. `openssl rand -base64 32`).",
            param=setting,
        )
    return key


def associated_data(account: str, provider: str, record_id: str) -> bytes:
    """What a sealed key is bound to (a JSON array: no two triples encode alike)."""
    return msgspec.json.encode([AAD_CONTEXT, account, provider, record_id])


def seal(key: bytes, plaintext: str, aad: bytes) -> tuple[bytes, bytes]:
    """(nonce, ciphertext with its 16-byte tag); the nonce is fresh from os.urandom on every call."""
    nonce = os.urandom(NONCE_BYTES)
    return nonce, AESGCM(key).encrypt(nonce, plaintext.encode(), aad)


def open_sealed(key: bytes, nonce: bytes, sealed: bytes, aad: bytes) -> str:
    try:
        return AESGCM(key).decrypt(nonce, sealed, aad).decode()
    except (InvalidTag, ValueError, UnicodeDecodeError):
        raise CannotOpen("the sealed key does not open (wrong master key, altered, or moved)") from None


@dataclass(frozen=True)
class KeyRing:
    current_id: str
    keys: dict[str, bytes] = field(repr=False)  # id -> 32 bytes; never printed
    current_setting: str = "vault_master_key"  # where the current key came from (or ..._file)

    def seal(self, plaintext: str, aad: bytes) -> tuple[str, bytes, bytes]:
        """(the current key's id, nonce, sealed) of `plaintext`."""
        nonce, sealed = seal(self.keys[self.current_id], plaintext, aad)
        return self.current_id, nonce, sealed

    def open(self, key_id: str, nonce: bytes, sealed: bytes, aad: bytes) -> str:
        key = self.keys.get(key_id)
        if key is None:
            raise CannotOpen(f"sealed under master key id {key_id!r}, which this gateway does not have")
        return open_sealed(key, nonce, sealed, aad)
