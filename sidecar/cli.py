"""The creditgate command: serve, demo and the operator verbs (accounts, keys, grants, balances)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import msgspec
from aiohttp import web

from . import __version__
from .admin import MONEY_IN_KINDS, grant_amount
from .app import Services, create_app, create_ops_app, services
from .config import Settings, load_settings, service_links
from .demo import create_demo_upstream
from .embedded import EmbeddedPostgres, EmbeddedRedis
from .errors import CreditgateError
from .health import READINESS
from .logs import configure_logging
from .money import format_credits
from .reconcile import reconcile, repair

log = logging.getLogger("creditgate")
# After on_shutdown (where the sidecar waits up to shutdown_grace_seconds for its exchanges, then cuts
# them), how long other handlers still busy (admin calls) get before they are cancelled.
HANDLER_SHUTDOWN_SECONDS = 10.0


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency except on Windows
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


@contextlib.contextmanager
def resolve_services(settings: Settings) -> Iterator[Settings]:
    """Settings with redis_url and database_url set: the configured ones, or embedded servers'
    under data_dir (started here, or joined when `serve` already runs them)."""
    with contextlib.ExitStack() as stack:
        if not settings.redis_url:
            embedded_redis = EmbeddedRedis(settings.data_dir)
            settings = msgspec.structs.replace(settings, redis_url=embedded_redis.start())
            stack.callback(embedded_redis.stop)
        if not settings.database_url:
            embedded_pg = EmbeddedPostgres(settings.data_dir)
            settings = msgspec.structs.replace(settings, database_url=embedded_pg.start())
            stack.callback(embedded_pg.stop)
        yield settings


class CannotListen(Exception):
    """A listener could not bind its address; the message names the settings that choose it."""


@contextlib.asynccontextmanager
async def _site(
    app: web.Application,
    host: str,
    port: int,
    shutdown_timeout: float = 60.0,
    settings: str = "host / port, or --host / --port",
) -> AsyncIterator[str]:
    """Serve `app`; on exit stop listening, run on_shutdown (the sidecar finishes its requests there),
    give handlers still busy `shutdown_timeout` seconds, then run the cleanup contexts."""
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=shutdown_timeout)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
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


async def _serve(settings: Settings, on_ready: Callable[[str, str], Awaitable[None]] | None = None) -> None:
    """Serve the API listener and, when there is one, the ops listener, until SIGTERM / SIGINT.

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
        app = create_app(settings, demo_upstream_url=demo_url)
        ops_port = settings.ops_listen_port
        ops_url = None
        if ops_port is not None:
            ops_url = await stack.enter_async_context(
                _site(create_ops_app(app), settings.ops_host, ops_port, settings="ops_host / ops_port")
            )
            log.info("creditgate ops listening on %s (/healthz, /readyz, /metrics)", ops_url)
        url = await stack.enter_async_context(
            _site(app, settings.host, settings.port, HANDLER_SHUTDOWN_SECONDS)
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


async def _demo_bootstrap(settings: Settings, url: str, ops_url: str) -> None:
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


def _run(coro: Awaitable[Any]) -> Any:
    async def main() -> Any:
        return await coro

    with asyncio.Runner(loop_factory=_new_loop) as runner:
        return runner.run(main())


async def _with_services(settings: Settings, call: Callable[[Services], Awaitable[Any]]) -> Any:
    async with services(settings) as svc:
        return await call(svc)


async def _flush(svc: Services, drain: bool) -> dict[str, Any]:
    flusher = svc.flusher()
    if drain:
        return {"rows_written": await flusher.drain()}
    await flusher.run()  # until interrupted
    return {}  # pragma: no cover


async def _reconcile(svc: Services, fix: bool) -> dict[str, Any]:
    if fix:
        drifts = await repair(svc.redis, svc.keys, svc.store, svc.balances)
    else:
        drifts = await reconcile(svc.redis, svc.keys, svc.store)
    return {
        "repaired" if fix else "drifting": [
            {
                "account": d.account,
                "redis_balance": d.redis_balance,
                "ledger_expects": d.expected,
                "drift": d.amount,
            }
            for d in drifts
        ]
    }


def _parser() -> argparse.ArgumentParser:
    # --config is taken before or after the subcommand (the later one wins).
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--config", default=argparse.SUPPRESS, help="YAML settings file (also CREDITGATE_CONFIG)"
    )
    parser = argparse.ArgumentParser(prog="creditgate", description=__doc__, parents=[common])
    parser.add_argument("--version", action="version", version=f"creditgate {__version__}")
    sub = _Subparsers(parser.add_subparsers(dest="command", required=True), common)
    for name, text in (
        ("serve", "run the sidecar (needs upstream_url or upstreams)"),
        ("demo", "run the sidecar with a fake upstream and a funded demo account"),
    ):
        listener = sub.add_parser(name, help=text)
        listener.add_argument("--host", help="the API listener's address (the host setting)")
        listener.add_argument("--port", type=int, help="the API listener's port (the port setting; 0: any)")
    account = sub.nested(sub.add_parser("account", help="accounts"))
    create = account.add_parser("create", help="create an account")
    create.add_argument("id", nargs="?", help="account id (generated when left out)")
    show = account.add_parser("balance", help="show balance and active holds")
    show.add_argument("id")
    key = sub.nested(sub.add_parser("key", help="client API keys"))
    key_create = key.add_parser("create", help="create a key (printed once)")
    key_create.add_argument("account")
    key_revoke = key.add_parser("revoke", help="revoke a key by its id")
    key_revoke.add_argument("key_id")
    grant = sub.add_parser("grant", help="add credits to an account, once per idempotency key")
    grant.add_argument("account")
    amount = grant.add_mutually_exclusive_group(required=True)
    amount.add_argument("--credits", help="decimal credits, e.g. 12.5")
    amount.add_argument("--amount", type=int, help="micro-credits")
    grant.add_argument("--idempotency-key", required=True)
    grant.add_argument("--kind", default="grant", choices=MONEY_IN_KINDS)
    grant.add_argument("--note")
    sub.add_parser("migrate", help="apply the Postgres migrations (safe to run twice)")
    flush = sub.add_parser("flush", help="run the outbox flusher standalone")
    flush.add_argument("--drain", action="store_true", help="write what is waiting, then exit")
    rec = sub.add_parser("reconcile", help="compare Redis balances with the ledger")
    rec.add_argument("--repair", action="store_true", help="complete half-done grants and fix drift")
    return parser


