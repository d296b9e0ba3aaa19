"""A batch of outbox entries on its way to the Postgres ledger, its items, the flusher's counters, and
which failures mean Postgres refused the rows themselves (split the batch) rather than being away (retry)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import asyncpg

from .keys import as_text


@dataclass
class FlushStats:
    rows: int = 0
    batches: int = 0
    failures: int = 0
    last_batch_rows: int = 0
    last_batch_seconds: float = 0.0
    dead_letters: int = 0  # entries parked in the dead-letter streams by this process


@dataclass(eq=False)  # compared (and hashed) by identity: the loops track theirs in a set
class Batch:
    entries: dict[str, list[tuple[str, dict[Any, Any]]]] = field(default_factory=dict)  # stream -> entries
    size: int = 0

    def add(self, stream: str, entries: Sequence[tuple[Any, dict[Any, Any]]]) -> None:
        if entries:
            self.entries.setdefault(stream, []).extend((as_text(i), f) for i, f in entries)
            self.size += len(entries)


@dataclass
class Item:
    stream: str
    entry_id: str
    fields: dict[Any, Any]
    row: tuple[Any, ...] | None = None
    reason: str = ""


def is_data_error(exc: BaseException) -> bool:
    """Whether Postgres (or the driver encoding the batch) refused the rows themselves, as opposed to
    being unreachable: such a batch is split to find the refused rows, any other failure is retried."""
    if isinstance(exc, asyncpg.PostgresError):
        return str(getattr(exc, "sqlstate", "") or "")[:2] in ("22", "23")  # data / integrity
    if isinstance(exc, asyncpg.InterfaceError | OSError):
        return isinstance(exc, ValueError)  # asyncpg's client-side DataError is both
    return isinstance(exc, ValueError | TypeError | OverflowError)


def reraise_if_cancelled(exc: Exception) -> None:
    """A client library may turn our cancellation into its own error (redis-py raises ConnectionError
    when cancelled mid-command); a loop that retries on errors must still stop when cancelled."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError from exc
