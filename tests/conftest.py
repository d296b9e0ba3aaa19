"""Shared fixtures: real Redis and Postgres, the demo upstream over real HTTP, and a sidecar in front.

Redis: ``CREDITGATE_TEST_REDIS_URL``, else 127.0.0.1:6379 when it answers, else an embedded redis-server
started for the session. Postgres: ``CREDITGATE_TEST_DATABASE_URL``, else postgres@127.0.0.1:5432/test
when it answers, else an embedded PostgreSQL. With ``CI=true`` a missing service is a failure, never a
skip or a fallback. Every test gets its own Redis key prefix and a Postgres schema of its own (a migrated
spare, emptied after it: tests/support_schemas.py), so tests share the servers, and the two xdist workers
the suite runs on share them too, without seeing each other's data.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import msgspec
import pytest
import redis
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from redis.asyncio import Redis
from redis.cluster import ClusterNode

from sidecar.app import SERVICES, Services, create_app, create_ops_app
from sidecar.balances import Balances
from sidecar.config import Settings
from sidecar.demo import CALLS, create_demo_upstream
from sidecar.embedded import EmbeddedPostgres, EmbeddedRedis, redis_answers
from sidecar.redis_client import connect_redis
from sidecar.redis_urls import is_cluster_url, parse_cluster_url

from .support_cluster import ClusterUnavailable, LocalCluster
from .support_schemas import Spare, drop_schema, make_spare, new_schema_name, restore, with_schema

ADMIN_TOKEN = "admin-secret-for-tests"
PROVIDER_KEY = "sk-provider-secret-for-tests"
DEFAULT_REDIS = "redis://127.0.0.1:6379/0"
DEFAULT_DATABASE = "postgresql://postgres@127.0.0.1:5432/test"


# Key prefixes handed out to this test (see new_key_prefix); their keys are deleted after it.
_PREFIXES: list[str] = []
_SESSION_REDIS: list[str] = []  # the Redis URLs the session started or found (one node, the cluster)
TOPOLOGIES = ("single", "cluster")


def new_key_prefix() -> str:
    """A key prefix of the test's own; whatever is stored under it is deleted when the test ends."""
    prefix = f"t{uuid.uuid4().hex[:12]}:"
    _PREFIXES.append(prefix)
    return prefix


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "topologies: run the module's tests on one Redis and on a Redis Cluster ([single], [cluster])",
    )
    config.addinivalue_line(
        "markers", "empty_schema: database_url is a fresh empty schema (not a migrated spare)"
    )


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """A test marked `topologies` that uses Redis runs once per topology; the rest on one Redis only."""
    if "topology" in metafunc.fixturenames and metafunc.definition.get_closest_marker("topologies"):
        metafunc.parametrize("topology", TOPOLOGIES, indirect=True)


@pytest.fixture
def topology(request: pytest.FixtureRequest) -> str:
    """The Redis this test runs on: "single" unless its module is marked `topologies`."""
    return str(getattr(request, "param", "single"))


@pytest.fixture(autouse=True)
def _delete_test_keys() -> Iterator[None]:
    """Tests share the Redis servers (and CI reuses the machine's), so none may leave keys behind: a
    growing keyspace slows every later SCAN. On the cluster the scan walks every primary."""
    first = len(_PREFIXES)
    yield
    prefixes = _PREFIXES[first:]
    del _PREFIXES[first:]
    for url in _SESSION_REDIS if prefixes else []:
        client = sync_client(url)
        try:
            for prefix in prefixes:
                batch = []
                for name in client.scan_iter(match=f"{prefix}*", count=1000):
                    batch.append(name)
                    if len(batch) == 1000:
                        client.unlink(*batch)  # the cluster client splits it by slot
                        batch.clear()
                if batch:
                    client.unlink(*batch)
        finally:
            client.close()


def sync_client(url: str) -> redis.Redis | redis.RedisCluster:
    """A blocking client of one node or of the cluster (SCAN over every primary, DEL split by slot)."""
    if is_cluster_url(url):
        nodes = parse_cluster_url(url).nodes
        startup = [ClusterNode(host, port) for host, port in nodes]  # type: ignore[no-untyped-call]
        return redis.RedisCluster(startup_nodes=startup)
    return redis.Redis.from_url(url)


