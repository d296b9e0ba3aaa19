"""What other tasks touch of a request in flight: the shutdown cut, and the lease renewal's view of it.
Everything else about a request is a value a stage returned."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass


@dataclass(slots=True)
class Live:
    account: str
    request_id: str
    # Shutdown: `cut` asks the request to stop waiting on the upstream; `cutter` is the timeout of the
    # phase waiting now, rescheduled to now by Gateway.cut_all().
    cut: bool = False
    cutter: asyncio.Timeout | None = None

    def cut_timeout(self) -> asyncio.Timeout:
        """A timeout for one phase of waiting that a cut can end at once."""
        return asyncio.timeout(0 if self.cut else None)

    def cut_now(self) -> None:
        self.cut = True
        if self.cutter is not None:
            self.cutter.reschedule(asyncio.get_running_loop().time())


@dataclass(slots=True)
class Timings:
    """perf_counter readings of the upstream call, and the time spent waiting on others (the upstream,
    a slow client, an identical request's call): not creditgate's own work."""

    upstream_started: float | None = None
    upstream_first_byte: float | None = None
    upstream_ended: float | None = None
    waited: float = 0.0
