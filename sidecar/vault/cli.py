"""`creditgate vault rotate`: cli.py registers and dispatches it."""

from __future__ import annotations

import argparse
from collections.abc import Awaitable, Callable
from typing import Any

from ..errors import ConfigError
from ..services import Services
from ..upstream import upstreams_from
from .rotate import BATCH, rotate
from .settings import key_ring
from .store import Vault

Call = Callable[[Services], Awaitable[Any]]


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def add_parsers(sub: Any) -> None:
    """`sub`: the top-level subcommands."""
    vault = sub.nested(sub.add_parser("vault", help="the BYOK vault of customers' provider keys"))
    rotation = vault.add_parser(
        "rotate",
        help="seal every stored provider key again under the current master key (vault_master_key_id); "
        "resumable, safe to run again",
    )
    rotation.add_argument("--batch-size", type=_positive, default=BATCH, help=f"records per batch ({BATCH})")
    rotation.add_argument("--limit", type=_positive, help="rotate at most this many records in this run")


async def _rotate(svc: Services, args: argparse.Namespace) -> dict[str, object]:
    ring = key_ring(svc.settings)
    if ring is None:
        raise ConfigError(
            "vault rotate needs the new master key as vault_master_key (or vault_master_key_file) with its "
            "vault_master_key_id, and the old ones in vault_previous_keys.",
            param="vault_master_key",
        )
    providers = {up.vault_provider for up in upstreams_from(svc.settings).values()}
    await Vault(ring, svc.store.pool, svc.redis, svc.keys, providers, cache_seconds=0).verify()
    done = await rotate(svc.store.pool, svc.redis, svc.keys, ring, batch=args.batch_size, limit=args.limit)
    return done.view()


def calls(args: argparse.Namespace) -> dict[tuple[str, str | None], Call]:
    return {("vault", "rotate"): lambda svc: _rotate(svc, args)}
