"""The signal delivery settings, a part of `config.Settings` (which inherits these fields; they are
documented in the README's "Signals: delivery" section). Checked when the settings are built: an error
names the setting, never a secret's value."""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

from ..errors import ConfigError
from ..payments.settings import PaymentSettings

Seconds = Annotated[float, msgspec.Meta(gt=0, le=86_400)]


class SignalSettings(PaymentSettings, kw_only=True):
    # (msgspec structs take one base with fields: the settings parts are chained, payments first)
    # The webhook channel: where events are POSTed (unset: no webhook channel), the secret that signs
    # them (required with the URL; never logged or returned), which event types go (empty: all), and
    # how long one POST may take.
    signal_webhook_url: str | None = None
    signal_webhook_secret: str | None = None
    signal_webhook_events: list[str] = msgspec.field(default_factory=list)
    signal_webhook_timeout_seconds: Seconds = 10.0
    # The email channel: the SMTP server (unset: no email channel), its login, the transport security
    # ("starttls", "tls" from the first byte, or "none"), the sender, the operator's address (every
    # event; optional), whether an account's own contact address gets its events, which event types go.
    smtp_host: str | None = None
    smtp_port: Annotated[int, msgspec.Meta(ge=1, le=65535)] = 587
    smtp_username: str | None = None
    smtp_password: str | None = None
    smtp_security: Literal["starttls", "tls", "none"] = "starttls"
    smtp_from: str = "creditgate@localhost"
    smtp_timeout_seconds: Seconds = 30.0
    alert_email_to: str | None = None
    signal_email_contacts: bool = True
    signal_email_events: list[str] = msgspec.field(default_factory=list)
    # Retries: how long a delivery is retried before it is given up (at least a day), the first retry's
    # delay and the most any delay grows to (doubling in between, with jitter); how often the worker
    # looks for due deliveries, and how many it sends at once.
    signal_retry_hours: Annotated[int, msgspec.Meta(ge=24, le=24 * 30)] = 24
    signal_backoff_base_seconds: Seconds = 30.0
    signal_backoff_cap_seconds: Seconds = 3600.0
    signal_delivery_interval_seconds: Seconds = 5.0
    signal_delivery_batch: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 50

    def __post_init__(self) -> None:
        check_signal_settings(self)


def check_signal_settings(s: SignalSettings) -> None:
    """ConfigError, naming the setting, for a channel that cannot work as configured."""
    if s.signal_webhook_url is not None:
        if not s.signal_webhook_url.startswith(("http://", "https://")):
            raise ConfigError("signal_webhook_url must be an http(s) URL.", param="signal_webhook_url")
        if not s.signal_webhook_secret:
            raise ConfigError(
                "signal_webhook_secret is required when signal_webhook_url is set (it signs each POST).",
                param="signal_webhook_secret",
            )
    if s.signal_backoff_cap_seconds < s.signal_backoff_base_seconds:
        raise ConfigError(
            "signal_backoff_cap_seconds must be at least signal_backoff_base_seconds.",
            param="signal_backoff_cap_seconds",
        )
    if (s.smtp_username is None) != (s.smtp_password is None):
        raise ConfigError(
            "smtp_username and smtp_password are set together (or neither).", param="smtp_password"
        )
    for setting in ("smtp_from", "alert_email_to"):
        address = getattr(s, setting)
        if address is not None and not plausible_address(address):
            raise ConfigError(f"{setting} must be an email address.", param=setting)


def plausible_address(address: str) -> bool:
    """An address an SMTP server may take: one @, no spaces or line breaks, at most 254 characters."""
    local, at, domain = address.partition("@")
    bare = all(c.isprintable() and not c.isspace() and c not in "<>,;" for c in address)
    return bool(at) and bool(local) and bool(domain) and "@" not in domain and bare and len(address) <= 254
