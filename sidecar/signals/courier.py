"""The delivery worker: each pass leases the due deliveries (deliveries.py), sends them at once (a signed
webhook POST, an email over SMTP), logs each attempt and schedules the next by schedule.py. It runs on
the supervisor, never on a request's path; `now` comes from the clock of its Deliveries."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from dataclasses import dataclass
from email.message import EmailMessage
from email.utils import make_msgid

import aiohttp
import aiosmtplib
from prometheus_client import Counter

from . import letters
from .deliveries import EMAIL, WEBHOOK, Claimed, Deliveries
from .schedule import Schedule
from .settings import SignalSettings

log = logging.getLogger("creditgate.signals")


@dataclass(frozen=True)
class Result:
    ok: bool
    reply: str | None  # the HTTP status, or the SMTP server's reply
    error: str | None = None


class Courier:
    def __init__(
        self,
        deliveries: Deliveries,
        settings: SignalSettings,
        session: aiohttp.ClientSession | None = None,
        counter: Counter | None = None,  # creditgate_signal_deliveries_total{channel, outcome}
    ) -> None:
        self.deliveries, self.settings = deliveries, settings
        self.schedule = Schedule(
            settings.signal_backoff_base_seconds,
            settings.signal_backoff_cap_seconds,
            dt.timedelta(hours=settings.signal_retry_hours),
        )
        # A worker that dies mid-send leaves its deliveries due again after this.
        longest = max(settings.signal_webhook_timeout_seconds, settings.smtp_timeout_seconds)
        self.lease = dt.timedelta(seconds=2 * longest + 60)
        self._session, self.counter = session, counter
        self.sent = dict.fromkeys(("delivered", "retry", "failed"), 0)

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession()
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def run(self) -> None:
        """The supervisor's periodic pass."""
        await self.step()

    async def step(self) -> int:
        """One pass: send what is due now; returns how many attempts were made."""
        claimed = await self.deliveries.claim(
            self.deliveries.clock(), self.lease, self.settings.signal_delivery_batch
        )
        done = await asyncio.gather(*(self.attempt(c) for c in claimed), return_exceptions=True)
        for c, failed in zip(claimed, done, strict=True):
            if isinstance(failed, BaseException):  # not recorded: due again when its lease runs out
                log.error("recording a delivery of event %s failed: %r", c.event.id, failed)
        return len(claimed)

    async def attempt(self, claimed: Claimed) -> None:
        started, at = time.perf_counter(), self.deliveries.clock()
        try:
            if claimed.channel == WEBHOOK:
                result = await self.post(claimed, int(at.timestamp()))
            elif claimed.channel == EMAIL:
                result = await self.mail(claimed)
            else:
                result = Result(False, None, f"unknown channel {claimed.channel!r}")
        except (aiohttp.ClientError, aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            result = Result(False, None, f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)
        except Exception as exc:  # anything else a send meets is a failed attempt too, retried
            log.exception("sending event %s by %s failed unexpectedly", claimed.event.id, claimed.channel)
            result = Result(False, None, type(exc).__name__)
        duration_ms = int((time.perf_counter() - started) * 1000)
        now = self.deliveries.clock()
        outcome, next_at = self.schedule.outcome(
            result.ok, claimed.delivery_id, claimed.attempts + 1, claimed.window_start, now
        )
        await self.deliveries.record(
            claimed, outcome, next_at, at=at, reply=result.reply, error=result.error, duration_ms=duration_ms
        )
        self.sent[outcome] += 1
        if self.counter is not None:
            self.counter.labels(claimed.channel, outcome).inc()
        if outcome == "failed":
            log.error(
                "gave up delivering event %s by %s after %d attempts: %s",
                claimed.event.id,
                claimed.channel,
                claimed.attempts + 1,
                result.error or result.reply,
            )
        elif outcome == "retry":
            log.warning(
                "delivering event %s by %s failed (%s); next try at %s",
                claimed.event.id,
                claimed.channel,
                result.error or result.reply,
                next_at.isoformat() if next_at else "-",
            )

    async def post(self, claimed: Claimed, timestamp: int) -> Result:
        """POST the event, signed; a 2xx delivers it, anything else is retried."""
        secret = self.settings.signal_webhook_secret
        if not secret:
            return Result(False, None, "signal_webhook_secret is not set")
        body = claimed.event.body()
        payload = letters.webhook_body(body)
        timeout = aiohttp.ClientTimeout(total=self.settings.signal_webhook_timeout_seconds)
        async with self.session.post(
            claimed.target,
            data=payload,
            headers=letters.webhook_headers(body, secret, timestamp, payload),
            timeout=timeout,
            allow_redirects=False,
        ) as resp:
            await resp.content.read(1024)  # a little of the answer; the status is what counts
            ok = 200 <= resp.status < 300
            return Result(ok, str(resp.status), None if ok else f"HTTP {resp.status}")

    async def mail(self, claimed: Claimed) -> Result:
        s, body = self.settings, claimed.event.body()
        message = EmailMessage()
        message["From"] = s.smtp_from
        message["To"] = claimed.target
        message["Subject"] = letters.subject(body)
        message["Message-ID"] = make_msgid(domain="creditgate")
        message.set_content(letters.text(body))
        assert s.smtp_host is not None
        _, reply = await aiosmtplib.send(
            message,
            hostname=s.smtp_host,
            port=s.smtp_port,
            username=s.smtp_username,
            password=s.smtp_password,
            use_tls=s.smtp_security == "tls",
            start_tls=s.smtp_security == "starttls",
            timeout=s.smtp_timeout_seconds,
        )
        return Result(True, reply[:200])
