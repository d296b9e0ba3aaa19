"""The creditgate command: serve, demo and the operator verbs (accounts, keys, grants, balances)."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import msgspec

from . import __version__, wallet_cli
from .admin import MONEY_IN_KINDS, grant_amount
from .app import Services, services
from .config import Settings, load_settings
from .embedded import EmbeddedPostgres, EmbeddedRedis
from .errors import ConfigError, CreditgateError
from .flush_process import run_flush
from .grant_terms import GrantBody, grant_terms
from .logs import configure_logging
from .payments import manual_cli, refund_cli
from .reconcile import inspect, stale_after_ms
from .repair import repair_all
from .serve import CannotListen, demo_bootstrap, serve
from .serve import run as _run
from .vault import cli as vault_cli
from .workers import serve_workers

log = logging.getLogger("creditgate")


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


async def _with_services(settings: Settings, call: Callable[[Services], Awaitable[Any]]) -> Any:
    async with services(settings) as svc:
        return await call(svc)


async def _drain(svc: Services) -> dict[str, Any]:
    return {"rows_written": await svc.flusher().drain()}


async def _reconcile(svc: Services, fix: bool) -> dict[str, Any]:
    stale_hold_ms = stale_after_ms(svc.settings.reaper_interval_seconds)
    if fix:
        report = await repair_all(svc.redis, svc.keys, svc.store, svc.balances, stale_hold_ms=stale_hold_ms)
    else:
        report = await inspect(svc.redis, svc.keys, svc.store, stale_hold_ms=stale_hold_ms)
    drifts = report.accounts
    extra: dict[str, Any] = {"repairs": report.repaired} if fix else {}
    return {
        "repaired" if fix else "drifting": [
            {
                "account": d.account,
                "redis_balance": d.redis_balance,
                "ledger_expects": d.expected,
                "drift": d.amount,
                "redis_held": d.redis_held,
                "holds_total": d.holds_total,
            }
            for d in drifts
        ],
        "holds": [
            {"kind": h.kind, "account": h.account, "request_id": h.request_id, "amount": h.amount}
            for h in report.holds
        ],
        "grants_unapplied": [
            {"idempotency_id": g.idempotency_id, "account": g.account, "amount": g.amount}
            for g in report.grants
        ],
        "drift_by_kind": {kind: {"items": n, "microcredits": m} for kind, (n, m) in report.by_kind().items()},
        **extra,
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
    create.add_argument("--referral-code", help="a referral code: links the account to the code's owner")
    show = account.add_parser("balance", help="show balance and active holds")
    show.add_argument("id")
    key = sub.nested(sub.add_parser("key", help="client API keys"))
    key_create = key.add_parser("create", help="create a key (printed once)")
    key_create.add_argument("account")
    key_revoke = key.add_parser("revoke", help="revoke a key by its id")
    key_revoke.add_argument("key_id")
    wallet_cli.add_parsers(sub, key, key_create)  # key list|update, caps, time-zone
    refund_cli.add_parsers(manual_cli.add_parsers(sub))  # order create|paid|show|list|refund
    vault_cli.add_parsers(sub)  # vault rotate
    grant = sub.add_parser("grant", help="add credits to an account, once per idempotency key")
    grant.add_argument("account")
    amount = grant.add_mutually_exclusive_group(required=True)
    amount.add_argument("--credits", help="decimal credits, e.g. 12.5")
    amount.add_argument("--amount", type=int, help="micro-credits")
    grant.add_argument("--idempotency-key", required=True)
    grant.add_argument("--kind", default="grant", choices=MONEY_IN_KINDS)
    grant.add_argument("--note")
    grant.add_argument("--priority", type=int, help="lower is drawn first (default by kind)")
    ends = grant.add_mutually_exclusive_group()
    ends.add_argument("--expires-at", help="ISO 8601 with an offset, e.g. 2027-01-31T00:00:00Z")
    ends.add_argument("--expires-in-days", type=int)
    grant.add_argument("--idle-expiry", action=argparse.BooleanOptionalAction, default=None)
    grant.add_argument("--effective-at", help="ISO 8601, not in the future")
    grant.add_argument("--payment-ref")
    sub.add_parser(
        "migrate",
        help="apply the Postgres migrations and create the ledger partitions ahead (safe to run twice)",
    )
    flush = sub.add_parser(
        "flush", help="run the outbox flusher as a process of its own (ops listener when ops_port is set)"
    )
    flush.add_argument("--drain", action="store_true", help="write what is waiting, then exit")
    rec = sub.add_parser("reconcile", help="compare Redis balances, holds and grants with the ledger")
    rec.add_argument(
        "--repair",
        action="store_true",
        help="complete half-done grants, release orphan and stale holds, fix drift (idempotent)",
    )
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
    except ConfigError as exc:  # found once Redis is reached (its eviction policy): refused as a setting
        print(f"creditgate: {exc.message}", file=sys.stderr)
        return 2
    except CreditgateError as exc:
        print(json.dumps(exc.body(), indent=2), file=sys.stderr)
        return 1
    except CannotListen as exc:
        print(f"creditgate: {exc}", file=sys.stderr)
        return 2


def _dispatch(args: argparse.Namespace, settings: Settings) -> int:
    if args.command == "serve":
        if settings.workers > 1:
            return serve_workers(settings)
        _run(serve(settings))
        return 0
    if args.command == "demo":
        if not settings.demo_upstream:
            print(
                "creditgate demo uses its own fake upstream; unset CREDITGATE_UPSTREAM_* to run it.",
                file=sys.stderr,
            )
            return 2

        async def ready(url: str, ops_url: str) -> None:
            await demo_bootstrap(settings, url, ops_url)

        _run(serve(settings, ready))
        return 0
    if args.command == "flush" and not args.drain:
        return _run(run_flush(settings))
    verb = (args.command, getattr(args, "verb", None))
    calls: dict[tuple[str, str | None], Callable[[Services], Awaitable[Any]]] = {
        ("migrate", None): lambda svc: _migrate(svc),
        ("flush", None): _drain,
        ("reconcile", None): lambda svc: _reconcile(svc, args.repair),
        ("account", "create"): lambda svc: svc.admin.create_account(args.id, args.referral_code),
        ("account", "balance"): lambda svc: svc.admin.balance(args.id),
        ("key", "revoke"): lambda svc: svc.admin.revoke_key(args.key_id),
        ("grant", None): lambda svc: _grant(svc, args),
        **wallet_cli.calls(args),
        **refund_cli.calls(args),
        **manual_cli.calls(args),
        **vault_cli.calls(args),
    }
    result = _run(_with_services(settings, calls[verb]))
    print(json.dumps(result, indent=2))
    return 0


async def _grant(svc: Services, args: argparse.Namespace) -> dict[str, Any]:
    body = GrantBody(
        kind=args.kind,
        priority=args.priority,
        expires_at=args.expires_at,
        expires_in_days=args.expires_in_days,
        idle_expiry=args.idle_expiry,
        effective_at=args.effective_at,
    )
    terms = grant_terms(body, svc.balances.wallet.clock())
    amount = grant_amount(args.amount, args.credits)
    return await svc.admin.grant(
        args.account,
        amount,
        args.idempotency_key,
        args.kind,
        args.note,
        terms=terms,
        payment_ref=args.payment_ref,
    )


async def _migrate(svc: Services) -> dict[str, Any]:
    applied = await svc.store.migrate()
    created = await svc.store.add_partitions(svc.settings.ledger_partitions_ahead)
    return {"applied": applied, "partitions_created": created}


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
