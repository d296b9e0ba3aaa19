"""Alert rules and the crossing decision, over plain values (pure).

A low-balance rule has a threshold: a fixed amount, or a share (whole percent) of the account's last
top-up. It fires when one settle takes the balance from at or above the threshold to below it: the
settle scripts run one at a time per account, so of 100 requests that cross together exactly one
takes it across, and after a top-up the next one across fires again (a crossing re-arms by itself).
A cost rule fires when the spend in a day or a month (the account's time zone) reaches its amount: once
per period, by the event's id.

Crossings are read from settles (the balance each leaves, in the outbox entry): credits that expire or
are taken back (a refund) lower the balance without a settle, so a crossing they cause is seen only if a
later settle crosses too."""

from __future__ import annotations

import datetime as dt
import hashlib
from typing import Literal
from zoneinfo import ZoneInfo

import msgspec

from ..errors import BadRequest
from ..money import MAX_MICRO

RuleKind = Literal["balance_below", "top_up_share", "spend_day", "spend_month"]
LOW_KINDS = ("balance_below", "top_up_share")
SPEND_KINDS = ("spend_day", "spend_month")
MAX_RULES = 20


class Rule(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    kind: RuleKind
    amount: int | None = None  # micro-credits: balance_below, spend_day, spend_month
    percent: int | None = None  # of the last top-up: top_up_share (1-100)

    @property
    def id(self) -> str:
        """Stable per rule: names its crossings' events."""
        return f"{self.kind}:{self.percent if self.kind == 'top_up_share' else self.amount}"

    def view(self) -> dict[str, object]:
        out: dict[str, object] = {"id": self.id, "kind": self.kind}
        if self.kind == "top_up_share":
            out["percent"] = self.percent
        else:
            out["amount"] = self.amount
        return out


def checked(rules: list[Rule]) -> list[Rule]:
    """The rules as given, each complete (the offending field named), no two alike."""
    if len(rules) > MAX_RULES:
        raise BadRequest(f"At most {MAX_RULES} alert rules per account.", param="rules")
    for i, rule in enumerate(rules):
        if rule.kind == "top_up_share":
            if rule.amount is not None or rule.percent is None or not 1 <= rule.percent <= 100:
                raise BadRequest(
                    "A top_up_share rule takes percent, a whole number from 1 to 100 (and no amount).",
                    param=f"rules[{i}].percent",
                )
        elif rule.percent is not None or rule.amount is None or not 0 < rule.amount <= MAX_MICRO:
            raise BadRequest(
                f"A {rule.kind} rule takes amount, a positive integer of micro-credits (and no percent).",
                param=f"rules[{i}].amount",
            )
    ids = [r.id for r in rules]
    if len(set(ids)) != len(ids):
        raise BadRequest("Two alert rules are the same.", param="rules")
    return rules


def defaults(percents: list[int]) -> list[Rule]:
    return [Rule("top_up_share", percent=p) for p in percents]


def threshold(rule: Rule, last_top_up: int | None) -> int | None:
    """The balance a low-balance rule fires below; None when it has none (no top-up yet)."""
    if rule.kind == "balance_below":
        return rule.amount
    if rule.kind == "top_up_share" and last_top_up and rule.percent:
        return last_top_up * rule.percent // 100
    return None


def crossed(before: int, after: int, limit: int) -> bool:
    """One settle took the balance from at or above `limit` to below it."""
    return before >= limit > after


def period_start(kind: str, at_ms: int, zone: str | None) -> dt.datetime:
    """The start of the day or month holding `at_ms`, in the account's time zone (UTC when unset)."""
    tz = ZoneInfo(zone) if zone else dt.UTC
    local = dt.datetime.fromtimestamp(at_ms // 1000, tz)
    start = local.replace(hour=0, minute=0, second=0, microsecond=0)
    return start.replace(day=1) if kind == "spend_month" else start


def period_key(kind: str, start: dt.datetime) -> str:
    return start.strftime("%Y-%m" if kind == "spend_month" else "%Y-%m-%d")


def reload_order_id(reload_id: str) -> str:
    """The payment order of a reload: derived from it, so a retried start makes the same one."""
    return "ord_rl_" + hashlib.sha256(reload_id.encode()).hexdigest()[:24]
