"""The CLI verbs of key management and spend-cap configuration (``creditgate key list|update``,
``creditgate caps set|list|delete``, ``creditgate time-zone``); cli.py registers and dispatches them."""

from __future__ import annotations

import argparse
import time
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec

from .caps import CapBody
from .keys_api import KeyBody, new_key_terms
from .pipeline.admit import AdmitPolicy
from .pricing import PriceTable
from .services import Services
from .wallet import PERIODS
from .wallet_api import WalletOps

Call = Callable[[Services], Awaitable[Any]]


def add_parsers(sub: Any, key: Any, key_create: argparse.ArgumentParser) -> None:
    """`sub`: the top-level subcommands; `key`: the `key` verbs; `key_create`: `key create`."""
    key_create.add_argument("--name", help="a name for the key (1-100 characters)")
    key_create.add_argument("--expires-at", help="ISO 8601 time with a zone offset; default: never")
    key_list = key.add_parser(
        "list", help="an account's keys: name, prefix, created, last used, expiry, caps"
    )
    key_list.add_argument("account")
    update = key.add_parser("update", help="rename a key or set its expiry")
    update.add_argument("key_id")
    update.add_argument("--name")
    expiry = update.add_mutually_exclusive_group()
    expiry.add_argument("--expires-at", help="ISO 8601 time with a zone offset")
    expiry.add_argument("--never-expires", action="store_true", help="clear the key's expiry")
    caps = sub.nested(sub.add_parser("caps", help="spend caps (per account, key, model, end user)"))
    cap_set = caps.add_parser("set", help="set a cap (replaces the scope and period's limit)")
    cap_delete = caps.add_parser("delete", help="delete a cap")
    for parser in (cap_set, cap_delete):
        parser.add_argument("account")
        parser.add_argument("--scope", required=True, help="account, key:<id>, model:<m>, user:<u> or user:*")
        parser.add_argument("--period", required=True, choices=PERIODS)
    limit = cap_set.add_mutually_exclusive_group(required=True)
    limit.add_argument("--limit", type=int, help="micro-credits")
    limit.add_argument("--credits", help="decimal credits, e.g. 12.5")
    cap_list = caps.add_parser("list", help="an account's caps and time zone")
    cap_list.add_argument("account")
    zone = sub.add_parser(
        "time-zone", help="show or set the time zone an account's day and month caps follow"
    )
    zone.add_argument("account")
    zone.add_argument("zone", nargs="?", help="IANA name, e.g. Europe/Berlin; UTC clears it")


def wallet_ops(svc: Services) -> WalletOps:
    s = svc.settings
    policy = AdmitPolicy.from_settings(s)
    return WalletOps(svc.redis, svc.keys, svc.accounts, svc.store.pool, PriceTable.from_settings(s), policy)


async def _create_key(svc: Services, args: argparse.Namespace) -> Any:
    body = KeyBody(name=args.name, expires_at=args.expires_at)
    name, expires_ms = new_key_terms(body, time.time_ns() // 1_000_000)
    return await svc.admin.create_key(args.account, name, expires_ms)


async def _update_key(svc: Services, args: argparse.Namespace) -> Any:
    changes: dict[str, Any] = {}
    if args.name is not None:
        changes["name"] = args.name
    if args.expires_at is not None or args.never_expires:
        changes["expires_at"] = args.expires_at
    return await wallet_ops(svc).key_ops.update_key(args.key_id, msgspec.convert(changes, KeyBody))


async def _time_zone(svc: Services, args: argparse.Namespace) -> Any:
    caps = wallet_ops(svc).caps
    if args.zone is None:
        return await caps.time_zone(args.account)
    return await caps.set_time_zone(args.account, args.zone)


def calls(args: argparse.Namespace) -> dict[tuple[str, str | None], Call]:
    return {
        ("key", "create"): lambda svc: _create_key(svc, args),
        ("key", "list"): lambda svc: wallet_ops(svc).key_ops.list_keys(args.account),
        ("key", "update"): lambda svc: _update_key(svc, args),
        ("caps", "set"): lambda svc: wallet_ops(svc).caps.set_cap(
            args.account, CapBody(args.scope, args.period, args.limit, args.credits)
        ),
        ("caps", "list"): lambda svc: wallet_ops(svc).caps.list_caps(args.account),
        ("caps", "delete"): lambda svc: wallet_ops(svc).caps.delete_cap(
            args.account, args.scope, args.period
        ),
        ("time-zone", None): lambda svc: _time_zone(svc, args),
    }
