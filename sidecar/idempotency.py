"""Idempotency-Key on the metered routes: a retried request is answered what the first one was, and is
not charged again.

A request carrying the header is filed under its account and key (``KeySpace``: the key's SHA-256, in the
account's slot). Its reserve looks the key up first, in the same script that takes the hold, and the hold
claims the key while the request is in flight; its settle stores the answer (a complete 200: the body, or
the whole stream as the upstream sent it) for ``idempotency_ttl_seconds`` in the same script that
charges it, with the SHA-256 of the route and body. A retry with the same key and body is then answered
from it, with no hold, no charge and no ledger row; with another body it is a 409. A retry while the first
is in flight waits for its answer in this process (single flight), or is a 409 ("in progress") when the
first runs elsewhere. An answer that failed (an upstream error, no answer, a cut stream, a refusal) is
not stored and its claim is released, so a retry goes upstream again.

The entry is a response-cache entry (cache.CachedResponse) wrapped with the request's hash and id.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass

import msgspec
from multidict import CIMultiDict, CIMultiDictProxy

from .cache import CachedResponse
from .errors import BadRequest, Conflict
from .flights import Flights
from .keys import KeySpace

HEADER = "Idempotency-Key"
REPLAY_HEADER = "creditgate-idempotent-replay"  # "true" on an answer replayed from the store
ORIGINAL_HEADER = "creditgate-original-request-id"  # the request id of the answer replayed
_VALID = re.compile(r"[\x20-\x7e]{1,255}\Z")  # 1-255 printable ASCII characters
HASH_INLINE_BYTES = 64 * 1024  # a larger body is hashed in a thread (hashlib releases the GIL)


class IdempotentAnswer(msgspec.Struct, array_like=True):
    request_hash: str  # hex SHA-256 of the route and the client's body
    request_id: str  # the request that was answered (and charged)
    answer: CachedResponse


_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder(IdempotentAnswer).decode


@dataclass(frozen=True, slots=True)
class IdempotencyPlan:
    """What one request does with its Idempotency-Key."""

    key: str  # the entry's Redis key (the account's slot), also its single-flight key
    request_hash: str


def key_of(headers: Mapping[str, str]) -> str | None:
    """The request's Idempotency-Key (None without one); a 400 naming it unless it is 1-255 printable
    ASCII characters."""
    values: list[str]
    if isinstance(headers, CIMultiDictProxy | CIMultiDict):
        values = headers.getall(HEADER, [])
    else:
        values = [headers[HEADER]] if HEADER in headers else []
    if not values:
        return None
    if len(values) > 1 or not _VALID.match(values[0]):
        raise BadRequest(
            f"The {HEADER} header must be one value of 1-255 printable ASCII characters.", param=HEADER
        )
    return values[0]


def request_hash(path: str, body: bytes) -> str:
    """What a retry must repeat exactly: the route and the body, byte for byte."""
    return hashlib.sha256(path.encode() + b"\n" + body).hexdigest()


class Replays:
    def __init__(self, keys: KeySpace, *, enabled: bool, ttl_seconds: int, wait_seconds: float) -> None:
        self.keys = keys
        self.enabled = enabled
        self.ttl_ms = ttl_seconds * 1000
        self.wait_seconds = wait_seconds
        self.flights = Flights[IdempotentAnswer]()
        self.replayed = 0  # answers served from the store (or a concurrent request's answer)

    async def plan(
        self, account: str, path: str, body: bytes, headers: Mapping[str, str]
    ) -> IdempotencyPlan | None:
        key = key_of(headers) if self.enabled else None
        if key is None:
            return None
        if len(body) <= HASH_INLINE_BYTES:
            digest = request_hash(path, body)
        else:
            digest = await asyncio.to_thread(request_hash, path, body)
        named = hashlib.sha256(key.encode()).hexdigest()
        return IdempotencyPlan(self.keys.account(account).idempotent(named), digest)

    @staticmethod
    def answer(plan: IdempotencyPlan, request_id: str, entry: CachedResponse) -> IdempotentAnswer:
        return IdempotentAnswer(plan.request_hash, request_id, entry)

    def stored(self, plan: IdempotencyPlan, answer: IdempotentAnswer | None) -> tuple[str, bytes, int]:
        """What the settle script does with the key: store `answer`, or (None) release the claim."""
        return plan.key, _encode(answer) if answer is not None else b"", self.ttl_ms

    def replay(self, plan: IdempotencyPlan, value: bytes | IdempotentAnswer | None) -> IdempotentAnswer:
        """The stored answer for this request; a 409 naming the header when it was another request's (or
        this version cannot read it)."""
        try:
            answer = value if isinstance(value, IdempotentAnswer) else _decode(value or b"")
        except msgspec.MsgspecError:
            raise Conflict(
                f"The answer stored under this {HEADER} cannot be read; retry with a new key.",
                param=HEADER,
                code="idempotency_key_unreadable",
            ) from None
        if answer.request_hash != plan.request_hash:
            raise Conflict(
                f"This {HEADER} was used with another request (a different route or body); a retry must "
                "send the same request, a new request a new key.",
                param=HEADER,
                code="idempotency_key_reused",
            )
        self.replayed += 1
        return answer

    async def wait(self, flight: asyncio.Future[IdempotentAnswer | None]) -> IdempotentAnswer | None:
        return await self.flights.wait(flight, self.wait_seconds)


def in_progress() -> Conflict:
    return Conflict(
        f"A request with this {HEADER} is still in progress; retry once it is answered.",
        param=HEADER,
        code="idempotency_key_in_progress",
    )
