"""The vault's settings, a part of `config.Settings` (the README's "The BYOK vault" documents each).
msgspec takes one base with fields per Struct, so this block stands in the chain of bases: Settings
inherits it, it inherits the routing settings."""

from __future__ import annotations

import contextlib
import re

import msgspec

from ..errors import ConfigError
from ..routing_settings import RoutingSettings
from .crypto import KeyRing, master_key_of

KEY_ID = re.compile(r"^[A-Za-z0-9_.-]{1,32}\Z")


class VaultSettings(RoutingSettings, kw_only=True):
    # The master key the vault seals customers' provider keys with: base64 of 32 random bytes, given
    # directly (CREDITGATE_VAULT_MASTER_KEY) or in a file (a mounted secret); unset: no vault writes.
    vault_master_key: str | None = None
    vault_master_key_file: str | None = None
    # The master key's id, stored with every record it seals (rotation moves records to the current id).
    vault_master_key_id: str = "k1"
    # Earlier master keys by id (base64 each), still opening the records not rotated yet.
    vault_previous_keys: dict[str, str] = msgspec.field(default_factory=dict)


def _read_file(path: str) -> str:
    try:
        with open(path, encoding="ascii") as file:
            return file.read().strip()
    except (OSError, UnicodeDecodeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
        raise ConfigError(
            f"vault_master_key_file: cannot read {path}: {why}", param="vault_master_key_file"
        ) from None


def key_ring(settings: VaultSettings) -> KeyRing | None:
    """The master keys by id (the current one first), or None when no master key is configured;
    ConfigError naming the setting for a bad one."""
    if settings.vault_master_key is not None and settings.vault_master_key_file is not None:
        raise ConfigError(
            "Set one of vault_master_key and vault_master_key_file, not both.", param="vault_master_key_file"
        )
    for key_id, where in [
        (settings.vault_master_key_id, "vault_master_key_id"),
        *((k, f"vault_previous_keys.{k}") for k in settings.vault_previous_keys),
    ]:
        if not KEY_ID.match(key_id):
            raise ConfigError(
                f"{where}: a master key id is 1-32 characters of A-Z a-z 0-9 _ . -", param=where
            )
    if settings.vault_master_key_id in settings.vault_previous_keys:
        raise ConfigError(
            f"vault_previous_keys names {settings.vault_master_key_id!r}, the current vault_master_key_id.",
            param="vault_previous_keys",
        )
    previous = {
        key_id: master_key_of(text, f"vault_previous_keys.{key_id}")
        for key_id, text in settings.vault_previous_keys.items()
    }
    if settings.vault_master_key_file is not None:
        setting = "vault_master_key_file"
        current = master_key_of(_read_file(settings.vault_master_key_file), setting)
    elif settings.vault_master_key is not None:
        setting = "vault_master_key"
        current = master_key_of(settings.vault_master_key, setting)
    else:
        if previous:
            raise ConfigError(
                "vault_previous_keys is set but no current master key: set vault_master_key or "
                "vault_master_key_file.",
                param="vault_master_key",
            )
        return None
    keys = {settings.vault_master_key_id: current, **previous}
    return KeyRing(settings.vault_master_key_id, keys, setting)


def check_vault_settings(settings: VaultSettings) -> None:
    key_ring(settings)


def master_key_texts(settings: VaultSettings) -> list[str]:
    """The master keys as configured (base64 text), for the log's redactor; a file that cannot be read
    gives nothing (startup stops on it anyway)."""
    found = [settings.vault_master_key or "", *settings.vault_previous_keys.values()]
    if settings.vault_master_key_file is not None:
        with contextlib.suppress(ConfigError):
            found.append(_read_file(settings.vault_master_key_file))
    return [text for text in found if text]
