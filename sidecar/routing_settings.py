"""The routing settings (README "Routing and fallback" documents each), a part of `config.Settings`: this
block stands in the chain of bases (msgspec takes one base with fields per Struct): Settings inherits it,
it inherits the document settings."""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

from .documents.document_settings import DocumentSettings


class RoutingSettings(DocumentSettings, kw_only=True):
    # The most upstream calls one request makes over its candidates, the fallback failures in a row that
    # cool a candidate down, for how long, and the order (unset per model: this).
    routing_max_attempts: Annotated[int, msgspec.Meta(ge=1, le=10)] = 3
    routing_failures_to_cool: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 3
    routing_cooldown_seconds: Annotated[float, msgspec.Meta(gt=0)] = 30.0
    routing_order: Literal["priority", "cost"] = "priority"
