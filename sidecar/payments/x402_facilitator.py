"""The x402 facilitator over HTTP: POST {url}/verify and {url}/settle, each with
``{x402Version, paymentPayload, paymentRequirements}`` (coinbase/x402 specs/x402-specification-v1.md 7.1-7.2,
specs/x402-specification-v2.md 7.1-7.2; the body python/x402/http/facilitator_client_base.py builds).

Not the `x402` PyPI package: its core pulls in pydantic and nest-asyncio (which patches the event loop) and
its async facilitator client needs httpx, a second HTTP stack beside aiohttp, for what is two JSON POSTs;
the exchange is spelled out here with aiohttp and msgspec instead."""

from __future__ import annotations

from typing import Any, TypeVar

import aiohttp
import msgspec

from ..errors import ServiceUnavailable
from .x402_wire import SettleResponse, VerifyResponse

T = TypeVar("T", VerifyResponse, SettleResponse)


class FacilitatorUnavailable(ServiceUnavailable):
    """The facilitator did not answer (down, timed out, an error status, not its JSON): nothing credited."""

    def __init__(self, step: str, why: str) -> None:
        super().__init__(
            f"The x402 facilitator did not answer {step} ({why}); nothing was credited, retry the payment.",
            code="facilitator_unavailable",
        )


class Facilitator:
    def __init__(self, session: aiohttp.ClientSession, url: str, timeout_seconds: float) -> None:
        self.session = session
        self.url = url.rstrip("/")
        self.timeout = aiohttp.ClientTimeout(total=timeout_seconds)

    async def verify(
        self, version: int, payload: dict[str, Any], requirements: dict[str, Any]
    ) -> VerifyResponse:
        return await self._post("verify", version, payload, requirements, VerifyResponse)

    async def settle(
        self, version: int, payload: dict[str, Any], requirements: dict[str, Any]
    ) -> SettleResponse:
        return await self._post("settle", version, payload, requirements, SettleResponse)

    async def _post(
        self, step: str, version: int, payload: dict[str, Any], requirements: dict[str, Any], into: type[T]
    ) -> T:
        body = {"x402Version": version, "paymentPayload": payload, "paymentRequirements": requirements}
        try:
            async with self.session.post(
                f"{self.url}/{step}",
                data=msgspec.json.encode(body),
                headers={"Content-Type": "application/json"},
                timeout=self.timeout,
            ) as resp:
                raw = await resp.read()
                if resp.status != 200:
                    raise FacilitatorUnavailable(f"/{step}", f"HTTP {resp.status}")
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise FacilitatorUnavailable(f"/{step}", type(exc).__name__) from None
        try:
            return msgspec.json.decode(raw, type=into)
        except (msgspec.DecodeError, msgspec.ValidationError):
            raise FacilitatorUnavailable(f"/{step}", "an answer that is not its JSON") from None
