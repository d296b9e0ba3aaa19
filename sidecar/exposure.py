"""What is exposed where: checks of the listeners' settings (see config.load_settings)."""

from __future__ import annotations

import ipaddress
from typing import TYPE_CHECKING

from .errors import ConfigError

if TYPE_CHECKING:
    from .config import Settings

ACCOUNT_SECRET_HEADER = "x-creditgate-account-secret"
MIN_SECRET_LENGTH = 16


def is_loopback(host: str) -> bool:
    """Whether a listen address is reachable from this host only: 127.0.0.0/8, ::1 or localhost."""
    bare = host.strip().strip("[]").lower()
    if bare == "localhost":
        return True
    try:
        return ipaddress.ip_address(bare).is_loopback
    except ValueError:
        return False  # another name, or "" (all addresses): may be reachable from elsewhere


def check_listeners(settings: Settings, ops: int | None) -> None:
    """What is exposed where: a trusted account header on a reachable listener needs its secret."""
    secret = settings.account_header_secret
    if secret is not None and len(secret) < MIN_SECRET_LENGTH:
        raise ConfigError(
            f"account_header_secret must be at least {MIN_SECRET_LENGTH} characters.",
            param="account_header_secret",
        )
    if settings.account_header and not secret and not is_loopback(settings.host):
        raise ConfigError(
            f"account_header is set and host {settings.host!r} is not a loopback address, so anything "
            "that reaches the listener could bill any account with one header: set account_header_secret "
            f"(requests naming an account must then carry it in {ACCOUNT_SECRET_HEADER}), or set host to "
            "127.0.0.1.",
            param="account_header",
        )
    if ops is not None and ops != 0 and ops == settings.port:
        raise ConfigError(
            f"ops_port and port are both {ops}: the ops listener needs a port of its own.", param="ops_port"
        )
