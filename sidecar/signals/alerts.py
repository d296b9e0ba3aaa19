"""Alerts and auto-reload's trigger, read from what the flusher writes (no extra round trip on the
request path, no polling of accounts): each settle's outbox entry carries the balance it left, and after
a batch commits the flusher hands its observations here (flusher.py `observers`).

One query reads the batch's accounts' rules, reload settings and last top-up; then, in one transaction,
every crossing becomes an event whose id names the rule and the settle's outbox entry (balance.low), or
the rule and its UTC day or month (spend.high), and a reload crossing becomes a `reloads` row named the
same way. A replayed batch finds them written and adds nothing."""

from __future__ import annotations

import datetime as dt
import json
import logging
from collections import defaultdict
from typing import Any

import asyncpg
import msgspec

from ..outbox import Observation
from . import alert_rules
from .alert_rules import LOW_KINDS, SPEND_KINDS, Rule
from .events import BALANCE_DEPLETED, BALANCE_LOW, SPEND_HIGH, Event, EventLog

log = logging.getLogger("creditgate.alerts")
TOP_UP_KINDS = ["purchase", "grant", "subscription", "starter"]
_rules = msgspec.json.Decoder(list[Rule])

_ACCOUNTS = """
SELECT a.id AS account_id, s.defaults, s.rules, r.threshold AS reload_threshold, r.credits AS reload_credits,
    r.method AS reload_method,
    (SELECT g.amount FROM grants g WHERE g.account_id = a.id AND g.kind = ANY($2)
     ORDER BY g.created_at DESC, g.grant_id LIMIT 1) AS last_top_up
FROM accounts a
LEFT JOIN alert_settings s ON s.account_id = a.id
LEFT JOIN reload_settings r ON r.account_id = a.id AND r.enabled
WHERE a.id = ANY($1)
"""


class AccountSignals(msgspec.Struct, frozen=True):
    rules: list[Rule]
    last_top_up: int | None
    reload_threshold: int | None = None
    reload_credits: int = 0
    reload_method: str = ""


class Alerts:
    """The flusher's observer (one per process that flushes)."""

    def __init__(self, pool: asyncpg.Pool, events: EventLog, default_percents: list[int]) -> None:
        self.pool, self.events = pool, events
        self.defaults = alert_rules.defaults(default_percents)
        self.fired = 0  # events written, for tests and metrics
        self.reloads = 0  # reloads requested

    async def accounts(self, conn: Any, accounts: list[str]) -> dict[str, AccountSignals]:
        out: dict[str, AccountSignals] = {}
        for r in await conn.fetch(_ACCOUNTS, accounts, TOP_UP_KINDS):
            own = _rules.decode(r["rules"]) if r["rules"] is not None else []
            rules = own + (self.defaults if r["defaults"] is not False else [])
            out[r["account_id"]] = AccountSignals(
                rules,
                r["last_top_up"],
                r["reload_threshold"],
                r["reload_credits"] or 0,
                r["reload_method"] or "",
            )
        return out

    async def __call__(self, seen: list[Observation]) -> None:
        by_account: dict[str, list[Observation]] = defaultdict(list)
        for o in seen:
            by_account[o.account].append(o)
        async with self.pool.acquire() as conn, conn.transaction():
            signals = await self.accounts(conn, sorted(by_account))
            for account in sorted(signals):
                await self._account(conn, account, signals[account], by_account[account])

    async def _account(self, conn: Any, account: str, sig: AccountSignals, seen: list[Observation]) -> None:
        for o in seen:
            for rule in sig.rules:
                limit = alert_rules.threshold(rule, sig.last_top_up) if rule.kind in LOW_KINDS else None
                if limit is not None and alert_rules.crossed(o.before, o.after, limit):
                    data = {"rule": rule.view(), "threshold": limit, "balance": o.after, "charge": o.charge}
                    await self._emit(
                        conn, f"{BALANCE_LOW}:{account}:{rule.id}:{o.entry_id}", BALANCE_LOW, account, data
                    )
            if alert_rules.crossed(o.before, o.after, 1):  # to zero: what runs on is the operator's call
                data = {"balance": o.after, "charge": o.charge}
                await self._emit(
                    conn, f"{BALANCE_DEPLETED}:{account}:{o.entry_id}", BALANCE_DEPLETED, account, data
                )
            if sig.reload_threshold and alert_rules.crossed(o.before, o.after, sig.reload_threshold):
                await self._reload(conn, account, sig, o)
        spend_rules = [r for r in sig.rules if r.kind in SPEND_KINDS]
        charged = [o for o in seen if o.charge > 0]
        if spend_rules and charged:
            for rule in spend_rules:  # in UTC days and months, as the roll-ups count them
                for start in sorted({alert_rules.period_start(rule.kind, o.at_ms, None) for o in charged}):
                    await self._spend(conn, account, rule, start)

    async def _spend(self, conn: Any, account: str, rule: Rule, start: dt.datetime) -> None:
        key = alert_rules.period_key(rule.kind, start)
        event_id = f"{SPEND_HIGH}:{account}:{rule.id}:{key}"
        if await conn.fetchval("SELECT 1 FROM signal_events WHERE event_id = $1", event_id):
            return
        end = start.date() + (dt.timedelta(days=1) if rule.kind == "spend_day" else dt.timedelta(days=32))
        if rule.kind == "spend_month":
            end = end.replace(day=1)
        spent = await conn.fetchval(
            "SELECT coalesce(sum(charge), 0) FROM usage_rollup WHERE account_id = $1 AND dim = 'total'"
            " AND day >= $2 AND day < $3",
            account,
            start.date(),
            end,
        )
        if rule.amount is not None and spent >= rule.amount:
            period = "day" if rule.kind == "spend_day" else "month"
            data = {"rule": rule.view(), "period": period, "period_start": key, "spent": int(spent)}
            await self._emit(conn, event_id, SPEND_HIGH, account, data)

    async def _reload(self, conn: Any, account: str, sig: AccountSignals, o: Observation) -> None:
        reload_id = f"rl_{account}_{o.entry_id}"
        new = await conn.fetchval(
            "INSERT INTO reloads (reload_id, account_id, status, method, credits, order_id)"
            " VALUES ($1, $2, 'requested', $3, $4, $5) ON CONFLICT DO NOTHING RETURNING true",
            reload_id,
            account,
            sig.reload_method,
            sig.reload_credits,
            alert_rules.reload_order_id(reload_id),
        )
        if new:  # reloads.py starts it (and emits reload.requested, with its order)
            self.reloads += 1

    async def _emit(self, conn: Any, event_id: str, kind: str, account: str, data: dict[str, Any]) -> None:
        if await self.events.emit(conn, Event(id=event_id, type=kind, account=account, data=data)):
            self.fired += 1
            log.info("event %s for account %s", kind, account)


def rules_json(rules: list[Rule]) -> str:
    return json.dumps([msgspec.to_builtins(r) for r in rules])
