"""The query parameters of the credit reads (/v1/credits/*), checked: every malformed value is a
BadRequest naming its parameter, before anything is read. Pure: no I/O."""

from __future__ import annotations

import base64
import binascii
import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass

from .errors import BadRequest

MAX_RANGE_DAYS = 400
DEFAULT_RANGE_DAYS = 30
MAX_HISTORY_LIMIT = 500
DEFAULT_HISTORY_LIMIT = 100
MAX_USAGE_LIMIT = 1000
DEFAULT_USAGE_LIMIT = 100
GROUPS = ("day", "model", "key", "user", "tag")
LEDGER_KINDS = (
    "purchase", "starter", "promotion", "bonus", "subscription", "refund", "adjustment", "grant", "usage",
    "expiry",
)  # fmt: skip


def _text(text: str) -> bool:
    """1-200 characters Postgres can store (no NUL, no lone surrogate)."""
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return 0 < len(text) <= 200 and "\x00" not in text


def _instant(text: str, param: str) -> dt.datetime:
    """An ISO 8601 date (midnight UTC) or date-time (UTC unless it names its offset)."""
    try:
        at = dt.datetime.fromisoformat(text)
    except ValueError:
        raise BadRequest(
            f"{param} must be an ISO 8601 date or date-time, e.g. 2026-12-01.", param=param
        ) from None
    return at.replace(tzinfo=dt.UTC) if at.tzinfo is None else at.astimezone(dt.UTC)


def _int(query: Mapping[str, str], param: str, default: int, high: int) -> int:
    text = query.get(param)
    if text is None:
        return default
    if not (text.isascii() and text.isdigit()) or not 1 <= int(text) <= high:
        raise BadRequest(f"{param} must be an integer from 1 to {high}.", param=param)
    return int(text)


def _range(query: Mapping[str, str], now: dt.datetime) -> tuple[dt.datetime, dt.datetime]:
    to = _instant(query["to"], "to") if "to" in query else now
    try:
        start = (
            _instant(query["from"], "from") if "from" in query else to - dt.timedelta(days=DEFAULT_RANGE_DAYS)
        )
    except OverflowError:
        raise BadRequest("from is out of range.", param="from") from None
    if start > to:
        raise BadRequest("from must not be after to.", param="from")
    if to - start > dt.timedelta(days=MAX_RANGE_DAYS):
        raise BadRequest(f"The range from .. to may span {MAX_RANGE_DAYS} days at most.", param="from")
    return start, to


def time_range(query: Mapping[str, str], now: dt.datetime) -> tuple[dt.datetime, dt.datetime]:
    """The instants `from` .. `to` of a query (`to` unset: now; `from` unset: DEFAULT_RANGE_DAYS before
    `to`), at most MAX_RANGE_DAYS apart; a malformed one is a BadRequest naming it."""
    return _range(query, now)


@dataclass(frozen=True, slots=True)
class Cursor:
    """Where a page of history ends: the last row's (created_at, idempotency id); opaque to clients."""

    created_at: dt.datetime
    idempotency_id: str

    def encode(self) -> str:
        micros = (self.created_at - dt.datetime(1970, 1, 1, tzinfo=dt.UTC)) // dt.timedelta(microseconds=1)
        raw = f"{micros}:{self.idempotency_id}".encode()
        return base64.urlsafe_b64encode(raw).decode().rstrip("=")

    @classmethod
    def decode(cls, text: str) -> Cursor:
        bad = BadRequest("cursor is not one this API returned.", param="cursor")
        try:
            raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)).decode()
        except (binascii.Error, UnicodeDecodeError, ValueError):
            raise bad from None
        micros, sep, idempotency_id = raw.partition(":")
        if not sep or not _text(idempotency_id) or not micros.isascii() or not micros.lstrip("-").isdigit():
            raise bad
        try:
            at = dt.datetime(1970, 1, 1, tzinfo=dt.UTC) + dt.timedelta(microseconds=int(micros))
        except OverflowError:
            raise bad from None
        return cls(at, idempotency_id)


@dataclass(frozen=True, slots=True)
class HistoryQuery:
    start: dt.datetime
    to: dt.datetime
    kinds: tuple[str, ...]  # empty: every kind
    key_id: str | None
    limit: int
    cursor: Cursor | None
    csv: bool

    @classmethod
    def parse(cls, query: Mapping[str, str], now: dt.datetime) -> HistoryQuery:
        start, to = _range(query, now)
        kinds = tuple(k for k in query.get("kind", "").split(",") if k)
        for kind in kinds:
            if kind not in LEDGER_KINDS:
                raise BadRequest(f"kind must be one or more of {', '.join(LEDGER_KINDS)}.", param="kind")
        key_id = query.get("key_id")
        if key_id is not None and not _text(key_id):
            raise BadRequest("key_id must be an API key id.", param="key_id")
        fmt = query.get("format", "json")
        if fmt not in ("json", "csv"):
            raise BadRequest("format must be json or csv.", param="format")
        limit = _int(query, "limit", DEFAULT_HISTORY_LIMIT, MAX_HISTORY_LIMIT)
        cursor = Cursor.decode(query["cursor"]) if "cursor" in query else None
        return cls(start, to, kinds, key_id, limit, cursor, fmt == "csv")


@dataclass(frozen=True, slots=True)
class UsageQuery:
    group_by: str
    first_day: dt.date
    last_day: dt.date  # inclusive
    limit: int

    @classmethod
    def parse(cls, query: Mapping[str, str], now: dt.datetime) -> UsageQuery:
        group_by = query.get("group_by", "day")
        if group_by not in GROUPS:
            raise BadRequest(f"group_by must be one of {', '.join(GROUPS)}.", param="group_by")
        to = _instant(query["to"], "to").date() if "to" in query else now.date()
        try:
            start = (
                _instant(query["from"], "from").date()
                if "from" in query
                else to - dt.timedelta(days=DEFAULT_RANGE_DAYS - 1)
            )
        except OverflowError:
            raise BadRequest("from is out of range.", param="from") from None
        if start > to:
            raise BadRequest("from must not be after to.", param="from")
        if (to - start).days + 1 > MAX_RANGE_DAYS:
            raise BadRequest(f"The range from .. to may span {MAX_RANGE_DAYS} days at most.", param="from")
        return cls(group_by, start, to, _int(query, "limit", DEFAULT_USAGE_LIMIT, MAX_USAGE_LIMIT))


def request_id_param(text: str) -> str:
    if not _text(text):
        raise BadRequest("request_id must be a request id (x-request-id).", param="request_id")
    return text
