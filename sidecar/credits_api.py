"""What a customer can read about its credits and spend: GET /v1/credits/{summary,history,usage,
requests/{id}} for a client key (its own account only), and the same under /admin/accounts/{id}/credits/
for the admin token. Balances and grants come from Redis (the live figures); usage, history and requests
from Postgres: the roll-ups the flusher maintains, the ledger by its primary key. Reads change nothing."""

from __future__ import annotations

import asyncio
import csv
import datetime as dt
import io
import time
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import msgspec
from aiohttp import web

from . import statements
from .credit_params import Cursor, HistoryQuery, UsageQuery, request_id_param
from .errors import BadRequest, NotFound
from .keys import as_text
from .money import format_credits
from .pipeline import admit
from .services import Services
from .wallet import DAY_MS, Grant

SUMMARY_TOP = 20  # values per dimension in the summary (the usage endpoint lists them all)
MONEY_FIELDS = ("charge", "saved")
LAST_MS = 253_402_300_799_000  # 9999-12-31T23:59:59Z, the last instant ISO 8601 dates name
CSV_COLUMNS = ("created_at", "id", "kind", "amount", "amount_credits", "model", "key_id", "user", "tags")


def _json(data: Any) -> web.Response:
    return web.Response(body=msgspec.json.encode(data), content_type="application/json")


def _ms_iso(ms: int) -> str:
    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC).isoformat().replace("+00:00", "Z")


def _iso(at: dt.datetime | None) -> str | None:
    return None if at is None else at.astimezone(dt.UTC).isoformat().replace("+00:00", "Z")


def _money(out: dict[str, Any], name: str, micro: int) -> None:
    out[name] = micro
    out[f"{name}_credits"] = format_credits(micro)


