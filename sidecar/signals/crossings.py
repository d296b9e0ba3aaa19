"""Crossings: a signal fires once when an observed value goes below its threshold, and re-arms when an
observation is back at or above it (a top-up). `step` decides; `observe` keeps the state in Postgres.

Observations carry a position that orders them (an outbox entry's stream id as (ms, seq), a period's
index as (n, 0)); one not newer than the last seen is ignored, so a batch written twice, or two batches
written out of order, never fire or re-arm again. 100 requests that cross together are observed in
their settle order: the first one below fires, the rest find the signal disarmed."""

from __future__ import annotations

from typing import NamedTuple

from .events import Connection

Position = tuple[int, int]


class Crossing(NamedTuple):
    armed: bool
    fired: bool


def step(armed: bool, value: int, threshold: int) -> Crossing:
    """The next state for one observation (pure)."""
    if value < threshold:
        return Crossing(False, armed)
    return Crossing(True, False)


def position_of(entry_id: str | bytes) -> Position:
    """A Redis stream entry id ('<ms>-<seq>') as an ordered position."""
    text = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


async def observe(
    conn: Connection, account: str, signal: str, value: int, threshold: int, position: Position
) -> int | None:
    """Apply one observation; returns the crossing's number (1, 2, ...) when it fires the signal, else
    None. Run it inside the transaction that emits the event, so both happen or neither."""
    await conn.execute(
        "INSERT INTO signal_crossings (account_id, signal) VALUES ($1, $2) ON CONFLICT DO NOTHING",
        account,
        signal,
    )
    row = await conn.fetchrow(
        "SELECT armed, crossings, seen_major, seen_minor FROM signal_crossings"
        " WHERE account_id = $1 AND signal = $2 FOR UPDATE",
        account,
        signal,
    )
    assert row is not None
    if position <= (row["seen_major"], row["seen_minor"]):
        return None
    armed, fired = step(row["armed"], value, threshold)
    crossings = row["crossings"] + (1 if fired else 0)
    await conn.execute(
        "UPDATE signal_crossings SET armed = $3, crossings = $4, seen_major = $5, seen_minor = $6,"
        " changed_at = CASE WHEN armed <> $3 THEN now() ELSE changed_at END"
        " WHERE account_id = $1 AND signal = $2",
        account,
        signal,
        armed,
        crossings,
        position[0],
        position[1],
    )
    return crossings if fired else None


async def rearm(conn: Connection, account: str, signals: list[str] | None = None) -> None:
    """Re-arm an account's signals (all, or the ones named): a top-up landed, or a rule changed."""
    await conn.execute(
        "UPDATE signal_crossings SET armed = true, changed_at = now()"
        " WHERE account_id = $1 AND NOT armed AND ($2::text[] IS NULL OR signal = ANY($2))",
        account,
        signals,
    )
