"""What the request path asks of the BYOK vault: an account's stored provider keys, by provider.

The vault (sidecar/vault) implements it; the gateway takes any object that has the method, so the
request path does not import the vault, and a sidecar without one passes none.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol


class OwnKeys(Protocol):
    async def keys_of(self, account: str) -> Mapping[str, str]:
        """The account's provider keys in plain text, by provider name (empty: none). Read from Redis
        (never Postgres) through a short in-process cache."""
        ...