@pytest.fixture(scope="session")
def single_redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    url = os.environ.get("CREDITGATE_TEST_REDIS_URL", DEFAULT_REDIS)
    if redis_answers(url, timeout=2):
        _SESSION_REDIS.append(url)
        yield url
        return
    if os.environ.get("CI") == "true" or "CREDITGATE_TEST_REDIS_URL" in os.environ:
        pytest.fail(f"Redis at {url} does not answer; with CI=true (or an explicit URL) the tests need it.")
    embedded = EmbeddedRedis(tmp_path_factory.mktemp("redis"), persist=False)
    try:
        _SESSION_REDIS.append(embedded.start())
        yield _SESSION_REDIS[-1]
    finally:
        embedded.stop()


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """A 6-node Redis Cluster (3 masters, 3 replicas) on loopback, started once, for the tests that ask.
    Without redis-server/redis-cli: a failure with CI=true, else a skip naming what is missing."""
    cluster = LocalCluster(tmp_path_factory.mktemp("cluster"))
    try:
        url = cluster.start()
    except ClusterUnavailable as exc:
        if os.environ.get("CI") == "true":
            pytest.fail(f"cannot start a Redis Cluster: {exc}; with CI=true the cluster tests need one.")
        pytest.skip(f"no local Redis Cluster: {exc}")
    _SESSION_REDIS.append(url)
    try:
        yield cluster
    finally:
        _SESSION_REDIS.remove(url)
        cluster.stop()


@pytest.fixture
def redis_url(topology: str, request: pytest.FixtureRequest) -> str:
    """The Redis of this test's topology: one node, or the cluster's ``redis+cluster://`` URL."""
    if topology == "cluster":
        cluster: LocalCluster = request.getfixturevalue("redis_cluster")
        return cluster.url
    return str(request.getfixturevalue("single_redis_url"))


def _pg_answers(dsn: str) -> bool:
    async def probe() -> bool:
        try:
            conn = await asyncpg.connect(dsn, timeout=3)
        except (OSError, asyncpg.PostgresError, TimeoutError):
            return False
        await conn.close()
        return True

    return asyncio.run(probe())


@pytest.fixture(scope="session")
def database_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    dsn = os.environ.get("CREDITGATE_TEST_DATABASE_URL", DEFAULT_DATABASE)
    if _pg_answers(dsn):
        yield dsn
        return
    if os.environ.get("CI") == "true" or "CREDITGATE_TEST_DATABASE_URL" in os.environ:
        pytest.fail(
            f"Postgres at {dsn} does not answer; with CI=true (or an explicit URL) the tests need it."
        )
    embedded = EmbeddedPostgres(tmp_path_factory.mktemp("pg"))
    try:
        yield embedded.start()
    finally:
        embedded.stop()


def clean_env(**settings: str) -> dict[str, str]:
    """This process's environment without any CREDITGATE_* variable, plus `settings` (for subprocesses)."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("CREDITGATE_")}
    return {**env, **settings}


def process_env(
    redis_url: str, database_url: str, prefix: str, upstream_url: str, **settings: str
) -> dict[str, str]:
    """The environment of a real `creditgate serve` on these servers and this upstream (its pooled key a
    test one), listening on any free port, plus `settings`."""
    return clean_env(
        CREDITGATE_UPSTREAM_URL=upstream_url,
        CREDITGATE_UPSTREAM_API_KEY="sk-test",
        CREDITGATE_REDIS_URL=redis_url,
        CREDITGATE_DATABASE_URL=database_url,
        CREDITGATE_KEY_PREFIX=prefix,
        CREDITGATE_PORT="0",
        **settings,
    )


@pytest.fixture(scope="session")
def _spare_schemas(database_server: str) -> Iterator[list[Spare]]:
    """This process's migrated schemas not in use (tests/support_schemas.py); dropped at the end."""
    spares: list[Spare] = []
    yield spares

    async def drop_all() -> None:
        conn = await asyncpg.connect(database_server)
        try:
            for spare in spares:
                await drop_schema(conn, spare.name)
        finally:
            await conn.close()

    if spares:
        asyncio.run(drop_all())


