"""The x402 wire format: the payment requirements we offer, the payment payloads clients send, the
facilitator's answers, and the base64 headers that carry them. Followed exactly from coinbase/x402:
specs/x402-specification-v1.md (5.1 PaymentRequirementsResponse, 5.2 PaymentPayload, 5.3 SettlementResponse,
7.1-7.2 the facilitator's /verify and /settle), specs/x402-specification-v2.md (5.1 PaymentRequired with its
ResourceInfo, 5.2 PaymentPayload with `accepted`, 11.1 CAIP-2 networks), specs/transports-v1/http.md
(X-PAYMENT, X-PAYMENT-RESPONSE, requirements in the 402 body) and specs/transports-v2/http.md
(PAYMENT-REQUIRED, PAYMENT-SIGNATURE, PAYMENT-RESPONSE). Headers are standard base64 of UTF-8 JSON (as in
python/x402/http/utils.py). Only the `exact` scheme on EVM networks (an EIP-3009 authorization) is taken."""

from __future__ import annotations

import base64
import binascii
import re
from typing import Any

import msgspec

from ..errors import BadRequest

X_PAYMENT, PAYMENT_SIGNATURE = "X-PAYMENT", "PAYMENT-SIGNATURE"  # client -> server, v1 and v2
X_PAYMENT_RESPONSE, PAYMENT_RESPONSE = "X-PAYMENT-RESPONSE", "PAYMENT-RESPONSE"  # server -> client
PAYMENT_REQUIRED = "PAYMENT-REQUIRED"  # v2: the PaymentRequired object of a 402
NONCE, ADDRESS = (
    re.compile(r"0x[0-9a-fA-F]{64}"),
    re.compile(r"0x[0-9a-fA-F]{40}"),
)  # EIP-3009's bytes32, address
USDC_EXTRA = {"name": "USDC", "version": "2"}  # the EIP-712 domain of USDC (`extra` of the exact scheme)
# v1 network names -> CAIP-2 (v2), as python/x402/mechanisms/evm/v1/constants.py maps them.
CHAIN_IDS = {
    "base": 8453, "base-sepolia": 84532, "ethereum": 1, "polygon": 137, "polygon-amoy": 80002,
    "avalanche": 43114, "avalanche-fuji": 43113, "celo": 42220, "sei": 1329, "sei-testnet": 1328,
}  # fmt: skip


def caip2(network: str) -> str:
    """The CAIP-2 form (v2) of a network setting that names a v1 network (or is CAIP-2 already)."""
    return network if ":" in network else f"eip155:{CHAIN_IDS[network]}" if network in CHAIN_IDS else network


class Authorization(msgspec.Struct, rename="camel"):
    """EIP-3009 transferWithAuthorization parameters (all decimal or hex strings)."""

    from_: str = msgspec.field(name="from")
    to: str
    value: str
    valid_after: str
    valid_before: str
    nonce: str


class ExactEvmPayload(msgspec.Struct):
    signature: str
    authorization: Authorization


class PaymentPayloadV1(msgspec.Struct, rename="camel"):
    x402_version: int
    scheme: str
    network: str
    payload: ExactEvmPayload


class AcceptedV2(msgspec.Struct, rename="camel"):
    """The PaymentRequirements (v2) a v2 payload says it accepted."""

    scheme: str
    network: str
    amount: str
    asset: str
    pay_to: str
    max_timeout_seconds: int | None = None
    extra: dict[str, Any] | None = None


class PaymentPayloadV2(msgspec.Struct, rename="camel"):
    x402_version: int
    accepted: AcceptedV2
    payload: ExactEvmPayload


class VerifyResponse(msgspec.Struct, rename="camel"):
    is_valid: bool
    invalid_reason: str | None = None
    payer: str | None = None


class SettleResponse(msgspec.Struct, rename="camel"):
    success: bool
    transaction: str = ""  # v1: required, "" when settling failed
    network: str = ""
    payer: str | msgspec.UnsetType = msgspec.UNSET  # (unset fields are left out of the JSON)
    error_reason: str | msgspec.UnsetType = msgspec.UNSET


class Payment(msgspec.Struct, frozen=True):
    """A payment as presented: its version, what it pays and the raw payload (sent on unchanged)."""

    version: int
    header: str  # the request header it came in
    scheme: str
    network: str
    asset: str | None  # v2 names it; a v1 payload does not (its requirements do)
    pay_to: str
    amount: str  # what the authorization transfers, atomic units
    payer: str
    nonce: str
    raw: dict[str, Any]


