"""Serving: the API listener (and the ops listener beside it), until SIGTERM or SIGINT; `demo` adds its
fake upstream and a bootstrapped account. The command line around it is cli.py."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

import msgspec
from aiohttp import web

from .app import create_app, create_ops_app, services
from .config import Settings, service_links
from .connections import ListenerLimits, listener_runner
from .demo import create_demo_upstream
from .health import READINESS
from .money import format_credits

log = logging.getLogger("creditgate")
T = TypeVar("T")
# After on_shutdown (where the sidecar waits up to shutdown_grace_seconds for its exchanges, then cuts
# them), how long other handlers still busy (admin calls) get before they are cancelled.
HANDLER_SHUTDOWN_SECONDS = 10.0


class CannotListen(Exception):
    """A listener could not bind its address; the message names the settings that choose it."""


@contextlib.asynccontextmanager
async def _site(
    app: web.Application,
    host: str,
    port: int,
    shutdown_timeout: float = 60.0,
    settings: str = "host / port, or --host / --port",
    limits: ListenerLimits | None = None,
    reuse_port: bool = False,
) -> AsyncIterator[str]:
    """Serve `app`; on exit stop listening, run on_shutdown (the sidecar finishes its requests there),
    give handlers still busy `shutdown_timeout` seconds, then run the cleanup contexts. With `limits`
    (every listener clients reach), its connections are guarded (see connections.py). With `reuse_port`
    (workers > 1) the port is shared (SO_REUSEPORT) with the node's other serving processes."""
    runner = listener_runner(app, limits, access_log=None, shutdown_timeout=shutdown_timeout)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port, reuse_port=reuse_port or None)
        try:
            await site.start()
        except OSError as exc:
            raise CannotListen(
                f"cannot listen on {host}:{port}: {exc.strerror or exc} (set {settings})."
            ) from None
        server = runner.server
        assert server is not None
        sockets = runner.addresses
        actual = sockets[0][1] if sockets else port
        yield f"http://{host}:{actual}"
    finally:
        await runner.cleanup()


async def _until_signalled() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("stopping: no new connections; finishing the requests in flight")


def new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency except on Windows
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def run(coro: Awaitable[T]) -> T:
    """Run `coro` to completion in a new event loop (uvloop where there is one)."""

    async def main() -> T:
        return await coro

    with asyncio.Runner(loop_factory=new_loop) as runner:
        return runner.run(main())


async def serve(
    settings: Settings,
    on_ready: Callable[[str, str], Awaitable[None]] | None = None,
    *,
    worker: int | None = None,
) -> None:
    """Serve the API listener and, when there is one, the ops listener, until SIGTERM / SIGINT.

    As `worker` i of a pool (workers.py), both ports are shared with the other workers and only worker 0
    runs the node's flusher, reconciler and hold reaper.

    The ops listener starts first and stops last: its /readyz answers 503 while the API app starts,
    and from the signal on (before the API listener stops) while the requests in flight finish."""
    links = service_links()
    if links:  # Kubernetes service links (enableServiceLinks): not settings, so not read
        log.info("ignoring %d Kubernetes service-link variables: %s", len(links), ", ".join(links))
    if log.isEnabledFor(logging.DEBUG):  # every setting in effect (the log redacts the secrets among them)
        log.debug("settings in effect: %s", msgspec.json.encode(settings).decode())
    async with contextlib.AsyncExitStack() as stack:
        demo_url = None
        if settings.demo_upstream:
            models = [*settings.models, *(a for m in settings.models.values() for a in m.aliases)]
            base = await stack.enter_async_context(_site(create_demo_upstream(models), "127.0.0.1", 0))
            demo_url = f"{base}/v1"
            log.warning(
                "no upstream configured (CREDITGATE_UPSTREAM_URL / _API_KEY): using the built-in demo "
                "upstream at %s",
                demo_url,
            )
        app = create_app(settings, demo_upstream_url=demo_url, node_tasks=not worker)
        shared = worker is not None
        ops_port = settings.ops_listen_port
        ops_url = None
        if ops_port is not None:
            ops_url = await stack.enter_async_context(
                _site(
                    create_ops_app(app),
                    settings.ops_host,
                    ops_port,
                    settings="ops_host / ops_port",
                    limits=ListenerLimits.of(settings),
                    reuse_port=shared,
                )
            )
            log.info("creditgate ops listening on %s (/healthz, /readyz, /metrics)", ops_url)
        url = await stack.enter_async_context(
            _site(
                app,
                settings.host,
                settings.port,
                HANDLER_SHUTDOWN_SECONDS,
                limits=ListenerLimits.of(settings),
                reuse_port=shared,
            )
        )
        log.info(
            "creditgate listening on %s (/v1%s%s)",
            url,
            ", /admin" if settings.admin_api else "",
            "" if ops_url else ", /healthz, /readyz, /metrics",
        )
        if on_ready is not None:
            await on_ready(url, ops_url or url)
        await _until_signalled()
        app[READINESS].stopping = True  # not ready from now on, before the API listener stops


async def demo_bootstrap(settings: Settings, url: str, ops_url: str) -> None:
    async with services(settings, prepare=False) as svc:
        ops = svc.admin
        if not await svc.store.account_exists("demo"):
            await ops.create_account("demo")
        grant = await ops.grant("demo", 10_000_000, "demo-welcome-credits", note="creditgate demo")
        key = await ops.create_key("demo")
    model = next(iter(settings.models))
    print(
        f"""
creditgate demo is running.

  base URL : {url}/v1
  API key  : {key["key"]}     (account "demo", balance {format_credits(grant["balance"])} credits)

Try it (each call is charged; see the x-creditgate-* response headers):

  curl -si {url}/v1/chat/completions \\
    -H 'Authorization: Bearer {key["key"]}' -H 'Content-Type: application/json' \\
    -d '{{"model": "{model}", "messages": [{{"role": "user", "content": "Hello there"}}]}}'

Or point the OpenAI SDK at it: OpenAI(base_url="{url}/v1", api_key="{key["key"]}").
Health and metrics: {ops_url}/healthz, {ops_url}/readyz, {ops_url}/metrics
Press Ctrl-C to stop.
""",
        flush=True,
    )
