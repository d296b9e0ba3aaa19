"""`creditgate serve` with `workers` > 1: N serving processes on one port, under this supervising parent.

Each worker is a spawned process that runs `serve` with the API port (and the ops port) shared through
SO_REUSEPORT: the kernel spreads new connections over the workers. Worker 0 alone runs the node's
flusher, reconciler and hold reaper (`flusher_enabled` and `reconcile_interval_seconds` apply to it);
every worker renews its own holds' leases and retries its own settlements. The parent serves nothing:
embedded Redis / Postgres are started by the CLI before it, once; it restarts a worker that dies
(after a pause when it dies young), passes SIGTERM / SIGINT on to every worker as SIGTERM and waits for
their graceful shutdowns, then writes what the outbox still holds to the ledger (requests the others
finished after worker 0's final flush) and exits 0.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import socket
import sys
import time
from collections.abc import Iterator
from multiprocessing.process import BaseProcess

import msgspec

from .app import final_flush, services
from .config import Settings
from .errors import ConfigError
from .logs import configure_logging
from .serve import CannotListen, run, serve

log = logging.getLogger("creditgate.workers")
EXIT_CANNOT_LISTEN = 2  # a worker that cannot bind its ports: not restarted, the pool stops
YOUNG_SECONDS = 10.0  # a worker that dies younger than this is restarted after a growing pause
MAX_PAUSE_SECONDS = 30.0
PR_SET_PDEATHSIG = 1


def serve_workers(settings: Settings) -> int:
    """Run `settings.workers` serving processes until SIGTERM / SIGINT; the process's exit code."""
    with _reserved_ports(settings) as settings:
        pool = _Pool(settings)
        code = pool.run()
    if settings.flusher_enabled:
        run(_last_flush(settings))
    return code


@contextlib.contextmanager
def _reserved_ports(settings: Settings) -> Iterator[Settings]:
    """Port 0 (any) made one concrete port for every worker: bound here with SO_REUSEPORT (never
    listening, so no connection comes here), which keeps it ours until the pool has stopped."""
    with contextlib.ExitStack() as stack:
        chosen: dict[str, int] = {}
        listeners = (
            ("port", settings.host, settings.port),
            ("ops_port", settings.ops_host, settings.ops_listen_port),
        )
        for name, host, port in listeners:
            if port != 0:
                continue
            family, kind, proto, _, address = socket.getaddrinfo(host, 0, type=socket.SOCK_STREAM)[0]
            sock = stack.enter_context(socket.socket(family, kind, proto))
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            try:
                sock.bind(address)
            except OSError as exc:
                raise CannotListen(
                    f"cannot listen on {host}:0: {exc.strerror or exc} (set {name})."
                ) from None
            chosen[name] = sock.getsockname()[1]
        yield msgspec.structs.replace(settings, **chosen) if chosen else settings


