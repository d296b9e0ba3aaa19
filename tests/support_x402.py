"""A fake x402 facilitator on a real port, speaking /verify and /settle as coinbase/x402's specs say
(specs/x402-specification-v1.md and -v2.md, 7.1-7.2): it checks the payment against the requirements it
is sent, settles each authorization nonce once (as the chain would), counts settles, and can be told to
refuse verify or settle, to answer 500, or to hang; and builders of the payments a client would sign."""

from __future__ import annotations

import asyncio
import base64
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import msgspec
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

PAY_TO = "0x209693Bc6afc0C5328bA36FaF03C514EF312287C"
USDC = "0x036CbD53842c5426634e7929541eC2318f3dCF7e"  # the x402_asset default (Base Sepolia)
PAYER = "0x857b06519E91e3A54538791bDbb0E22373e36b66"


@dataclass
class FakeFacilitator:
    server: TestServer | None = None
    verify_reason: str | None = None  # set: /verify answers isValid false with it
    settle_reason: str | None = None  # set: /settle answers success false with it
    status: int = 200  # not 200: both answer that status
    hang: bool = False  # both wait until released (a facilitator that times out)
    settle_gate: asyncio.Event | None = None  # set: /settle waits for it
    settle_entered: asyncio.Event = field(default_factory=asyncio.Event)
    verifies: int = 0
    settles: int = 0
    settled: set[str] = field(default_factory=set)  # nonces, once each
    bodies: list[dict[str, Any]] = field(default_factory=list)
    released: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def url(self) -> str:
        assert self.server is not None
        return str(self.server.make_url("")).rstrip("/")

    def check(self, body: dict[str, Any]) -> str | None:
        """Why the payment does not pay the requirements (a facilitator's own check), None: it does."""
        version, payload, req = body["x402Version"], body["paymentPayload"], body["paymentRequirements"]
        if payload["x402Version"] != version:
            return "invalid_x402_version"
        auth = payload["payload"]["authorization"]
        amount = req["maxAmountRequired"] if version == 1 else req["amount"]
        network = payload["network"] if version == 1 else payload["accepted"]["network"]
        if network != req["network"]:
            return "invalid_network"
        if auth["to"] != req["payTo"]:
            return "invalid_exact_evm_payload_recipient_mismatch"
        if auth["value"] != amount:
            return "invalid_exact_evm_payload_authorization_value"
        if auth["nonce"] in self.settled:
            return "invalid_transaction_state"
        return None

    async def _wait(self) -> None:
        if self.hang:
            await self.released.wait()

    async def verify(self, request: web.Request) -> web.Response:
        self.verifies += 1
        body = await request.json()
        self.bodies.append(body)
        await self._wait()
        if self.status != 200:
            return web.json_response({"error": "down"}, status=self.status)
        payer = body["paymentPayload"]["payload"]["authorization"]["from"]
        why = self.verify_reason or self.check(body)
        if why:
            return web.json_response({"isValid": False, "invalidReason": why, "payer": payer})
        return web.json_response({"isValid": True, "payer": payer})

    async def settle(self, request: web.Request) -> web.Response:
        self.settles += 1
        self.settle_entered.set()
        body = await request.json()
        if self.settle_gate is not None:
            await self.settle_gate.wait()
        await self._wait()
        if self.status != 200:
            return web.json_response({"error": "down"}, status=self.status)
        auth = body["paymentPayload"]["payload"]["authorization"]
        network = body["paymentRequirements"]["network"]
        why = self.settle_reason or self.check(body)
        if why:
            failed = {"success": False, "errorReason": why, "payer": auth["from"], "transaction": ""}
            return web.json_response({**failed, "network": network})
        self.settled.add(auth["nonce"])
        tx = "0x" + secrets.token_hex(32)
        return web.json_response(
            {"success": True, "payer": auth["from"], "transaction": tx, "network": network}
        )


@pytest.fixture
async def facilitator() -> AsyncIterator[FakeFacilitator]:
    fake = FakeFacilitator()
    app = web.Application()
    app.router.add_post("/verify", fake.verify)
    app.router.add_post("/settle", fake.settle)
    fake.server = TestServer(app)
    await fake.server.start_server()
    yield fake
    fake.released.set()
    await fake.server.close()


def authorization(amount: int, *, pay_to: str = PAY_TO, nonce: str | None = None) -> dict[str, str]:
    return {
        "from": PAYER,
        "to": pay_to,
        "value": str(amount),
        "validAfter": "1740672089",
        "validBefore": "1740672154",
        "nonce": nonce or "0x" + secrets.token_hex(32),
    }


def payment_v1(amount: int, *, network: str = "base-sepolia", **auth: Any) -> str:
    """An X-PAYMENT header (v1 PaymentPayload, exact EVM)."""
    payload = {"signature": "0x" + "ab" * 65, "authorization": authorization(amount, **auth)}
    body = {"x402Version": 1, "scheme": "exact", "network": network, "payload": payload}
    return base64.b64encode(msgspec.json.encode(body)).decode()


def payment_v2(amount: int, *, asset: str = USDC, network: str = "eip155:84532", **auth: Any) -> str:
    """A PAYMENT-SIGNATURE header (v2 PaymentPayload, exact EVM)."""
    a = authorization(amount, **auth)
    accepted = {
        "scheme": "exact", "network": network, "amount": str(amount), "asset": asset, "payTo": a["to"],
        "maxTimeoutSeconds": 300, "extra": {"name": "USDC", "version": "2"},
    }  # fmt: skip
    body = {
        "x402Version": 2,
        "resource": {"url": "http://x/v1/credits/topup"},
        "accepted": accepted,
        "payload": {"signature": "0x" + "cd" * 65, "authorization": a},
    }
    return base64.b64encode(msgspec.json.encode(body)).decode()


def decoded(header: str) -> Any:
    return msgspec.json.decode(base64.b64decode(header))