@pytest.fixture
async def database_url(
    database_server: str, _spare_schemas: list[Spare], request: pytest.FixtureRequest
) -> AsyncIterator[str]:
    """A DSN whose search_path is a schema of this test's own: migrated, partitioned and empty, as a
    sidecar's first start leaves it (a spare, tests/support_schemas.py); an empty one for a test marked
    `empty_schema`."""
    conn = await asyncpg.connect(database_server)
    try:
        if request.node.get_closest_marker("empty_schema"):
            schema = new_schema_name()
            await conn.execute(f"CREATE SCHEMA {schema}")
            yield with_schema(database_server, schema)
            await drop_schema(conn, schema)
            return
        spare = _spare_schemas.pop() if _spare_schemas else await make_spare(conn)
        yield with_schema(database_server, spare.name)
        if await restore(conn, spare):
            _spare_schemas.append(spare)
        else:
            await drop_schema(conn, spare.name)
    finally:
        await conn.close()


@pytest.fixture
async def redis_client(redis_url: str) -> AsyncIterator[Redis]:
    """A redis-py client of the test's Redis (on the cluster, redis-py's cluster client: typed as the
    one-node client it stands in for)."""
    client: Any = connect_redis(redis_url) if is_cluster_url(redis_url) else Redis.from_url(redis_url)
    yield client
    await client.aclose()


def make_settings(
    redis_url: str, database_url: str, upstream_url: str = "http://127.0.0.1:9/v1", **overrides: Any
) -> Settings:
    """Settings as an operator would write them, with a key prefix of the test's own."""
    raw: dict[str, Any] = {
        "redis_url": redis_url,
        "database_url": database_url,
        "key_prefix": new_key_prefix(),
        "upstream_url": upstream_url,
        "upstream_api_key": PROVIDER_KEY,
        "admin_token": ADMIN_TOKEN,
        "auth_cache_seconds": 0,
        "disconnect_drain_seconds": 10,
        "forward_request_headers": ["x-demo-*"],  # the demo upstream is steered by them
    }
    raw.update(overrides)
    return msgspec.convert(raw, Settings)


@dataclass
class Upstream:
    server: TestServer
    app: web.Application
    seen_headers: list[dict[str, str]]

    @property
    def url(self) -> str:
        return str(self.server.make_url("/v1"))

    def calls(self, route: str | None = None) -> int:
        counter = self.app[CALLS]
        return counter[route] if route else sum(counter.values())


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    """The demo upstream on a real port; it records the headers of every request it receives."""
    seen: list[dict[str, str]] = []

    @web.middleware
    async def record(request: web.Request, handler: Any) -> web.StreamResponse:
        seen.append(dict(request.headers))
        response: web.StreamResponse = await handler(request)
        return response

    app = create_demo_upstream(["gpt-4o-mini"])
    app.middlewares.append(record)
    server = TestServer(app)
    await server.start_server()
    yield Upstream(server, app, seen)
    await server.close()