class _Pool:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.context = multiprocessing.get_context("spawn")
        self.procs: dict[int, BaseProcess] = {}
        self.born: dict[int, float] = {}
        self.pause: dict[int, float] = {}
        self.restart_at: dict[int, float] = {}
        self.stopping = False
        self.code = 0

    def start(self, index: int) -> None:
        proc = self.context.Process(
            target=worker_main, args=(self.settings, index, os.getpid()), name=f"creditgate-worker-{index}"
        )
        proc.start()
        self.procs[index], self.born[index] = proc, time.monotonic()
        log.info("worker %d started (pid %s)", index, proc.pid)

    def run(self) -> int:
        wake_read, wake_write = os.pipe()
        os.set_blocking(wake_write, False)
        previous = {sig: signal.signal(sig, self._signalled) for sig in (signal.SIGTERM, signal.SIGINT)}
        old_fd = signal.set_wakeup_fd(wake_write)
        try:
            log.info(
                "creditgate: %d workers sharing %s:%d",
                self.settings.workers,
                self.settings.host,
                self.settings.port,
            )
            for index in range(self.settings.workers):
                self.start(index)
            self._supervise(wake_read)
        finally:
            signal.set_wakeup_fd(old_fd)
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            os.close(wake_read)
            os.close(wake_write)
        return self.code

    def _signalled(self, signum: int, frame: object) -> None:
        if not self.stopping:
            self.stopping = True
            log.info("stopping: passing signal %d to %d workers as SIGTERM", signum, len(self.procs))
            self._stop_all()

    def _stop_all(self) -> None:
        self.restart_at.clear()
        for proc in self.procs.values():
            if proc.exitcode is None and proc.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGTERM)

    def _supervise(self, wake: int) -> None:
        while self.procs or self.restart_at:
            timeout = None
            if self.restart_at:
                timeout = max(0.0, min(self.restart_at.values()) - time.monotonic())
            waiting: list[int] = [wake, *(proc.sentinel for proc in self.procs.values())]
            ready = multiprocessing.connection.wait(waiting, timeout)
            if wake in ready:
                with contextlib.suppress(BlockingIOError):
                    os.read(wake, 512)
            for index, proc in list(self.procs.items()):
                if proc.exitcode is not None:
                    proc.join()
                    del self.procs[index]
                    self._ended(index, proc)
            now = time.monotonic()
            for index, due in list(self.restart_at.items()):
                if due <= now and not self.stopping:
                    del self.restart_at[index]
                    self.start(index)

    def _ended(self, index: int, proc: BaseProcess) -> None:
        code = proc.exitcode
        if self.stopping:
            clean = code in (0, -signal.SIGTERM)  # SIGTERM before its handler was in place: nothing served
            log.info("worker %d (pid %s) stopped (exit code %s)", index, proc.pid, code)
            if not clean and self.code == 0:
                self.code = 1
            return
        if code == EXIT_CANNOT_LISTEN:
            log.error("worker %d (pid %s) cannot listen; stopping the other workers", index, proc.pid)
            self.code = EXIT_CANNOT_LISTEN
            self.stopping = True
            self._stop_all()
            return
        lived = time.monotonic() - self.born[index]
        pause = (
            0.0 if lived >= YOUNG_SECONDS else min(MAX_PAUSE_SECONDS, max(1.0, 2 * self.pause.get(index, 0)))
        )
        self.pause[index] = pause
        log.error(
            "worker %d (pid %s) exited with code %s after %.1f s; restarting it in %.0f s",
            index,
            proc.pid,
            code,
            lived,
            pause,
        )
        self.restart_at[index] = time.monotonic() + pause


async def _last_flush(settings: Settings) -> None:
    """Every worker has stopped: write to the ledger what the outbox still holds."""
    try:
        async with services(settings, prepare=False) as svc:
            await final_flush(svc.flusher(), settings.shutdown_flush_seconds)
    except Exception as exc:
        log.error("final flush after the workers stopped failed (%r); the rest waits in Redis", exc)


class _WorkerFields(logging.Filter):
    """Every log line of a worker names it: `worker` (its index) and `pid`."""

    def __init__(self, index: int) -> None:
        super().__init__()
        self.index, self.pid = index, os.getpid()

    def filter(self, record: logging.LogRecord) -> bool:
        record.worker, record.pid = self.index, self.pid
        return True


def worker_main(settings: Settings, index: int, parent: int) -> None:
    """A worker process: serve with the shared ports until SIGTERM (SIGINT is the parent's to pass on)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if sys.platform == "linux":  # gone with the parent, so no orphan keeps serving on the shared port
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:
        sys.exit(0)
    configure_logging(settings)
    for handler in logging.getLogger().handlers:
        handler.addFilter(_WorkerFields(index))
    try:
        run(serve(settings, worker=index))
    except (CannotListen, ConfigError) as exc:  # a port, or Redis' eviction policy: not restarted
        log.error("creditgate: %s", exc)
        sys.exit(EXIT_CANNOT_LISTEN)
