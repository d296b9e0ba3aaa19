"""The request path's auto-pipelined connection on a Redis Cluster: one ``AutoPipeline`` per node behind
a slot map.

Each command goes to the node that owns its first key's hash slot (``redis.crc.key_slot``; a money
script's keys all share one ``{p<N>}`` tag, so one slot), on that node's pipelined connection: the
batching per event-loop turn is kept, per node. The map is read with ``CLUSTER SLOTS`` from any node that
answers (the URL's nodes, then every node seen since). Redirects and outages:

- ``MOVED <slot> <host:port>``: the slot moved for good: the map is read again, and the command sent to
  the new owner (the redirect wins over a map read from a node that has not heard of the move yet).
- ``ASK <slot> <host:port>``: the slot is being migrated and the key is already on the target: the command
  is sent once to the target right after ``ASKING``; the map is left alone.
- ``CLUSTERDOWN`` / ``TRYAGAIN`` replies and a lost connection to a node (a master failing over): the
  map is read again and the command resent, with backoff (50 ms doubling), ``MAX_ATTEMPTS`` tries in all.
  A timeout is not resent here: the caller's retries decide (as on one node). A command still redirected
  after ``MAX_ATTEMPTS`` tries fails with ``ClusterError`` (a RedisError: the request path's 503).

With ``settle_wait_replicas`` the settle script goes to its master's second connection (its *write
lane*) and is followed there by ``WAIT``, which has no key: ``evalsha_replicated`` sends it to the very
connection that ran the script.

Resending is safe for the same reason as on one node: every money script is idempotent by an id.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from redis import exceptions as rx
from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot

from .autopipeline import Arg, AutoPipeline, Mark
from .redis_urls import is_cluster_url, parse_cluster_url

MAX_ATTEMPTS = 5
_SCRIPTS = {"EVALSHA", "EVAL", "EVALSHA_RO", "EVAL_RO", "FCALL", "FCALL_RO"}
_KEYLESS = {"PING", "ECHO", "INFO", "TIME", "CLUSTER", "SCRIPT", "COMMAND", "READONLY", "READWRITE"}


def _as_bytes(key: Arg) -> bytes:
    return key if isinstance(key, bytes) else str(key).encode()


def command_slot(args: Sequence[Arg]) -> int | None:
    """The hash slot of a command's first key; None for a command without keys."""
    name = _as_bytes(args[0]).upper().decode()
    if name in _SCRIPTS:
        return key_slot(_as_bytes(args[3])) if int(args[2]) > 0 else None
    if name in _KEYLESS or len(args) < 2:
        return None
    return key_slot(_as_bytes(args[1]))


