"""`creditgate flush` (without --drain): the outbox flusher as a process of its own, beside serving
processes that run with `flusher_enabled: false`, so that they no longer spend CPU on the ledger writes.

With `ops_port` set it serves the ops listener (`ops_host`:`ops_port`) with the serving process's own
handlers (app.ops_app): /healthz from the event loop alone; /readyz 200 while the flusher loop runs and
Redis and Postgres answer (health.FlushReadiness); /metrics with the flusher's series and the outbox
gauges, and none of the request path's (metrics.Metrics(serving=False)). The ops listener is up before
the flusher starts (/readyz 503 "starting") and stops last.

Several flush processes on one outbox are safe: they read it through one consumer group, each as a
consumer of its own, so an entry goes to one of them; one that dies leaves its unacknowledged entries
pending, and another claims them after `flush_claim_idle_seconds` (the ledger insert skips request ids
already written, so a replay changes nothing).

On SIGTERM or SIGINT, in the serving process's order (supervisor.py): /readyz turns 503, the flusher
stops reading and finishes the batch it has in hand (the supervisor cancels it after 5 s), the outbox is
drained for up to `shutdown_flush_seconds` (final_flush: what is left waits in Redis for the next
flusher), the Redis and Postgres pools close, the ops listener stops, and the process exits 0. It exits 1
when the flusher loop ends by itself (it should not: it retries every failure), after the same steps.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal

from .app import final_flush, ops_app, services
from .config import Settings
from .connections import ListenerLimits
from .health import FlushReadiness
from .metrics import Metrics
from .redis_guard import check_redis
from .serve import _site
from .supervisor import Supervisor

log = logging.getLogger("creditgate.flush")


async def run_flush(settings: Settings) -> int:
    """Flush the outbox until SIGTERM / SIGINT; the process's exit code."""
    stop = asyncio.Event()  # set by SIGTERM / SIGINT, handled from the start (one during startup counts)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    metrics = Metrics(serving=False)
    readiness: list[FlushReadiness] = []  # set once the flusher runs; /readyz says "starting" until then
    async with contextlib.AsyncExitStack() as stack:
        ops_port = settings.ops_listen_port
        if ops_port is not None:
            ops_url = await stack.enter_async_context(
                _site(
                    ops_app(lambda: readiness[0] if readiness else None, metrics),
                    settings.ops_host,
                    ops_port,
                    settings="ops_host / ops_port",
                    limits=ListenerLimits.of(settings),
                )
            )
            log.info("creditgate flush ops listening on %s (/healthz, /readyz, /metrics)", ops_url)
        svc = await stack.enter_async_context(services(settings))  # closed before the ops listener
        await check_redis(svc.redis)  # like `serve`, a long-running flusher refuses an evicting Redis
        flusher = svc.flusher()
        flusher.on_batch = metrics.observe_flush
        metrics.sources.rows_written = lambda: flusher.stats.rows
        metrics.sources.flush_failures = lambda: flusher.stats.failures
        metrics.sources.dead_letters = lambda: flusher.stats.dead_letters
        metrics.sources.backlog = flusher.backlog
        tasks = Supervisor()
        tasks.start("flusher", flusher.run(), on_stop=flusher.stop)
        loop_task = tasks.tasks[0]
        readiness.append(FlushReadiness(svc.redis, svc.store, lambda: not loop_task.done()))
        log.info("flusher running as consumer %s", flusher.consumer)
        signalled = asyncio.create_task(stop.wait(), name="creditgate-flush-signal")
        await asyncio.wait([signalled, loop_task], return_when=asyncio.FIRST_COMPLETED)
        ended_by_itself = not signalled.done()
        if ended_by_itself:
            signalled.cancel()
            log.error("the flusher loop ended by itself (%r); stopping", _outcome(loop_task))
        else:
            log.info("stopping: no new reads; finishing the batch in hand, then draining the outbox")
        readiness[0].stopping = True
        await tasks.stop()
        await final_flush(flusher, settings.shutdown_flush_seconds)
    return 1 if ended_by_itself else 0


def _outcome(task: asyncio.Task[None]) -> BaseException | None:
    return None if task.cancelled() else task.exception()