@dataclass
class Sidecar:
    client: TestClient[web.Request, web.Application]
    settings: Settings
    # The ops listener's app, when the settings give one (sidecar mode, or ops_port set).
    ops: TestClient[web.Request, web.Application] | None = None

    @property
    def health(self) -> TestClient[web.Request, web.Application]:
        """The client that serves /healthz, /readyz and /metrics: the ops listener's, else the API's."""
        return self.ops or self.client

    @property
    def services(self) -> Services:
        return self.client.app[SERVICES]

    @property
    def balances(self) -> Balances:
        return self.services.balances

    def admin_headers(self, **extra: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {ADMIN_TOKEN}", **extra}

    async def admin(self, method: str, path: str, json: Any = None, **headers: str) -> Any:
        resp = await self.client.request(
            method, f"/admin{path}", json=json, headers=self.admin_headers(**headers)
        )
        body = await resp.json()
        assert resp.status < 300, body
        return body

    async def account(self, micro: int, account: str | None = None) -> tuple[str, str]:
        """A new account holding `micro` micro-credits and a key for it: (account id, API key)."""
        created = await self.admin("POST", "/accounts", {"id": account} if account else {})
        if micro:
            await self.admin(
                "POST",
                f"/accounts/{created['id']}/grants",
                {"amount": micro},
                **{"Idempotency-Key": uuid.uuid4().hex},
            )
        key = await self.admin("POST", f"/accounts/{created['id']}/keys")
        return created["id"], key["key"]

    async def balance(self, account: str) -> dict[str, Any]:
        result: dict[str, Any] = await self.admin("GET", f"/accounts/{account}")
        return result


SidecarFactory = Callable[..., Awaitable[Sidecar]]


@pytest.fixture
async def make_sidecar(
    redis_url: str, database_url: str, upstream: Upstream, aiohttp_client: Any
) -> SidecarFactory:
    async def factory(**overrides: Any) -> Sidecar:
        settings = make_settings(redis_url, database_url, **{"upstream_url": upstream.url, **overrides})
        client = await aiohttp_client(create_app(settings))
        ops = None
        if settings.ops_listen_port is not None:  # served beside the API app, as `serve` does
            ops = await aiohttp_client(create_ops_app(client.app))
        return Sidecar(client, settings, ops)

    return factory


@pytest.fixture
async def sidecar(make_sidecar: SidecarFactory) -> Sidecar:
    return await make_sidecar()


@pytest.fixture
def config_file(tmp_path: Path) -> Callable[[str], str]:
    def write(text: str) -> str:
        path = tmp_path / "creditgate.yaml"
        path.write_text(text)
        return str(path)

    return write


class Served:
    """A real ``creditgate serve`` process; its stderr (the log) is read line by line as it comes."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.lines: list[str] = []
        self.ended = False
        self._changed = asyncio.Condition()
        assert proc.stderr is not None
        self._pump = asyncio.create_task(self._read(proc.stderr), name="serve-stderr")

    async def _read(self, stream: asyncio.StreamReader) -> None:
        while True:
            line = await stream.readline()
            async with self._changed:
                if line:
                    self.lines.append(line.decode())
                else:
                    self.ended = True
                self._changed.notify_all()
            if not line:
                return

    @property
    def log(self) -> str:
        return "".join(self.lines)

    async def wait_for(self, pattern: str) -> re.Match[str]:
        """The first match of `pattern` in the log, once it appears (fails if the log ends first)."""
        async with asyncio.timeout(60), self._changed:
            await self._changed.wait_for(lambda: bool(re.search(pattern, self.log)) or self.ended)
        found = re.search(pattern, self.log)
        assert found, f"{pattern!r} never appeared in the log:\n{self.log}"
        return found

    async def stop(self, sig: signal.Signals = signal.SIGTERM) -> int:
        """Send `sig`, wait for the process to exit and its log to end; returns the exit code."""
        if self.proc.returncode is None:
            self.proc.send_signal(sig)
        async with asyncio.timeout(60):
            code = await self.proc.wait()
            await self._pump
        return code

    async def kill(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()
        self._pump.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._pump


@contextlib.asynccontextmanager
async def serve_process(env: dict[str, str], cwd: Path, *args: str) -> AsyncIterator[tuple[Served, str]]:
    """Run ``creditgate serve`` with `env` (use clean_env, CREDITGATE_PORT=0); yields it and its base URL
    once it listens. Killed on the way out if a test left it running."""
    async with creditgate_process(
        env, cwd, "serve", *args, ready=r"creditgate listening on (http://[0-9.]+:[0-9]+)"
    ) as started:
        yield started


@contextlib.asynccontextmanager
async def creditgate_process(
    env: dict[str, str], cwd: Path, command: str, *args: str, ready: str
) -> AsyncIterator[tuple[Served, str]]:
    """Run ``creditgate COMMAND ARGS`` with `env`; yields it and the first group of `ready`'s first match
    in its log, once it appears. Killed on the way out if a test left it running."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "sidecar",
        command,
        *args,
        env=env,
        cwd=cwd,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    served = Served(proc)
    try:
        found = await served.wait_for(ready)
        yield served, found.group(1)
    finally:
        await served.kill()
