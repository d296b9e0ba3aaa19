"""The portal's settings, a part of `config.Settings` (README "Billing portal" documents each). msgspec
takes one base with fields per Struct, so this block stands in the chain of bases: Settings inherits it,
it inherits the vault's settings."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import msgspec

from ..vault.settings import VaultSettings

if TYPE_CHECKING:
    from ..config import Settings

DAY_SECONDS = 86_400


class PortalSettings(VaultSettings, kw_only=True):
    # Whether /portal is routed on the API listener; unset: on in standalone mode, off in sidecar mode.
    portal_enabled: bool | None = None
    # A signed-in session ends this long after its last page (a sign-out, or its key revoked, ends it
    # at once).
    portal_session_seconds: Annotated[int, msgspec.Meta(ge=60, le=30 * DAY_SECONDS)] = 3600
    # A session also ends this long after it was opened, however busy (its key must be posted again).
    portal_session_max_seconds: Annotated[int, msgspec.Meta(ge=60, le=30 * DAY_SECONDS)] = 12 * 3600
    # The session cookie's Secure attribute; unset: when the request came over TLS. Set it true behind
    # a proxy that ends TLS (the sidecar then sees plain HTTP).
    portal_secure_cookie: bool | None = None
    # Failed sign-ins (client key or admin token) one client address may make in a fixed window of
    # portal_signin_window_seconds; past them the sign-in page answers 429 without checking the key.
    portal_signin_attempts: Annotated[int, msgspec.Meta(ge=1, le=10_000)] = 10
    portal_signin_window_seconds: Annotated[int, msgspec.Meta(ge=1, le=DAY_SECONDS)] = 600


def portal_on(settings: Settings) -> bool:
    """Whether /portal is routed: `portal_enabled`, or by `mode` when it is unset."""
    if settings.portal_enabled is not None:
        return settings.portal_enabled
    return settings.mode == "standalone"
