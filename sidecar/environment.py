"""Settings from ``CREDITGATE_*`` environment variables: scalars as text, lists comma-separated or JSON,
the tables (``models``, ``upstreams``) as JSON; and the Kubernetes service-link variables that are not
settings at all."""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping
from typing import Any

import msgspec

from .errors import ConfigError

ENV_PREFIX = "CREDITGATE_"
STRUCTURED = {"models", "upstreams", "packages", "payment_webhooks", "operations"}
MAPPINGS = {"vault_previous_keys"}  # plain mappings of text, as JSON
# From the environment: comma-separated, or JSON.
_LISTS = {
    "alert_top_up_percents",
    "cache_routes",
    "forward_request_headers",
    "relay_response_headers",
    "signal_email_events",
    "signal_webhook_events",
    "stripe_webhook_secrets",
    "tax_rules",
    "top_up_amounts",
}


# Kubernetes injects docker-style "service links" into every pod for each Service in the namespace: for a
# Service named creditgate (or creditgate-x) they start with CREDITGATE_ and one, CREDITGATE_PORT, has the
# name of a real setting. They are recognised by name or by their tcp://host:port value and ignored.
_LINK_VALUE = re.compile(r"^(tcp|udp|sctp)://[^/\s]+:[0-9]+$")
_LINK_NAME = re.compile(
    r"^(?:[a-z0-9_]+_)?(?:service_host|service_port(?:_[a-z0-9_]+)?|port_[0-9]+_(?:tcp|udp|sctp)"
    r"(?:_addr|_port|_proto)?)$"
)


def service_links(environ: Mapping[str, str], known: Collection[str]) -> list[str]:
    """The CREDITGATE_* variables that are Kubernetes service links, not settings (ignored by the loader)."""
    return sorted(
        name
        for name, value in environ.items()
        if name.startswith(ENV_PREFIX) and _is_service_link(name[len(ENV_PREFIX) :].lower(), value, known)
    )


def _is_service_link(field: str, value: str, known: Collection[str]) -> bool:
    if _LINK_VALUE.match(value.strip()):
        return True  # no setting takes a tcp:// value: CREDITGATE_PORT=tcp://10.96.0.12:8080 is a link
    return field not in known and bool(_LINK_NAME.match(field))


def from_env(environ: Mapping[str, str], known: Collection[str]) -> dict[str, Any]:
    """The settings given as CREDITGATE_* variables (`known`: the settings' names), raw; service links
    are skipped, an unknown name raises ConfigError."""
    raw: dict[str, Any] = {}
    for name, value in environ.items():
        if not name.startswith(ENV_PREFIX) or name == ENV_PREFIX + "CONFIG":
            continue
        field = name[len(ENV_PREFIX) :].lower()
        if _is_service_link(field, value, known):
            continue
        if field not in known:
            raise ConfigError(f"Unknown setting {name}.", param=name)
        if field in STRUCTURED or field in MAPPINGS or (field in _LISTS and value.lstrip().startswith("[")):
            try:
                raw[field] = msgspec.json.decode(value)
            except msgspec.DecodeError as exc:
                raise ConfigError(f"{name} must be JSON: {exc}", param=name) from None
            except RecursionError:  # msgspec's own depth limit
                raise ConfigError(f"{name} nests JSON too deeply.", param=name) from None
        elif field in _LISTS:
            raw[field] = [item.strip() for item in value.split(",") if item.strip()]
        else:
            raw[field] = value
    return raw