def decode_payment(header: str, value: str) -> Payment:
    """The payment in header `header` (X-PAYMENT: v1; PAYMENT-SIGNATURE: v2). Raises BadRequest naming the
    header when it is not base64 of a JSON PaymentPayload of the exact EVM scheme."""
    try:
        data = base64.b64decode(value.strip(), validate=True)
        raw = msgspec.json.decode(data)
    except (binascii.Error, ValueError, msgspec.DecodeError):
        raise BadRequest(f"{header} must be base64 of a JSON x402 PaymentPayload.", param=header) from None
    if not isinstance(raw, dict):
        raise BadRequest(f"{header} must hold a JSON object (a PaymentPayload).", param=header)
    version = 1 if header == X_PAYMENT else 2
    try:
        if raw.get("x402Version") != version:
            raise ValueError(f"x402Version must be {version} in {header}")
        if version == 1:
            v1 = msgspec.convert(raw, PaymentPayloadV1)
            scheme, network, asset, auth = v1.scheme, v1.network, None, v1.payload.authorization
        else:
            v2 = msgspec.convert(raw, PaymentPayloadV2)
            scheme, network, asset = v2.accepted.scheme, v2.accepted.network, v2.accepted.asset
            auth = v2.payload.authorization
            if (v2.accepted.pay_to, v2.accepted.amount) != (auth.to, auth.value):
                raise ValueError("its authorization does not pay what it says it accepted")
    except (msgspec.ValidationError, ValueError) as exc:
        raise BadRequest(f"{header} is not an exact-scheme PaymentPayload: {exc}.", param=header) from None
    if not (auth.value.isascii() and auth.value.isdigit()) or not NONCE.fullmatch(auth.nonce):
        raise BadRequest(
            f"{header}: the authorization's value must be atomic units, its nonce 32 bytes of hex.",
            param=header,
        )
    if not (ADDRESS.fullmatch(auth.from_) and ADDRESS.fullmatch(auth.to)):
        raise BadRequest(f"{header}: the authorization's from and to must be EVM addresses.", param=header)
    return Payment(version, header, scheme, network, asset, auth.to, auth.value, auth.from_, auth.nonce, raw)


def encode_header(obj: Any) -> str:
    """Base64 of the JSON of `obj` (a Struct or plain data), for PAYMENT-REQUIRED and PAYMENT-RESPONSE."""
    return base64.b64encode(msgspec.json.encode(obj)).decode()


class Offer(msgspec.Struct, frozen=True):
    """What we ask for one top-up: the amount (USDC atomic units) and where it goes."""

    network: str  # the v1 name (or CAIP-2) of the setting
    asset: str
    pay_to: str
    amount: int
    resource: str
    timeout_seconds: int
    description: str = "creditgate credits top-up"

    def requirements(self, version: int) -> dict[str, Any]:
        """The PaymentRequirements of this offer, as x402 `version` (1 or 2) spells them."""
        if version == 1:
            return {
                "scheme": "exact", "network": self.network, "maxAmountRequired": str(self.amount),
                "resource": self.resource, "description": self.description,
                "mimeType": "application/json", "payTo": self.pay_to,
                "maxTimeoutSeconds": self.timeout_seconds, "asset": self.asset, "extra": USDC_EXTRA,
            }  # fmt: skip
        return {
            "scheme": "exact", "network": caip2(self.network), "amount": str(self.amount),
            "asset": self.asset, "payTo": self.pay_to, "maxTimeoutSeconds": self.timeout_seconds,
            "extra": USDC_EXTRA,
        }  # fmt: skip

    def required_v1(self, error: str) -> dict[str, Any]:
        """The v1 PaymentRequirementsResponse (a 402's body)."""
        return {"x402Version": 1, "error": error, "accepts": [self.requirements(1)]}

    def required_v2(self, error: str) -> dict[str, Any]:
        """The v2 PaymentRequired (a 402's PAYMENT-REQUIRED header)."""
        resource = {"url": self.resource, "description": self.description, "mimeType": "application/json"}
        return {"x402Version": 2, "error": error, "resource": resource, "accepts": [self.requirements(2)]}

    def mismatch(self, payment: Payment) -> str | None:
        """Why `payment` does not pay this offer (None: it does); checked before any facilitator call."""
        network = self.network if payment.version == 1 else caip2(self.network)
        if payment.scheme != "exact":
            return f"scheme must be 'exact', not {payment.scheme!r}"
        if payment.network != network:
            return f"network must be {network!r}, not {payment.network!r}"
        if payment.asset is not None and payment.asset.lower() != self.asset.lower():
            return f"asset must be {self.asset}, not {payment.asset}"
        if payment.pay_to.lower() != self.pay_to.lower():
            return f"payTo must be {self.pay_to}, not {payment.pay_to}"
        if int(payment.amount) != self.amount:
            return f"amount must be {self.amount} atomic units, not {payment.amount}"
        return None
