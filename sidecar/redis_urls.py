"""``redis_url`` naming a Redis Cluster: ``redis+cluster://[user:password@]host:port[,host:port...][?query]``
(``rediss+cluster://`` for TLS). The nodes listed are only the first ones asked for the slot map; the
rest of the cluster is found from it. Credentials and query parameters (redis-py's: ``ssl_ca_certs``,
``ssl_cert_reqs`` …) apply to every node. A cluster has database 0 only: a path other than ``/`` or
``/0`` is refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit

CLUSTER_SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}


@dataclass(frozen=True, slots=True)
class ClusterURL:
    scheme: str  # the plain scheme of each node: redis or rediss
    userinfo: str  # "user:password@" or ""
    nodes: tuple[tuple[str, int], ...]
    query: str

    def node_url(self, host: str, port: int) -> str:
        """A plain URL of one node with the cluster's credentials and parameters."""
        where = f"[{host}]" if ":" in host else host
        return f"{self.scheme}://{self.userinfo}{where}:{port}/0" + (f"?{self.query}" if self.query else "")

    @property
    def seed_urls(self) -> list[str]:
        return [self.node_url(host, port) for host, port in self.nodes]


def is_cluster_url(url: str) -> bool:
    return url.split("://", 1)[0].lower() in CLUSTER_SCHEMES


def parse_cluster_url(url: str) -> ClusterURL:
    """The nodes and settings of a cluster URL; ValueError naming what is wrong."""
    scheme, _, rest = url.partition("://")
    plain = CLUSTER_SCHEMES.get(scheme.lower())
    if plain is None:
        raise ValueError(f"not a cluster URL (redis+cluster:// or rediss+cluster://): {scheme}://…")
    parts = urlsplit(f"{plain}://{rest}")
    userinfo, _, hosts = parts.netloc.rpartition("@")
    if parts.path not in ("", "/", "/0"):
        raise ValueError("a Redis Cluster has database 0 only: drop the path of redis_url")
    nodes = []
    for item in hosts.split(","):
        host, port = _host_port(item.strip())
        nodes.append((host, port))
    return ClusterURL(plain, f"{userinfo}@" if userinfo else "", tuple(nodes), parts.query)


def _host_port(item: str) -> tuple[str, int]:
    if item.startswith("["):  # [IPv6]:port
        host, _, port = item[1:].partition("]")
        port = port.removeprefix(":")
    else:
        host, _, port = item.rpartition(":") if ":" in item else (item, "", "")
    if not host:
        raise ValueError(f"a cluster node needs a host: {item!r}")
    try:
        number = int(port) if port else 6379
    except ValueError:
        raise ValueError(f"a cluster node's port must be a number: {item!r}") from None
    if not 0 < number < 65536:
        raise ValueError(f"a cluster node's port must be 1-65535: {item!r}")
    return host, number