def _address(text: str, default_host: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host or default_host, int(port)


class ClusterAutoPipeline:
    """The AutoPipeline interface (``execute``, ``evalsha``, ``aclose``) over every node of a cluster."""

    def __init__(self, url: str, *, timeout: float = 5.0, connect_timeout: float = 5.0) -> None:
        self.cluster = parse_cluster_url(url)
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.nodes: dict[tuple[str, int], AutoPipeline] = {}
        self.slots: list[AutoPipeline | None] = [None] * REDIS_CLUSTER_HASH_SLOTS
        self.generation = 0  # map reads so far: a refresh asked for by a stale caller is skipped
        self._refreshing: asyncio.Lock | None = None
        for host, port in self.cluster.nodes:
            self._node(host, port)

    def _node(self, host: str, port: int) -> AutoPipeline:
        node = self.nodes.get((host, port))
        if node is None:
            node = AutoPipeline(
                self.cluster.node_url(host, port), timeout=self.timeout, connect_timeout=self.connect_timeout
            )
            self.nodes[(host, port)] = node
        return node

    async def execute(self, *args: Arg) -> Any:
        """Send one command to the node of its first key (any node for a keyless one); its reply."""
        return await self._routed(command_slot(args), args)

    async def evalsha(self, sha: str, script: Arg, keys: Sequence[Arg], args: Sequence[Arg]) -> Any:
        """Run a Lua script by its SHA-1 on the node of its keys' slot (EVAL when that node lacks it)."""
        slot = key_slot(_as_bytes(keys[0])) if keys else None
        try:
            return await self._routed(slot, ("EVALSHA", sha, len(keys), *keys, *args))
        except rx.NoScriptError:
            return await self._routed(slot, ("EVAL", script, len(keys), *keys, *args))

    async def evalsha_replicated(
        self, sha: str, script: Arg, keys: Sequence[Arg], args: Sequence[Arg], replicas: int, timeout_ms: int
    ) -> tuple[Any, int | None]:
        """Run a script on the write lane of its slot's master (``AutoPipeline.lane``), then WAIT on that
        same connection (WAIT has no key: it goes to the connection that ran the script, even if the map
        changed meanwhile): (its reply, how many replicas acknowledged it, or None when that cannot be
        known: the WAIT failed, the master is gone)."""
        slot = key_slot(_as_bytes(keys[0])) if keys else None
        try:
            lane, mark, reply = await self._routed_on(slot, ("EVALSHA", sha, len(keys), *keys, *args), True)
        except rx.NoScriptError:
            lane, mark, reply = await self._routed_on(slot, ("EVAL", script, len(keys), *keys, *args), True)
        return reply, await lane.acknowledged(mark, replicas, timeout_ms)

    async def _routed(self, slot: int | None, command: Sequence[Arg]) -> Any:
        return (await self._routed_on(slot, command, False))[2]

    async def _routed_on(
        self, slot: int | None, command: Sequence[Arg], lane: bool
    ) -> tuple[AutoPipeline, Mark | None, Any]:
        """Send `command` to its slot's node (on its write lane with `lane`, marked), following
        redirects: the connection that answered, where the command went on it (with `lane`), the reply."""
        asking: AutoPipeline | None = None
        delay = 0.05
        failure: rx.RedisError | None = None
        for _ in range(MAX_ATTEMPTS):
            seen = self.generation
            try:
                if asking is not None:  # (unmarked: a WAIT sent after the reply covers it)
                    target, asking = asking.lane if lane else asking, None
                    return target, None, await target.execute_asking(*command)
                node = await self._owner(slot)
                if not lane:
                    return node, None, await node.execute(*command)
                mark, reply = await node.lane.execute_marked(*command)
                return node.lane, mark, reply
            except rx.NoScriptError:
                raise
            except rx.ResponseError as exc:
                kind, _, rest = str(exc).partition(" ")
                if kind == "ASK":
                    asking = self._node(*_address(rest.split()[1], self.cluster.nodes[0][0]))
                    failure = rx.ClusterError(f"still redirected after {MAX_ATTEMPTS} tries: {exc}")
                    continue
                if kind == "MOVED":
                    slot_text, where = rest.split()
                    target = self._node(*_address(where, self.cluster.nodes[0][0]))
                    await self._refresh(seen)
                    # The redirect wins over a map read from a node that has not heard of it yet (during
                    # a failover the nodes learn the new owner one by one, by gossip).
                    self.slots[int(slot_text)] = target
                    failure = rx.ClusterError(f"still redirected after {MAX_ATTEMPTS} tries: {exc}")
                    continue
                if kind not in ("CLUSTERDOWN", "TRYAGAIN"):
                    raise
                failure = exc
            except rx.ConnectionError as exc:  # the node is gone or unreachable: a failover may be under way
                failure = exc
            await asyncio.sleep(delay)  # backoff before the map is read again
            delay = min(delay * 2, 0.5)
            try:
                await self._refresh(seen)
            except rx.ConnectionError as exc:
                failure = exc
        assert failure is not None
        raise failure

    async def _owner(self, slot: int | None) -> AutoPipeline:
        if self.generation == 0:
            await self._refresh(0)
        if slot is None:
            return next(node for node in self.slots if node is not None)
        node = self.slots[slot]
        if node is None:
            raise rx.ClusterDownError(f"CLUSTERDOWN no node serves hash slot {slot}")
        return node

    async def _refresh(self, seen: int) -> None:
        """Read the slot map again, unless another caller did since `seen`."""
        if self._refreshing is None:
            self._refreshing = asyncio.Lock()
        async with self._refreshing:
            if self.generation != seen:
                return
            failure: Exception | None = None
            for (host, _), node in list(self.nodes.items()):
                try:
                    reply = await node.execute("CLUSTER", "SLOTS")
                except rx.RedisError as exc:
                    failure = exc
                    continue
                self._apply(reply, host)
                return
            raise rx.ConnectionError(f"no Redis Cluster node answered CLUSTER SLOTS: {failure!r}")

    def _apply(self, reply: list[Any], asked_host: str) -> None:
        slots: list[AutoPipeline | None] = [None] * REDIS_CLUSTER_HASH_SLOTS
        for start, end, primary, *_ in reply:
            host = primary[0].decode() if isinstance(primary[0], bytes) else str(primary[0])
            node = self._node(host if host and host != "?" else asked_host, int(primary[1]))
            slots[int(start) : int(end) + 1] = [node] * (int(end) - int(start) + 1)
        self.slots = slots
        self.generation += 1

    async def aclose(self) -> None:
        for node in self.nodes.values():
            await node.aclose()


def pipeline_for(
    url: str, *, timeout: float = 5.0, connect_timeout: float = 5.0
) -> AutoPipeline | ClusterAutoPipeline:
    """The request path's pipelined connection for `redis_url`: one node's, or one per cluster node."""
    kind = ClusterAutoPipeline if is_cluster_url(url) else AutoPipeline
    return kind(url, timeout=timeout, connect_timeout=connect_timeout)
