"""Reads of the outbox for operators and metrics: the backlog and its age, and the dead letters."""

from __future__ import annotations

import time
from typing import Any

from .keys import as_text
from .redis_client import RedisClient


async def backlog(redis: RedisClient, streams: list[str]) -> tuple[int, float]:
    """(entries waiting, age in seconds of the oldest), across partitions."""
    async with redis.pipeline(transaction=False) as pipe:
        for stream in streams:
            pipe.xlen(stream)
            pipe.xrange(stream, count=1)
        replies = await pipe.execute()
    length = sum(replies[0::2])
    oldest = [int(as_text(r[0][0]).split("-")[0]) for r in replies[1::2] if r]
    age = max(0.0, time.time() - min(oldest) / 1000) if oldest else 0.0
    return length, age


async def dead_letters(
    redis: RedisClient, streams: list[str], limit: int = 100
) -> tuple[int, list[dict[str, str]]]:
    """(dead letters parked in all, up to `limit` of them oldest first per partition: their
    dead-letter stream id, outbox entry id, reason and the entry as it was)."""
    async with redis.pipeline(transaction=False) as pipe:
        for stream in streams:
            pipe.xlen(stream)
            pipe.xrange(stream, count=limit)
        replies = await pipe.execute()
    letters = [_dead_letter(i, f) for reply in replies[1::2] for i, f in reply]
    return sum(replies[0::2]), letters[:limit]


def _dead_letter(stream_id: Any, fields: dict[Any, Any]) -> dict[str, str]:
    text = {as_text(k): as_text(v) for k, v in fields.items()}
    return {
        "id": as_text(stream_id),
        "entry": text.get("entry", ""),
        "reason": text.get("reason", ""),
        "d": text.get("d", ""),
    }