class _Subparsers:
    """Subcommands that each take the common options (--config) too."""

    def __init__(self, action: Any, common: argparse.ArgumentParser) -> None:
        self.action = action
        self.common = common

    def add_parser(self, name: str, **kwargs: Any) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = self.action.add_parser(name, parents=[self.common], **kwargs)
        return parser

    def nested(self, parser: argparse.ArgumentParser) -> _Subparsers:
        return _Subparsers(parser.add_subparsers(dest="verb", required=True), self.common)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    listen = {k: v for k in ("host", "port") if (v := getattr(args, k, None)) is not None}
    if "port" in listen and not 0 <= listen["port"] <= 65535:
        print("creditgate: --port must be between 0 and 65535.", file=sys.stderr)
        return 2
    try:  # --host / --port are part of the settings checked (what is exposed depends on the host)
        settings = load_settings(getattr(args, "config", None), overrides=listen)
    except CreditgateError as exc:
        print(f"creditgate: {exc.message}", file=sys.stderr)
        return 2
    if args.command == "serve" and settings.demo_upstream:
        print(
            "creditgate: no upstream configured: set upstream_url (CREDITGATE_UPSTREAM_URL) and "
            "upstream_api_key, or upstreams; `creditgate demo` runs with a fake upstream.",
            file=sys.stderr,
        )
        return 2
    configure_logging(settings)
    try:
        with resolve_services(settings) as ready:
            return _dispatch(args, ready)
    except CreditgateError as exc:
        print(json.dumps(exc.body(), indent=2), file=sys.stderr)
        return 1
    except CannotListen as exc:
        print(f"creditgate: {exc}", file=sys.stderr)
        return 2


def _dispatch(args: argparse.Namespace, settings: Settings) -> int:
    if args.command == "serve":
        _run(_serve(settings))
        return 0
    if args.command == "demo":
        if not settings.demo_upstream:
            print(
                "creditgate demo uses its own fake upstream; unset CREDITGATE_UPSTREAM_* to run it.",
                file=sys.stderr,
            )
            return 2

        async def ready(url: str, ops_url: str) -> None:
            await _demo_bootstrap(settings, url, ops_url)

        _run(_serve(settings, ready))
        return 0
    verb = (args.command, getattr(args, "verb", None))
    calls: dict[tuple[str, str | None], Callable[[Services], Awaitable[Any]]] = {
        ("migrate", None): lambda svc: _migrate(svc),
        ("flush", None): lambda svc: _flush(svc, args.drain),
        ("reconcile", None): lambda svc: _reconcile(svc, args.repair),
        ("account", "create"): lambda svc: svc.admin.create_account(getattr(args, "id", None)),
        ("account", "balance"): lambda svc: svc.admin.balance(args.id),
        ("key", "create"): lambda svc: svc.admin.create_key(args.account),
        ("key", "revoke"): lambda svc: svc.admin.revoke_key(args.key_id),
        ("grant", None): lambda svc: svc.admin.grant(
            args.account, grant_amount(args.amount, args.credits), args.idempotency_key, args.kind, args.note
        ),
    }
    result = _run(_with_services(settings, calls[verb]))
    print(json.dumps(result, indent=2))
    return 0


async def _migrate(svc: Services) -> dict[str, Any]:
    return {"applied": await svc.store.migrate()}


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
