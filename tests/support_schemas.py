"""Migrated Postgres schemas for the tests, made once and handed out again once emptied.

A fresh schema costs its migrations (every table, index, trigger and function of sidecar/migrations) and
its monthly partitions, then a ``DROP SCHEMA ... CASCADE``: about 0.2 s on an idle machine, seconds on a
loaded one, and more as the suite goes on (the CI server runs without autovacuum, so every schema made and
dropped leaves its catalog rows dead). A test that takes ``database_url`` gets instead a schema of this
process's spares: migrated and partitioned as a sidecar's first start leaves it (the same migrate and
add_partitions), its tables empty. After the test the schema goes back among the spares only when it is
again what it was when made:

- no connection of the test is left: every DSN handed out names the schema as its ``application_name``,
  and the schema's backends still connected are terminated (and waited for) before anything else, so no
  late commit of a killed process can land in the next test's tables;
- its catalog is untouched: every catalog row of the schema's objects (tables and partitions, columns,
  defaults, constraints, indexes, triggers, functions, types, rules, policies, inheritance, sequences; the
  schema's own row, with its grants) has the row version (``xmin``) it had when the schema was made, and
  no object came or went. DDL, a ``TRUNCATE`` (a new file for the table), a grant or a new month's
  partition all change one;
- ``schema_migrations`` holds the versions it was made with.

Its rows are then deleted (triggers off, ``session_replication_role = replica``: the immutable documents'
guards and the foreign keys do not fire; nothing is left to check them against) and its sequences set back
to their start (``setval``, which changes no catalog row), and the deletions verified: every table empty.
Any other schema is dropped, as before. A test that needs an empty schema (the migrations and partitions
themselves) is marked ``empty_schema`` and gets a fresh one, dropped after it.
"""

from __future__ import annotations

import uuid

import asyncpg
import msgspec

from sidecar.config import Settings
from sidecar.ledger_schema import add_partitions, migrate

# What a sidecar's start makes: the migrations, this month's partition and as many ahead as by default.
PARTITIONS_AHEAD: int = next(
    f.default for f in msgspec.structs.fields(Settings) if f.name == "ledger_partitions_ahead"
)
# How long the leftover backends of a test get to end once terminated, in ms (pg_terminate_backend waits).
TERMINATE_WAIT_MS = 10_000

# The schema's objects: what is in it directly (pg_depend on the schema: tables, partitions, sequences,
# functions, types), the relations of its composite types, and the indexes of them all. Found by index
# only: the server's catalogs are large (without autovacuum they keep every dead row of the suite's
# schemas), and a scan of pg_class alone would cost more than emptying the schema.
_OBJECTS = """
SELECT classid::regclass::text AS catalog, objid FROM pg_depend
WHERE refclassid = 'pg_namespace'::regclass AND refobjid = $1 AND classid IN ('pg_class'::regclass,
    'pg_proc'::regclass, 'pg_type'::regclass)
"""
_RELATIONS = """
SELECT typrelid AS oid FROM pg_type WHERE oid = ANY($2::oid[]) AND typrelid <> 0
UNION SELECT unnest($1::oid[])
UNION SELECT indexrelid FROM pg_index WHERE indrelid = ANY($1::oid[])
"""
# Their catalog rows as "kind oid:xmin", sorted: any DDL on them, a TRUNCATE (a new file), a grant, a new
# object or one gone changes the string.
_CATALOG = """
SELECT coalesce(string_agg(row, ' ' ORDER BY row), '') FROM (
    SELECT 'n' || oid || ':' || xmin AS row FROM pg_namespace WHERE oid = $1
    UNION ALL SELECT 'c' || oid || ':' || xmin FROM pg_class WHERE oid = ANY($2::oid[])
    UNION ALL SELECT 'a' || attrelid || '.' || attnum || ':' || xmin FROM pg_attribute
        WHERE attrelid = ANY($2::oid[])
    UNION ALL SELECT 'd' || oid || ':' || xmin FROM pg_attrdef WHERE adrelid = ANY($2::oid[])
    UNION ALL SELECT 'k' || oid || ':' || xmin FROM pg_constraint WHERE conrelid = ANY($2::oid[])
    UNION ALL SELECT 'i' || indexrelid || ':' || xmin FROM pg_index WHERE indexrelid = ANY($2::oid[])
    UNION ALL SELECT 't' || oid || ':' || xmin FROM pg_trigger WHERE tgrelid = ANY($2::oid[])
    UNION ALL SELECT 'r' || oid || ':' || xmin FROM pg_rewrite WHERE ev_class = ANY($2::oid[])
    UNION ALL SELECT 'o' || oid || ':' || xmin FROM pg_policy WHERE polrelid = ANY($2::oid[])
    UNION ALL SELECT 'h' || inhrelid || '.' || inhparent || ':' || xmin FROM pg_inherits
        WHERE inhrelid = ANY($2::oid[])
    UNION ALL SELECT 's' || seqrelid || ':' || xmin FROM pg_sequence WHERE seqrelid = ANY($2::oid[])
    UNION ALL SELECT 'p' || oid || ':' || xmin FROM pg_proc WHERE oid = ANY($3::oid[])
    UNION ALL SELECT 'y' || oid || ':' || xmin FROM pg_type WHERE oid = ANY($4::oid[])
) AS catalog
"""


