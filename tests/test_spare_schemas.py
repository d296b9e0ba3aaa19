"""The migrated schemas handed to tests again (tests/support_schemas.py): one goes back emptied, as it was
made, and only then; a schema its test changed in any other way is dropped, and a connection a test left
open on it is ended first."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import TypeVar

import asyncpg
import pytest

from .support_schemas import Spare, drop_schema, make_spare, restore, unchanged, with_schema

T = TypeVar("T")


@pytest.fixture
async def admin(database_server: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(database_server)
    yield conn
    await conn.close()


def _with_connection(dsn: str, work: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
    async def run() -> T:
        conn = await asyncpg.connect(dsn)
        try:
            return await work(conn)
        finally:
            await conn.close()

    return asyncio.run(run())


@pytest.fixture(scope="module")
def spare(database_server: str) -> Iterator[Spare]:
    """One spare for the module: every test leaves it as it was made (the changes are rolled back)."""
    made = _with_connection(database_server, make_spare)
    yield made
    _with_connection(database_server, lambda conn: drop_schema(conn, made.name))


async def on(database_server: str, spare: Spare) -> asyncpg.Connection:
    return await asyncpg.connect(with_schema(database_server, spare.name))


async def test_a_used_schema_goes_back_empty_with_its_sequences_from_the_start(
    database_server: str, admin: asyncpg.Connection, spare: Spare
) -> None:
    conn = await on(database_server, spare)
    try:
        await conn.execute("INSERT INTO accounts (id) VALUES ('a')")
        await conn.execute("INSERT INTO document_series (issuer) VALUES ('i')")
        await conn.execute(  # immutable once written: its trigger refuses DELETE
            "INSERT INTO documents (id, issuer, seq, number, kind, account_id, source, issued_at, currency,"
            " gross_minor, credits, body) VALUES ('d', 'i', 1, 'N-1', 'invoice', 'a', 's', now(), 'USD', 0,"
            " 0, '{}')"
        )
        assert await conn.fetchval("SELECT nextval('signal_deliveries_delivery_id_seq')") == 1
        assert await conn.fetchval("SELECT nextval('signal_deliveries_delivery_id_seq')") == 2
    finally:
        await conn.close()

    assert await restore(admin, spare)

    conn = await on(database_server, spare)
    try:
        assert await conn.fetchval("SELECT count(*) FROM accounts") == 0
        assert await conn.fetchval("SELECT count(*) FROM documents") == 0
        assert await conn.fetchval("SELECT nextval('signal_deliveries_delivery_id_seq')") == 1
        assert await conn.fetchval("SELECT count(*) FROM schema_migrations") == len(spare.versions)
        assert await conn.fetchval("SELECT to_regclass('ledger_default')") is not None
    finally:
        await conn.close()
    assert await restore(admin, spare)  # and again, untouched


@pytest.mark.parametrize(
    "change",
    [
        "ALTER TABLE accounts ADD COLUMN extra integer",
        "ALTER TABLE api_keys DROP COLUMN revoked_at",
        "ALTER TABLE api_keys ALTER COLUMN revoked_at SET NOT NULL",
        "ALTER TABLE accounts ALTER COLUMN balance SET DEFAULT 1",
        "ALTER TABLE accounts ALTER COLUMN balance DROP DEFAULT",
        "ALTER TABLE accounts ADD CONSTRAINT positive CHECK (balance >= 0)",
        "CREATE INDEX ON accounts (created_at)",
        "DROP INDEX api_keys_account",
        "CREATE TABLE extra (x integer)",
        "CREATE SEQUENCE extra_seq",
        "CREATE FUNCTION extra() RETURNS integer LANGUAGE sql AS 'SELECT 1'",
        "CREATE OR REPLACE FUNCTION documents_immutable() RETURNS trigger LANGUAGE plpgsql"
        " AS 'BEGIN RETURN NEW; END'",
        "CREATE TYPE extra_kind AS ENUM ('a')",
        "ALTER TABLE documents DISABLE TRIGGER documents_immutable",
        "CREATE TRIGGER extra BEFORE DELETE ON accounts FOR EACH ROW EXECUTE FUNCTION documents_immutable()",
        "TRUNCATE accounts CASCADE",
        "GRANT SELECT ON accounts TO PUBLIC",
        "GRANT USAGE ON SCHEMA {schema} TO PUBLIC",
        "ALTER SEQUENCE signal_deliveries_delivery_id_seq RESTART WITH 5",
        "SELECT ledger_add_month('2031-05-01')",  # a month's partition, made by the sidecar itself
        "DELETE FROM schema_migrations WHERE version = (SELECT max(version) FROM schema_migrations)",
    ],
)
async def test_a_schema_changed_beyond_its_rows_is_not_handed_out_again(
    admin: asyncpg.Connection, spare: Spare, change: str
) -> None:
    assert await unchanged(admin, spare)
    # Seen from inside the changing transaction, which is rolled back: the spare stays as it was made.
    transaction = admin.transaction()
    await transaction.start()
    try:
        await admin.execute(f"SET LOCAL search_path = {spare.name}")
        await admin.execute(change.format(schema=spare.name))
        assert not await unchanged(admin, spare)
    finally:
        await transaction.rollback()
    assert await unchanged(admin, spare)


async def test_a_connection_left_open_on_the_schema_is_ended_before_it_is_emptied(
    database_server: str, admin: asyncpg.Connection, spare: Spare
) -> None:
    left = await on(database_server, spare)
    await left.execute("BEGIN; INSERT INTO accounts (id) VALUES ('late')")  # would commit after the reset
    assert await restore(admin, spare)
    with pytest.raises((asyncpg.PostgresConnectionError, asyncpg.InterfaceError, ConnectionError)):
        await left.execute("COMMIT")
    await left.close()
    conn = await on(database_server, spare)
    try:
        assert await conn.fetchval("SELECT count(*) FROM accounts") == 0
    finally:
        await conn.close()
