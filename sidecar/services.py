"""The clients every entry point (server, CLI verbs, flusher) builds the same way: Redis, Postgres, the
key space, the balances and the account directory, with the ledger prepared (migrated, Redis rebuilt)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import asyncpg

from .accounts import AccountDirectory
from .admin import AdminOps
from .balances import Balances
from .cluster_pipeline import pipeline_for
from .config import Settings
from .flusher import Flusher
from .grant_terms import starter_of
from .keys import KeySpace
from .ledger_store import LedgerStore
from .payments.referral_codes import ReferralPolicy
from .rebuild import rebuild_if_empty
from .redis_client import REDIS_RETRIES as REDIS_RETRIES
from .redis_client import RedisClient
from .redis_client import connect_redis as connect_redis
from .replicas import ReplicaWait
from .signals.alerts import Alerts
from .signals.deliveries import Deliveries
from .signals.events import EventLog
from .wallet import DAY_MS, WalletPolicy

log = logging.getLogger("creditgate.services")


@dataclass
class Services:
    """The clients every entry point (server, CLI verbs, flusher) builds the same way."""

    settings: Settings
    redis: RedisClient
    store: LedgerStore
    keys: KeySpace
    balances: Balances
    accounts: AccountDirectory
    # Every process emits through one event log, so each fans events out to delivery the same way.
    events: EventLog = field(default_factory=EventLog)

    deliveries: Deliveries = field(init=False)

    def __post_init__(self) -> None:
        # Each new event gets its pending deliveries in the emitting transaction (signals/deliveries.py),
        # in whichever process emits it (a serving process, `creditgate flush`, a CLI verb).
        self.deliveries = Deliveries(self.store.pool, self.settings)
        self.events.on_emit.append(self.deliveries.fan_out)

    @property
    def admin(self) -> AdminOps:
        s = self.settings
        starter = starter_of(s.starter_credits, s.starter_expiry_days)
        return AdminOps(self.accounts, self.balances, self.store, starter, ReferralPolicy.of(s))

    def flusher(self, consumer: str | None = None) -> Flusher:
        s = self.settings
        flusher = Flusher(
            self.redis,
            self.keys,
            self.store,
            batch_size=s.flush_batch_size,
            interval=s.flush_interval_seconds,
            claim_idle_ms=int(s.flush_claim_idle_seconds * 1000),
            concurrency=s.flush_concurrency,
            consumer=consumer,
        )
        if s.alerts_enabled:  # alerts and auto-reload read each batch's settles (signals/alerts.py)
            flusher.observers.append(Alerts(self.store.pool, self.events, s.alert_top_up_percents))
        return flusher

    async def close(self) -> None:
        try:
            async with asyncio.timeout(5):
                await self.store.close()
        except TimeoutError:
            log.warning("Postgres pool did not close in 5 s; terminating its connections")
            self.store.pool.terminate()
        if self.balances.pipeline is not None:
            await self.balances.pipeline.aclose()
        await self.redis.aclose()


@contextlib.asynccontextmanager
async def services(settings: Settings, *, prepare: bool = True) -> AsyncIterator[Services]:
    """Connect to Redis and Postgres; with `prepare`, load the scripts, apply migrations (when
    migrate_on_start) and rebuild an empty Redis from the ledger."""
    if settings.redis_url is None or settings.database_url is None:
        raise ValueError("redis_url and database_url must be resolved first (see cli.resolve_services)")
    redis = connect_redis(
        settings.redis_url,
        settings.redis_max_connections,
        settings.redis_timeout_seconds,
        settings.redis_retries,
    )
    store = LedgerStore(
        await asyncpg.create_pool(settings.database_url, min_size=0, max_size=settings.flush_concurrency + 2)
    )
    keys = KeySpace(settings.key_prefix, settings.partitions)
    balances = Balances(
        redis,
        keys,
        settled_marker_ms=settings.settled_marker_seconds * 1000,
        pipeline=pipeline_for(
            settings.redis_url,
            timeout=settings.redis_timeout_seconds,
            connect_timeout=settings.redis_timeout_seconds,
        ),
        replicas=ReplicaWait(settings.settle_wait_replicas, settings.settle_wait_timeout_ms)
        if settings.settle_wait_replicas
        else None,
        wallet=WalletPolicy(idle_expiry_ms=settings.free_credit_idle_days * DAY_MS),
    )
    accounts = AccountDirectory(redis, keys, cache_seconds=settings.auth_cache_seconds)
    svc = Services(settings, redis, store, keys, balances, accounts)
    try:
        if prepare:
            await balances.load_scripts()
            await _prepare_ledger(svc)
        yield svc
    finally:
        await svc.close()


async def _add_partitions(svc: Services) -> None:
    """This month's ledger partition and ledger_partitions_ahead more (and hourly again, by the store that
    flushes); a role that may not create tables
    (migrations run by an operator) only warns: rows of a missing month wait in the DEFAULT partition."""
    try:
        await svc.store.add_partitions(svc.settings.ledger_partitions_ahead)
        svc.store.partitions_ahead = svc.settings.ledger_partitions_ahead  # and hourly, while flushing
    except asyncpg.InsufficientPrivilegeError as exc:
        log.warning("cannot create ledger partitions (%s); run `creditgate migrate` monthly", exc)


async def _prepare_ledger(svc: Services) -> None:
    try:
        if svc.settings.migrate_on_start:
            await svc.store.migrate()
        await _add_partitions(svc)
        await rebuild_if_empty(
            svc.redis, svc.keys, svc.store, settled_marker_ms=svc.balances.settled_marker_ms
        )
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        if not await svc.redis.exists(svc.keys.initialized):
            raise
        # Redis already holds the balances: serve on; the flusher keeps the backlog until Postgres returns.
        log.error("Postgres is unavailable at startup (%r); serving from Redis, ledger writes wait", exc)
