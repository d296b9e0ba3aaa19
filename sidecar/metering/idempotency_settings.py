"""The settings of Idempotency-Key on inference, a part of `config.Settings` (documented in the README,
section "Idempotency-Key"). msgspec takes one base with fields per Struct, so this block stands in the
chain of bases: Settings inherits it, it inherits the payment settings."""

from __future__ import annotations

from typing import Annotated

import msgspec

from .settings import MeteringSettings


class IdempotencySettings(MeteringSettings, kw_only=True):
    # Idempotency-Key on the metered routes: whether the header is honoured (off: it is ignored), how long
    # an answer is kept for a retry, and how long a retry waits in this process for the first request
    # with its key to be answered (then a 409: in progress).
    idempotency_enabled: bool = True
    idempotency_ttl_seconds: Annotated[int, msgspec.Meta(ge=1)] = 86_400
    idempotency_wait_seconds: Annotated[float, msgspec.Meta(gt=0)] = 60.0
