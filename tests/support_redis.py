"""A throwaway redis-server of a test's own (Debian's /usr/bin/redis-server, or one on PATH), started
with the options the test is about, on a free loopback port, and stopped afterwards."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis


def redis_server_binary() -> str:
    found = shutil.which("redis-server") or (
        "/usr/bin/redis-server" if Path("/usr/bin/redis-server").exists() else None
    )
    if found is None:
        if os.environ.get("CI") == "true":
            pytest.fail("redis-server is not installed; with CI=true the tests need it")
        pytest.skip("redis-server is not installed")
    return found


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextlib.contextmanager
def redis_server(directory: Path, *options: str) -> Iterator[str]:
    """A redis-server with `options` (e.g. "--maxmemory-policy", "allkeys-lru"); yields its URL once it
    answers PING."""
    port = free_port()
    proc = subprocess.Popen(
        [
            redis_server_binary(),
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(directory),
            *options,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    try:
        client = redis.Redis.from_url(url, socket_timeout=1)
        deadline = time.monotonic() + 20
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server {' '.join(options)} did not start") from None
                time.sleep(0.02)  # polling a condition (the server answers) with a deadline
        client.close()
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


class OwnRedis:
    """A redis-server of the test's own that the test can kill (SIGKILL: no shutdown save) and start
    again on the same port and data directory: it comes back with what its RDB snapshot (``SAVE``) or its
    AOF held, and with an empty script cache."""

    def __init__(self, directory: Path, *options: str) -> None:
        self.directory = directory
        self.options = options
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> OwnRedis:
        self.proc = subprocess.Popen(
            [
                redis_server_binary(),
                *("--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.directory)),
                *("--save", "", "--appendonly", "no", *self.options),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = redis.Redis.from_url(self.url, socket_timeout=1)
        deadline = time.monotonic() + 20
        try:
            while True:
                try:
                    if client.ping():
                        return self
                except (redis.ConnectionError, redis.BusyLoadingError):
                    if self.proc.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError(f"redis-server on port {self.port} did not start") from None
                    time.sleep(0.02)  # polling a condition (the server answers) with a deadline
        finally:
            client.close()

    def kill(self) -> None:
        """SIGKILL: whatever was written since the last snapshot (or not yet fsynced) is lost."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)
            self.proc = None

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None


@contextlib.contextmanager
def own_redis(directory: Path, *options: str) -> Iterator[OwnRedis]:
    server = OwnRedis(directory, *options).start()
    try:
        yield server
    finally:
        server.stop()