def _sums(row: Any, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for field in statements.USAGE_FIELDS:
        value = int(row[f"{prefix}{field}"] or 0)
        if field in MONEY_FIELDS:
            _money(out, field, value)
        else:
            out[field] = value
    return out


class CreditReads:
    def __init__(self, svc: Services) -> None:
        self.svc = svc
        self.pool: asyncpg.Pool = svc.store.pool

    async def summary(self, account: str, now_ms: int) -> dict[str, Any]:
        today = dt.datetime.fromtimestamp(now_ms / 1000, dt.UTC).date()
        # Redis and Postgres at once: the summary waits for the slower of the two, not for both.
        (balance, held, active), raw_grants, rows = await asyncio.gather(
            *self._live(account), statements.summary_usage(self.pool, account, today, SUMMARY_TOP)
        )
        if balance is None:
            raise NotFound(f"No account {account!r}.", param="account")
        balance, held = int(balance), int(held or 0)
        out: dict[str, Any] = {"object": "credits.summary", "account": account}
        _money(out, "balance", balance)
        _money(out, "held", held)
        _money(out, "available", balance - held)
        out.update(await self._grants(account, raw_grants, int(active or 0)))
        by_dim: dict[str, list[Any]] = {}
        for r in rows:
            by_dim.setdefault(r["dim"], []).append(r)
        for period in ("today", "month"):
            usage: dict[str, Any] = {}
            for dim in ("total", "model", "key", "user", "tag"):
                found = [r for r in by_dim.get(dim, ()) if r[f"{period}_requests"]]
                if dim == "total":
                    zero = dict.fromkeys((f"{period}_{f}" for f in statements.USAGE_FIELDS), 0)
                    usage.update(_sums(found[0] if found else zero, f"{period}_"))
                    continue
                found.sort(key=lambda r: (-r[f"{period}_charge"], r["value"]))
                usage[f"by_{dim}"] = [
                    {"value": r["value"], **_sums(r, f"{period}_")} for r in found[:SUMMARY_TOP]
                ]
            out[f"usage_{period}"] = usage
        week = next((int(r["week_charge"]) for r in rows if r["dim"] == "total"), 0)
        out["forecast"] = self._forecast(balance - held, week, now_ms)
        return out

    def _live(self, account: str) -> tuple[Awaitable[Any], Awaitable[Any]]:
        """The account hash's figures and its grants (one slot: one connection, pipelined)."""
        k = self.svc.keys.account(account)
        return self.svc.redis.hmget(k.balance, ["balance", "held", "active_ms"]), self.svc.redis.hgetall(
            k.grants
        )

    async def _grants(self, account: str, raw: dict[Any, Any], active_ms: int) -> dict[str, Any]:
        """Credits by grant kind and what ends when: Redis' grants, else (none there) the ledger's."""
        idle_ms = self.svc.balances.wallet.idle_expiry_ms
        grants: list[tuple[str, str, int, int]] = []  # (id, kind, remaining, ends ms or 0)
        for grant_id, value in raw.items():
            g = Grant.parse(as_text(grant_id), as_text(value))
            if g.remaining > 0:
                grants.append((g.grant_id, g.kind, g.remaining, g.ends_ms(active_ms, idle_ms)))
        if not raw:
            for r in await statements.ledger_grants(self.pool, account):
                ends = 0 if r["expires_at"] is None else int(r["expires_at"].timestamp() * 1000)
                if r["idle_expiry"] and idle_ms > 0 and active_ms:
                    ends = min(ends or active_ms + idle_ms, active_ms + idle_ms)
                grants.append((r["grant_id"], r["kind"], int(r["remaining"]), ends))
        by_kind: dict[str, dict[str, Any]] = {}
        for _, kind, remaining, _ in grants:
            entry = by_kind.setdefault(kind, {"amount": 0})
            entry["amount"] += remaining
        for entry in by_kind.values():
            _money(entry, "amount", entry["amount"])
        expiring = []
        for grant_id, kind, remaining, ends in sorted(
            (g for g in grants if g[3]), key=lambda g: (g[3], g[0])
        ):
            item: dict[str, Any] = {"grant_id": grant_id, "kind": kind, "expires_at": _ms_iso(ends)}
            _money(item, "amount", remaining)
            expiring.append(item)
        return {"credits_by_kind": dict(sorted(by_kind.items())), "expiring": expiring}

    @staticmethod
    def _forecast(available: int, week_charge: int, now_ms: int) -> dict[str, Any]:
        """When the available credits run out at the last 7 days' burn (integers; null: no burn)."""
        out: dict[str, Any] = {"window_days": 7}
        _money(out, "burn_per_day", week_charge // 7)
        if week_charge <= 0:
            out.update(run_out_at=None, days_left=None)
            return out
        left_ms = max(0, available) * 7 * DAY_MS // week_charge
        at = _ms_iso(now_ms + left_ms) if now_ms + left_ms < LAST_MS else None  # None: past year 9999
        out.update(run_out_at=at, days_left=left_ms // DAY_MS)
        return out

    async def usage(self, account: str, q: UsageQuery) -> dict[str, Any]:
        rows = await statements.usage(self.pool, account, q)
        name = q.group_by
        data = [{name: r["day"].isoformat() if name == "day" else r["value"], **_sums(r)} for r in rows]
        totals: dict[str, Any] = {}
        for field in statements.USAGE_FIELDS:
            total = sum(d[field] for d in data)
            _money(totals, field, total) if field in MONEY_FIELDS else totals.__setitem__(field, total)
        return {
            "object": "list",
            "group_by": name,
            "from": q.first_day.isoformat(),
            "to": q.last_day.isoformat(),
            "data": data,
            "totals": totals,
        }

    async def history(self, account: str, q: HistoryQuery) -> dict[str, Any]:
        if q.cursor is not None and not await statements.cursor_exists(self.pool, account, q.cursor):
            raise BadRequest("cursor is not one this API returned.", param="cursor")
        rows = await statements.history(self.pool, account, q)
        page = rows[: q.limit]
        more = len(rows) > q.limit
        last = page[-1] if page else None
        return {
            "object": "list",
            "data": [_entry(r) for r in page],
            "has_more": more,
            "next_cursor": Cursor(last["created_at"], last["idempotency_id"]).encode()
            if more and last
            else None,
        }

    async def statement(self, request: web.Request, account: str, q: HistoryQuery) -> web.StreamResponse:
        response = web.StreamResponse(
            headers={
                "Content-Type": "text/csv; charset=utf-8",
                "Content-Disposition": f'attachment; filename="statement-{account}.csv"',
            }
        )
        await response.prepare(request)
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(CSV_COLUMNS)
        n = 0
        async for r in statements.statement(self.pool, account, q):
            amount = int(r["amount"])
            writer.writerow(
                (_iso(r["created_at"]), r["idempotency_id"], r["kind"], amount, format_credits(amount),
                 r["model"] or "", r["key_id"] or "", r["end_user"] or "", ";".join(r["tags"] or ()))
            )  # fmt: skip
            n += 1
            if n % 500 == 0:
                await response.write(buffer.getvalue().encode())
                buffer.seek(0)
                buffer.truncate()
        await response.write(buffer.getvalue().encode())
        await response.write_eof()
        return response

    async def request(self, account: str, request_id: str) -> dict[str, Any]:
        r = await statements.request_row(self.pool, account, request_id)
        if r is None:
            raise NotFound(f"No request {request_id!r} in this account's ledger.", param="request_id")
        out: dict[str, Any] = {"object": "credits.request", "request_id": r["idempotency_id"]}
        _money(out, "charge", -int(r["amount"]))
        for name in (
            "model", "route", "provider", "key_source", "marked_up", "multiplier", "key_id", "outcome",
            "attempts", "upstream_model",
        ):  # fmt: skip
            out[name] = r[name]
        out["user"], out["tags"] = r["end_user"], r["tags"] or []
        for name in ("prompt_tokens", "cached_tokens", "completion_tokens"):
            out[name] = r[name]
        for name in ("hold", "overdraft", "saved"):
            if r[name] is not None:
                _money(out, name, int(r[name]))
            else:
                out[name] = None
        out["drawn"] = msgspec.json.decode(r["drawn"]) if r["drawn"] else {}
        out["started_at"], out["settled_at"] = _iso(r["started_at"]), _iso(r["settled_at"])
        out["created_at"] = _iso(r["created_at"])
        return out


def _entry(r: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"id": r["idempotency_id"], "kind": r["kind"], "created_at": _iso(r["created_at"])}
    _money(out, "amount", int(r["amount"]))
    if r["kind"] == "usage":
        out.update(model=r["model"], route=r["route"], key_id=r["key_id"], user=r["end_user"])
        out.update(
            tags=r["tags"] or [], prompt_tokens=r["prompt_tokens"], completion_tokens=r["completion_tokens"]
        )
        out.update(key_source=r["key_source"], attempts=r["attempts"])
    if r["drawn"]:
        out["drawn"] = msgspec.json.decode(r["drawn"])
    if r["note"] is not None:
        out["note"] = r["note"]
    return out


def credit_routes(
    app: web.Application, services: web.AppKey[Services], proxy: web.AppKey[Any], *, admin: bool = False
) -> None:
    """Route the reads on `app`: /v1/credits/... for a client key (the API app), or, with `admin`,
    /accounts/{account}/credits/... (the /admin sub-app, behind its token)."""

    async def account_of(request: web.Request) -> str:
        if not admin:
            gateway = request.config_dict[proxy]
            caller = await admit.authenticate(request.headers, gateway.accounts, gateway.admit_policy)
            return caller.account
        account = request.match_info["account"]
        svc = request.config_dict[services]
        if not (0 < len(account) <= 200) or not await svc.store.account_exists(account):
            raise NotFound(f"No account {account!r}.", param="account")
        return account

    def reads(request: web.Request) -> CreditReads:
        return CreditReads(request.config_dict[services])

    def now() -> dt.datetime:
        return dt.datetime.now(dt.UTC)

    async def summary(request: web.Request) -> web.StreamResponse:
        account = await account_of(request)
        return _json(await reads(request).summary(account, time.time_ns() // 1_000_000))

    async def history(request: web.Request) -> web.StreamResponse:
        account = await account_of(request)
        q = HistoryQuery.parse(request.query, now())
        if q.csv:
            return await reads(request).statement(request, account, q)
        return _json(await reads(request).history(account, q))

    async def usage(request: web.Request) -> web.StreamResponse:
        account = await account_of(request)
        return _json(await reads(request).usage(account, UsageQuery.parse(request.query, now())))

    async def one_request(request: web.Request) -> web.StreamResponse:
        account = await account_of(request)
        request_id = request_id_param(request.match_info["request_id"])
        return _json(await reads(request).request(account, request_id))

    base = "/accounts/{account}/credits" if admin else "/v1/credits"
    handlers: dict[str, Callable[[web.Request], Any]] = {
        "summary": summary, "history": history, "usage": usage, "requests/{request_id}": one_request,
    }  # fmt: skip
    for path, handler in handlers.items():
        app.router.add_get(f"{base}/{path}", handler)
