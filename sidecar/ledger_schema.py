"""The ledger's schema: the migrations shipped with the package, and the monthly partitions created ahead.

Migrations are plain SQL files, applied in name order, each in its own transaction, once (recorded in
``schema_migrations``). The ledger is range-partitioned by UTC month on ``created_at`` (migration 002);
``add_partitions`` creates the current month's partition and ``ahead`` more, at every start of the sidecar
and by ``creditgate migrate``. Rows of a month without a partition land in the DEFAULT partition and move
into the month's partition when it is created.
"""

from __future__ import annotations

import datetime as dt
import logging
from importlib.resources import files

import asyncpg

from .ledger_sql import scoped

log = logging.getLogger("creditgate.store")

LedgerConnection = asyncpg.Connection | asyncpg.pool.PoolConnectionProxy

_MIGRATIONS_LOCK = 0x6372656469  # advisory lock id ("credi")


def migration_files() -> list[tuple[str, str]]:
    """(version, sql) of every migration shipped with the package, in order."""
    folder = files("sidecar").joinpath("migrations")
    found = sorted(p.name for p in folder.iterdir() if p.name.endswith(".sql"))
    return [(name.removesuffix(".sql"), folder.joinpath(name).read_text()) for name in found]


async def migrate(conn: LedgerConnection, *, upto: str | None = None) -> list[str]:
    """Apply the migrations not applied yet (those named up to `upto`, when given), each in its own
    transaction; returns the versions applied. Safe to run twice and from several processes at once (an
    advisory lock serialises them)."""
    applied_now: list[str] = []
    await conn.execute(f"SELECT pg_advisory_lock({scoped('$1')})", _MIGRATIONS_LOCK)
    try:
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations"
            " (version text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
        )
        done = {r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")}
        for version, sql in migration_files():
            if version in done or (upto is not None and version > upto):
                continue
            async with conn.transaction():
                await conn.execute(sql)
                await conn.execute("INSERT INTO schema_migrations (version) VALUES ($1)", version)
            applied_now.append(version)
            log.info("applied migration %s", version)
    finally:
        await conn.execute(f"SELECT pg_advisory_unlock({scoped('$1')})", _MIGRATIONS_LOCK)
    return applied_now


async def add_partitions(conn: LedgerConnection, ahead: int, now: dt.datetime | None = None) -> list[str]:
    """Create the ledger partitions of the UTC month of `now` (default: the present) and of the `ahead`
    months after it, where missing; returns the names created (none on a second call)."""
    at = now if now is not None else dt.datetime.now(dt.UTC)
    rows = await conn.fetch("SELECT ledger_add_months($1, $2) AS part", at, ahead)
    created = [str(r["part"]) for r in rows]
    if created:
        log.info("created ledger partitions %s", ", ".join(created))
    return created


async def partitions(conn: LedgerConnection) -> list[str]:
    """The ledger's partitions by name, the DEFAULT one included."""
    rows = await conn.fetch(
        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
        " WHERE i.inhparent = 'ledger'::regclass ORDER BY c.relname"
    )
    return [str(r["relname"]) for r in rows]
