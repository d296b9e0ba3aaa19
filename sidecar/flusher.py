"""Moves settled debits from the Redis outbox streams to the Postgres ledger, in batches, exactly once.

Each partition's stream is read through one consumer group. A batch (up to ``flush_batch_size`` rows,
or whatever arrived within ``flush_interval_seconds``) is written in one transaction that skips request
ids already present; only after the commit are its entries acknowledged and deleted. A flusher that
dies between the two leaves them pending: another claims them after ``flush_claim_idle_seconds`` and
the replayed insert changes nothing. While Postgres is down the batch is retried with backoff and the
backlog waits in Redis; nothing unacknowledged is ever deleted.

An entry that can never become a ledger row never blocks the others: one that does not decode or lacks
its request id, account or a valid charge is set aside before the insert, and when Postgres refuses a
batch for its data (not for being away), the batch is split in halves until the refused entries are
found. Each is parked with its reason in the partition's dead-letter stream, then acknowledged and
deleted; the rest is written.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
import uuid
import weakref
from collections.abc import Awaitable, Callable

from redis.exceptions import ResponseError

from .balances import load_lua
from .batches import Batch, FlushStats, Item, is_data_error, reraise_if_cancelled
from .keys import KeySpace, as_text
from .ledger_store import LedgerStore
from .outbox import BadEntry, Observation, entry_data, ledger_row, observation_of
from .outbox_view import backlog, dead_letters
from .redis_client import RedisClient, read_group

log = logging.getLogger("creditgate.flusher")

GROUP = "ledger-flusher"
POLL = 0.05  # seconds between reads of an idle outbox
# Sent as EVAL (Redis caches it by its digest): a Redis restarted or flushed never answers NOSCRIPT.
ACK_ENTRIES = load_lua("ack_entries")


# Every flusher of this process, so that a drain can wait for the batches any of them has in flight.
_FLUSHERS: weakref.WeakSet[Flusher] = weakref.WeakSet()


class Flusher:
    def __init__(
        self,
        redis: RedisClient,
        keys: KeySpace,
        store: LedgerStore,
        *,
        batch_size: int = 500,
        interval: float = 0.2,
        claim_idle_ms: int = 30_000,
        concurrency: int = 2,
        consumer: str | None = None,
    ) -> None:
        self.redis = redis
        self.store = store
        self.streams = [keys.outbox(p) for p in range(keys.partitions)]
        self.dead_letter_streams = dict(
            zip(self.streams, (keys.dead_letters(p) for p in range(keys.partitions)), strict=True)
        )
        self.batch_size = batch_size
        self.interval = interval
        self.claim_idle_ms = claim_idle_ms
        self.concurrency = concurrency
        self.consumer = consumer or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.stats = FlushStats()
        # Called with (rows, seconds) after every batch written; the app points it at its metrics.
        self.on_batch: Callable[[int, float], None] = lambda rows, seconds: None
        # Given what a batch's settles observed, after its commit, before its ack (signals/alerts.py).
        self.observers: list[Callable[[list[Observation]], Awaitable[None]]] = []
        self._groups_ready = False
        self._progress = asyncio.Condition()
        self._next_claim = 0.0
        self._stopping = asyncio.Event()
        self._in_flight: set[Batch] = set()  # batches the background loops read and have not finished
        _FLUSHERS.add(self)

    async def ensure_groups(self) -> None:
        if self._groups_ready:
            return
        for stream in self.streams:
            try:
                await self.redis.xgroup_create(stream, GROUP, id="0", mkstream=True)
            except ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise
        self._groups_ready = True

    # ---- reading -----------------------------------------------------------------------------------

    async def _claim(self, batch: Batch, min_idle_ms: int) -> None:
        """Take over entries another (dead) consumer read but never acknowledged."""
        async with self.redis.pipeline(transaction=False) as pipe:
            per_stream = -(-self.batch_size // len(self.streams))
            for stream in self.streams:
                pipe.xautoclaim(stream, GROUP, self.consumer, min_idle_ms, start_id="0-0", count=per_stream)
            replies = await pipe.execute()
        for stream, reply in zip(self.streams, replies, strict=True):
            batch.add(stream, [e for e in reply[1] if e[1]])  # deleted entries come back empty

    async def _read(self, batch: Batch) -> bool:
        """Add new entries (without blocking); returns whether more are waiting: some stream gave as many
        as this read asked of it."""
        want = self.batch_size - batch.size
        if want <= 0:
            return False
        # COUNT applies per stream: share the batch out so that one read never exceeds it.
        per_stream = -(-want // len(self.streams))
        reply = await read_group(self.redis, GROUP, self.consumer, self.streams, per_stream)
        more = False
        for stream, entries in reply or []:
            batch.add(as_text(stream), entries)
            more = more or len(entries) >= per_stream
        return more

    async def collect(self, batch: Batch | None = None) -> Batch:
        """Up to batch_size entries, or what arrived within the interval (sooner when stopping).
        Reads never block in Redis: an idle flusher polls every POLL seconds, so stopping it never
        has to interrupt a command. A read that took everything waiting is followed by a pause too,
        so a steady trickle is collected in a few reads per batch, not one read per entry."""
        await self.ensure_groups()
        batch = Batch() if batch is None else batch
        now = time.monotonic()
        if now >= self._next_claim:  # dead consumers' entries: looked for a few times per idle period
            self._next_claim = now + max(self.claim_idle_ms / 4000, 0.05)
            await self._claim(batch, self.claim_idle_ms)
        deadline = now + self.interval
        while batch.size < self.batch_size and not self._stopping.is_set():
            if await self._read(batch):  # more is waiting: read on at once
                continue
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            await self._pause(min(remaining, POLL))
        return batch

    async def _pause(self, seconds: float) -> None:
        """Sleep, but wake at once when the flusher is asked to stop."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)

    def stop(self) -> None:
        """Ask the loops to finish the batch in hand and return."""
        self._stopping.set()

    # ---- writing -----------------------------------------------------------------------------------

    async def write(self, batch: Batch) -> None:
        """Commit the batch to Postgres, then acknowledge and delete its entries. Entries that can never
        be written are parked in the dead-letter streams first (see the module docstring)."""
        if not batch.size:
            return
        started = time.perf_counter()
        items = [Item(stream, i, f) for stream, entries in batch.entries.items() for i, f in entries]
        for item in items:
            try:
                item.row = ledger_row(item.fields, item.entry_id)
            except BadEntry as exc:
                item.reason = exc.reason
        dead = [item for item in items if item.row is None]
        dead += await self._insert([item for item in items if item.row is not None])
        seen = [o for i in items if not i.reason and (o := observation_of(i.fields, i.entry_id))]
        for observe in self.observers if seen else ():
            await observe(seen)
        async with self.redis.pipeline(transaction=False) as pipe:
            for item in dead:  # parked before acknowledged: a crash between parks it twice, never loses it
                data = entry_data(item.fields)
                pipe.xadd(
                    self.dead_letter_streams[item.stream],
                    {"entry": item.entry_id, "reason": item.reason[:500], **data},
                )
            for stream, entries in batch.entries.items():  # one argument per stream: see ack_entries.lua
                pipe.eval(ACK_ENTRIES, 1, stream, GROUP, " ".join(entry_id for entry_id, _ in entries))
            await pipe.execute()
        for item in dead:
            log.error("outbox entry %s parked as a dead letter: %s", item.entry_id, item.reason)
        self.stats.dead_letters += len(dead)
        self.stats.rows += batch.size - len(dead)
        self.stats.batches += 1
        self.stats.last_batch_rows = batch.size
        self.stats.last_batch_seconds = time.perf_counter() - started
        self.on_batch(batch.size, self.stats.last_batch_seconds)
        async with self._progress:
            self._progress.notify_all()

    async def _insert(self, items: list[Item]) -> list[Item]:
        """Insert the rows; when Postgres refuses them for their data, bisect to find the refused ones
        (each half is its own idempotent statement). Returns the refused items, their reason set.
        Any other failure (Postgres away) is raised: the whole batch is retried."""
        if not items:
            return []
        try:
            await self.store.insert_usage([item.row for item in items if item.row is not None])
            return []
        except Exception as exc:
            if not is_data_error(exc):
                raise
            if len(items) == 1:
                items[0].reason = f"refused by Postgres: {type(exc).__name__}: {exc}"
                return items
        half = len(items) // 2
        return await self._insert(items[:half]) + await self._insert(items[half:])

    async def wait_for_rows(self, rows: int) -> None:
        """Return once this flusher has written at least `rows` rows in all."""
        async with self._progress:
            await self._progress.wait_for(lambda: self.stats.rows >= rows)

    async def write_until_done(self, batch: Batch) -> bool:
        """Retry a batch until Postgres takes it (with backoff); the entries stay pending meanwhile.
        Returns False when asked to stop first: the entries then wait for the next flusher."""
        delay = 0.2
        while True:
            try:
                await self.write(batch)
                return True
            except Exception as exc:  # the flusher must outlive any failure
                reraise_if_cancelled(exc)
                self.stats.failures += 1
                log.warning("flush of %d rows failed (%r); retrying in %.1fs", batch.size, exc, delay)
                await self._pause(delay)
                if self._stopping.is_set():
                    return False
                delay = min(delay * 2, 10.0)

    async def run(self) -> None:
        """The background loops (``concurrency`` of them, so one batch commits while the next is
        written): collect, write, repeat, until stop() (or cancellation)."""
        self._stopping.clear()
        await asyncio.gather(*(self._loop() for _ in range(self.concurrency)))

    async def _loop(self) -> None:
        while not self._stopping.is_set():
            batch = Batch()
            self._in_flight.add(batch)  # from its first read until written (or given up at stop)
            try:
                try:
                    await self.collect(batch)
                except Exception as exc:
                    reraise_if_cancelled(exc)
                    self._groups_ready &= "NOGROUP" not in str(exc)  # Redis (or a shard) was lost
                    log.warning("reading the outbox failed (%r); retrying", exc)
                    await self._pause(1.0)
                    continue
                await self.write_until_done(batch)
            finally:
                self._in_flight.discard(batch)
                async with self._progress:
                    self._progress.notify_all()

    async def wait_in_flight(self) -> None:
        """Return once every batch the loops of this process's flushers of the same outbox had in hand
        when called is written (or given up because the loops stop): entries read but not yet
        acknowledged are invisible to a drain, and not idle long enough to be claimed."""
        for flusher in [f for f in _FLUSHERS if f.streams == self.streams and f._in_flight]:
            await flusher._wait_for_batches(set(flusher._in_flight))

    async def _wait_for_batches(self, waiting: set[Batch]) -> None:
        async with self._progress:
            await self._progress.wait_for(lambda: not waiting & self._in_flight)

    async def drain(self, claim_idle_ms: int | None = None) -> int:
        """Write everything in the outbox now; returns the rows written. New entries are written by
        ``concurrency`` loops at once; then, with those loops done (so none of our own batches can be
        taken for a dead consumer's), entries pending longer than the claim idle time are claimed and
        written. First it waits for the batches this process's own background loops are writing: their
        entries are read but unacknowledged, so no read of the drain would see them.
        Used at shutdown and by ``creditgate flush --drain``."""
        await self.wait_in_flight()
        await self.ensure_groups()
        written = sum(await asyncio.gather(*(self._drain_new() for _ in range(self.concurrency))))
        idle = self.claim_idle_ms if claim_idle_ms is None else claim_idle_ms
        while True:
            batch = Batch()
            await self._claim(batch, idle)
            if not batch.size:
                return written
            await self.write(batch)
            written += batch.size

    async def _drain_new(self) -> int:
        written = 0
        while True:
            batch = Batch()
            while batch.size < self.batch_size and await self._read(batch):
                pass
            if not batch.size:
                return written
            await self.write(batch)
            written += batch.size

    async def dead_letters(self, limit: int = 100) -> tuple[int, list[dict[str, str]]]:
        return await dead_letters(self.redis, list(self.dead_letter_streams.values()), limit)

    async def backlog(self) -> tuple[int, float]:
        return await backlog(self.redis, self.streams)
