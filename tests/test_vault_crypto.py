"""The vault's sealing, at the function level: a round trip; a fresh nonce on every seal (none repeats
over 10,000 seals of one key under one master key); altered bytes, the wrong master key and associated
data of another account, provider or record (a record moved) do not open; the master key settings are
checked, each error naming its setting, and never shown."""

from __future__ import annotations

import base64
import os
from pathlib import Path

import pytest

from sidecar.config import load_settings
from sidecar.errors import ConfigError
from sidecar.logs import Redactor, secrets_of
from sidecar.vault.crypto import NONCE_BYTES, CannotOpen, KeyRing, associated_data, open_sealed, seal
from sidecar.vault.settings import key_ring

MASTER = os.urandom(32)
OTHER = os.urandom(32)
KEY = "sk-customer-own-provider-key-0123456789"
AAD = associated_data("acct-1", "openai", "lk_0001")


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def test_a_sealed_key_opens_with_its_master_key_and_associated_data() -> None:
    nonce, sealed = seal(MASTER, KEY, AAD)
    assert len(nonce) == NONCE_BYTES
    assert KEY.encode() not in sealed
    assert len(sealed) == len(KEY) + 16  # the ciphertext and GCM's 16-byte tag
    assert open_sealed(MASTER, nonce, sealed, AAD) == KEY


def test_every_seal_takes_a_fresh_nonce() -> None:
    sealed = [seal(MASTER, KEY, AAD) for _ in range(10_000)]
    assert len({nonce for nonce, _ in sealed}) == 10_000
    assert len({ciphertext for _, ciphertext in sealed}) == 10_000  # same key, same data: all differ


@pytest.mark.parametrize("where", ["nonce", "ciphertext", "tag"])
def test_altered_bytes_do_not_open(where: str) -> None:
    nonce, sealed = seal(MASTER, KEY, AAD)
    if where == "nonce":
        nonce = bytes([nonce[0] ^ 1]) + nonce[1:]
    elif where == "ciphertext":
        sealed = bytes([sealed[0] ^ 1]) + sealed[1:]
    else:
        sealed = sealed[:-1] + bytes([sealed[-1] ^ 1])
    with pytest.raises(CannotOpen):
        open_sealed(MASTER, nonce, sealed, AAD)


@pytest.mark.parametrize(
    "moved",
    [("acct-2", "openai", "lk_0001"), ("acct-1", "anthropic", "lk_0001"), ("acct-1", "openai", "lk_0002")],
    ids=["another-account", "another-provider", "another-record"],
)
def test_a_record_moved_elsewhere_does_not_open(moved: tuple[str, str, str]) -> None:
    nonce, sealed = seal(MASTER, KEY, AAD)
    with pytest.raises(CannotOpen):
        open_sealed(MASTER, nonce, sealed, associated_data(*moved))


def test_associated_data_cannot_be_shifted_between_fields() -> None:
    assert associated_data("a", "bc", "d") != associated_data("ab", "c", "d")


def test_the_wrong_master_key_does_not_open() -> None:
    nonce, sealed = seal(MASTER, KEY, AAD)
    with pytest.raises(CannotOpen):
        open_sealed(OTHER, nonce, sealed, AAD)


def test_a_ring_seals_under_its_current_key_and_opens_with_any() -> None:
    old = KeyRing("k1", {"k1": MASTER})
    new = KeyRing("k2", {"k2": OTHER, "k1": MASTER})
    kid, nonce, sealed = old.seal(KEY, AAD)
    assert kid == "k1"
    assert new.open(kid, nonce, sealed, AAD) == KEY
    kid2, nonce2, sealed2 = new.seal(KEY, AAD)
    assert kid2 == "k2"
    with pytest.raises(CannotOpen, match="'k2'"):
        old.open(kid2, nonce2, sealed2, AAD)
    assert b64(MASTER) not in repr(new)
    assert repr(MASTER) not in repr(new)


def test_the_master_key_settings(tmp_path: Path) -> None:
    assert key_ring(load_settings(environ={})) is None
    env = {"CREDITGATE_VAULT_MASTER_KEY": b64(MASTER)}
    ring = key_ring(load_settings(environ=env))
    assert ring is not None
    assert ring.current_id == "k1"
    assert ring.keys == {"k1": MASTER}
    file = tmp_path / "master.key"
    file.write_text(b64(OTHER) + "\n")
    previous = f'{{"k1": "{b64(MASTER)}"}}'
    env = {
        "CREDITGATE_VAULT_MASTER_KEY_FILE": str(file),
        "CREDITGATE_VAULT_MASTER_KEY_ID": "k2",
        "CREDITGATE_VAULT_PREVIOUS_KEYS": previous,
    }
    ring = key_ring(load_settings(environ=env))
    assert ring is not None
    assert ring.current_id == "k2"
    assert ring.keys == {"k2": OTHER, "k1": MASTER}
    assert ring.current_setting == "vault_master_key_file"
    # The log's redactor knows every master key, from the file too.
    redact = Redactor(secrets_of(load_settings(environ=env)))
    assert redact(f"x {b64(OTHER)} {b64(MASTER)}") == "x [redacted] [redacted]"


@pytest.mark.parametrize(
    ("env", "setting"),
    [
        ({"CREDITGATE_VAULT_MASTER_KEY": "not base64!"}, "vault_master_key"),
        ({"CREDITGATE_VAULT_MASTER_KEY": b64(os.urandom(16))}, "vault_master_key"),  # AES-128: refused
        ({"CREDITGATE_VAULT_MASTER_KEY_FILE": "/nonexistent/master.key"}, "vault_master_key_file"),
        (
            {"CREDITGATE_VAULT_MASTER_KEY": b64(MASTER), "CREDITGATE_VAULT_MASTER_KEY_FILE": "/x"},
            "vault_master_key_file",
        ),
        (
            {"CREDITGATE_VAULT_MASTER_KEY": b64(MASTER), "CREDITGATE_VAULT_MASTER_KEY_ID": "a b"},
            "vault_master_key_id",
        ),
        (
            {"CREDITGATE_VAULT_MASTER_KEY": b64(MASTER), "CREDITGATE_VAULT_PREVIOUS_KEYS": '{"k0": "short"}'},
            "vault_previous_keys.k0",
        ),
        (
            {
                "CREDITGATE_VAULT_MASTER_KEY": b64(MASTER),
                "CREDITGATE_VAULT_PREVIOUS_KEYS": f'{{"k1": "{b64(OTHER)}"}}',
            },
            "vault_previous_keys",
        ),
        ({"CREDITGATE_VAULT_PREVIOUS_KEYS": f'{{"k0": "{b64(OTHER)}"}}'}, "vault_master_key"),
    ],
    ids=[
        "not-base64",
        "16-bytes",
        "no-file",
        "both",
        "bad-id",
        "bad-previous",
        "previous-is-current",
        "no-current",
    ],
)
def test_bad_master_key_settings_are_named(env: dict[str, str], setting: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(environ=env)
    assert caught.value.param == setting
    assert setting in caught.value.message
    for value in env.values():
        if len(value) > 20 and not value.startswith(("/", "{")):
            assert value not in caught.value.message  # a key is never quoted back