class Spare(msgspec.Struct, frozen=True):
    name: str
    catalog: str  # _CATALOG when it was made
    versions: tuple[str, ...]  # schema_migrations when it was made
    emptying: str  # the SQL that deletes every row and sets every sequence back
    checking: str  # the SQL that counts the rows left in every table


def with_schema(dsn: str, schema: str) -> str:
    """`dsn` on `schema` (its search_path), its connections named after it (their application_name)."""
    return f"{dsn}{'&' if '?' in dsn else '?'}search_path={schema}&application_name={schema}"


def new_schema_name() -> str:
    return f"t{uuid.uuid4().hex[:12]}"


async def terminate_clients(conn: asyncpg.Connection, schema: str) -> None:
    """End the backends still connected on `schema`'s DSN (a test's leftovers); wait until they are gone."""
    await conn.execute(
        "SELECT pg_terminate_backend(pid, $2) FROM pg_stat_activity"
        " WHERE application_name = $1 AND pid <> pg_backend_pid()",
        schema,
        TERMINATE_WAIT_MS,
    )


async def drop_schema(conn: asyncpg.Connection, schema: str) -> None:
    await terminate_clients(conn, schema)
    await conn.execute(f"DROP SCHEMA {schema} CASCADE")


async def _catalog(conn: asyncpg.Connection, schema: str) -> str:
    """The catalog rows of `schema` and of its objects (see _CATALOG)."""
    async with conn.transaction():
        await conn.execute("SET LOCAL enable_seqscan = off")  # the catalogs' statistics are stale
        namespace = await conn.fetchval("SELECT $1::regnamespace::oid", schema)
        found: dict[str, list[int]] = {"pg_class": [], "pg_proc": [], "pg_type": []}
        for row in await conn.fetch(_OBJECTS, namespace):
            found[row["catalog"]].append(row["objid"])
        relations = [r["oid"] for r in await conn.fetch(_RELATIONS, found["pg_class"], found["pg_type"])]
        return str(await conn.fetchval(_CATALOG, namespace, relations, found["pg_proc"], found["pg_type"]))


async def _versions(conn: asyncpg.Connection, schema: str) -> tuple[str, ...]:
    rows = await conn.fetch(f"SELECT version FROM {schema}.schema_migrations ORDER BY version")
    return tuple(r["version"] for r in rows)


async def make_spare(conn: asyncpg.Connection) -> Spare:
    """A new schema, migrated and partitioned as a sidecar's first start leaves it."""
    name = new_schema_name()
    await conn.execute(f"CREATE SCHEMA {name}")
    await conn.execute(f"SET search_path = {name}")
    try:
        await migrate(conn)
        await add_partitions(conn, PARTITIONS_AHEAD)
    finally:
        await conn.execute("RESET search_path")
    tables = await conn.fetch(
        "SELECT oid::regclass::text AS name FROM pg_class WHERE relnamespace = $1::regnamespace"
        " AND relkind = 'r' AND relname <> 'schema_migrations' ORDER BY relname",
        name,
    )
    sequences = await conn.fetch(
        "SELECT c.oid::regclass::text AS name, s.seqstart AS start FROM pg_sequence s"
        " JOIN pg_class c ON c.oid = s.seqrelid WHERE c.relnamespace = $1::regnamespace ORDER BY c.relname",
        name,
    )
    emptying = (
        "BEGIN; SET LOCAL session_replication_role = replica;"
        + "".join(f"DELETE FROM {t['name']};" for t in tables)
        + "".join(f"SELECT setval('{s['name']}', {s['start']}, false);" for s in sequences)
        + "COMMIT;"
    )
    checking = " UNION ALL ".join(f"SELECT '{t['name']}' FROM {t['name']}" for t in tables)
    return Spare(name, await _catalog(conn, name), await _versions(conn, name), emptying, checking)


async def unchanged(conn: asyncpg.Connection, spare: Spare) -> bool:
    """Whether `spare`'s catalog and migrations are as made (its rows aside), as `conn` sees them."""
    if await _catalog(conn, spare.name) != spare.catalog:
        return False
    return await _versions(conn, spare.name) == spare.versions


async def restore(conn: asyncpg.Connection, spare: Spare) -> bool:
    """Empty `spare` after a test and True, when it can be handed out again as it was made; False (and
    nothing emptied) when the test changed more than its rows."""
    await terminate_clients(conn, spare.name)
    if not await unchanged(conn, spare):
        return False
    await conn.execute(spare.emptying)
    left = await conn.fetch(spare.checking + " LIMIT 1")
    assert not left, f"{left[0][0]} kept rows after the DELETE"
    return True


# How many advisory locks this test's sessions wait for: pg_locks is the server's, and other tests (another
# xdist worker's, another suite's) wait for locks of their own meanwhile; every connection of a test is
# named after its schema (with_schema), so its waits are those of the sessions named as the asking one.
ADVISORY_WAITS = (
    "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid"
    " WHERE l.locktype = 'advisory' AND NOT l.granted"
    " AND a.application_name = current_setting('application_name')"
)
