"""The structured settings: the price table's models and the upstreams they go to."""

from __future__ import annotations

import os
from typing import Annotated, Literal

import msgspec

PositiveInt = Annotated[int, msgspec.Meta(ge=1)]
NonNegativeInt = Annotated[int, msgspec.Meta(ge=0)]
RoutingOrder = Literal["priority", "cost"]


class RouteConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """One upstream candidate of a model (README "Routing and fallback"): the upstream, the name the model
    has there (unset: the model's own), its priority (lower first; unset: its position in the list) and
    weight among candidates of one priority, and the customer's price when it serves (each price field
    unset: the model's)."""

    upstream: str
    model: Annotated[str, msgspec.Meta(min_length=1, max_length=200)] | None = None
    priority: Annotated[int, msgspec.Meta(ge=0, le=1_000_000)] | None = None
    weight: Annotated[int, msgspec.Meta(ge=1, le=1_000_000)] = 1
    prompt: str | None = None
    completion: str | None = None
    cached_prompt: str | None = None
    request_fee: str | None = None


class CostRates(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """What a provider charges the operator for one model, read like prices: decimal strings of credits
    per 1K tokens (the fee per request); unset cached_prompt: cached tokens cost the prompt rate."""

    prompt: str
    completion: str = "0"
    cached_prompt: str | None = None
    request_fee: str = "0"


class CostProfile(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """An upstream's provider cost profile: rates by the model name sent to it, else the default (neither:
    the cost of its requests is unknown, NULL in the ledger)."""

    default: CostRates | None = None
    models: dict[str, CostRates] = msgspec.field(default_factory=dict)


class ModelConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """One priced model. Prices are decimal strings of credits; 1 credit = 1,000,000 micro-credits."""

    prompt: str
    completion: str = "0"
    cached_prompt: str | None = None
    request_fee: str = "0"
    max_output_tokens: PositiveInt = 4096
    aliases: list[str] = msgspec.field(default_factory=list)
    upstream: str = "default"
    # The most input tokens one part whose tokens are not in the body's bytes can cost (unset: such a
    # part is refused with a 400): an image, an audio clip, a file; and for stored state (Responses'
    # previous_response_id, conversation, stored prompt, item references) the most it can add in all.
    image_input_tokens: NonNegativeInt | None = None
    audio_input_tokens: NonNegativeInt | None = None
    file_input_tokens: NonNegativeInt | None = None
    stored_input_tokens: NonNegativeInt | None = None
    # The upstream candidates, tried in order when one fails before answering (unset: `upstream` alone,
    # the model's name as the client sent it); and how they are ordered (unset: routing_order).
    routes: list[RouteConfig] | None = None
    routing_order: RoutingOrder | None = None


class UpstreamConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Where a model's requests go: an OpenAI-compatible base URL (ending in /v1) and the pooled key,
    with the organization and project it acts in (sent as OpenAI-Organization / OpenAI-Project on pooled
    calls; a client never chooses them)."""

    base_url: str
    api_key: str | None = None
    api_key_env: str | None = None
    organization: str | None = None
    project: str | None = None
    # Whose API this is, for the accounts' stored provider keys (the BYOK vault): unset, the upstream's
    # own name. Two upstreams of one provider (say two regions) share the vault key of that provider.
    provider: str | None = None
    # What the provider charges the operator (README "Provider costs and margins"); unset: unknown.
    costs: CostProfile | None = None

    def key(self) -> str | None:
        if self.api_key_env:
            return os.environ.get(self.api_key_env) or None
        return self.api_key


def default_models() -> dict[str, ModelConfig]:
    # Illustrative prices with 1 credit = 1 USD; operators replace this table in their config file.
    return {
        "gpt-4o-mini": ModelConfig(
            prompt="0.00015", completion="0.0006", cached_prompt="0.000075", max_output_tokens=16384
        ),
        "gpt-4o": ModelConfig(
            prompt="0.0025", completion="0.01", cached_prompt="0.00125", max_output_tokens=16384
        ),
        "gpt-4.1-mini": ModelConfig(
            prompt="0.0004", completion="0.0016", cached_prompt="0.0001", max_output_tokens=32768
        ),
        "gpt-3.5-turbo-instruct": ModelConfig(prompt="0.0015", completion="0.002", max_output_tokens=4096),
        "text-embedding-3-small": ModelConfig(prompt="0.00002", max_output_tokens=1),
    }
