"""The outbox entry a settlement appends, and its conversion to a ledger row. Pure: no I/O.

Each entry is one of four kinds (README "Outbox entries"):
- usage: field ``d``, the UsageEvent as JSON, built by the caller with the same request id, account and
  charge it passes the settle script, in the same atomic step as the debit; with an optional ``g``, the
  grants the debit drew from: ``[["<grant id>", "<micro>"], ...]`` (integer strings);
- expiry: field ``x``, ``{"account", "grant", "amount", "at"}`` (integer strings): a grant's remainder that
  left the balance when it ended, a ledger row ``expiry:<account>:<grant>`` of -amount at ``at`` (ms); a
  part of it, when live holds kept the rest (with ``"left"``, what they kept, > 0), the row
  ``expiry-part:<account>:<grant>:<left>`` (a grant's remainder only shrinks: each part's id is its own);
- payoff: field ``p``, the same shape: a new grant paid part of a negative balance. Its money-in row
  counted the whole amount already, so its ledger row ``payoff:<account>:<grant>`` is an 'adjustment' of 0
  that only records the draw on the grant (and makes it once);
- reversal: field ``r``, ``{"account", "id", "amount", "at"}`` with the grants drawn in ``g``: credits the
  debit script took back (a refund, a dispute), a ledger row ``reversal:<account>:<id>`` of -amount.
Every row carries the grants it drew from (``drawn``), which the flusher appends to grant_draws.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import msgspec

from .money import MAX_MICRO


class UsageEvent(msgspec.Struct, kw_only=True, omit_defaults=True):
    request_id: str = ""
    account: str = ""
    charge: int = 0  # micro-credits debited
    route: str | None = None
    model: str | None = None
    provider: str | None = None
    key_source: str | None = None  # "pool", "vault" or "inline" (older rows: "pooled", "byok")
    multiplier: str | None = None  # exact, e.g. "5/4"
    prompt_tokens: int | None = None
    cached_tokens: int | None = None
    completion_tokens: int | None = None
    hold: int | None = None
    saved: int | None = None  # a cache hit: the credits it saved
    outcome: str | None = None
    started_ms: int | None = None
    settled_ms: int | None = None
    # Attribution (the wallet): the API key's id, the request's OpenAI `user` field, its tags ("k=v").
    key_id: str | None = None
    user: str | None = None
    tags: list[str] | None = None
    # Routing (README "Routing and fallback"): the provider's cost (micro-credits; None: unknown), the
    # upstream calls made, the model name the serving upstream was sent when not ours, and whether the
    # pooled markup applied (the operator's key served).
    cost: int | None = None
    attempts: int | None = None
    upstream_model: str | None = None
    marked_up: bool | None = None


encode_event = msgspec.json.Encoder().encode
_decode_event = msgspec.json.Decoder(UsageEvent).decode


def decode_entry(fields: dict[Any, Any]) -> UsageEvent:
    data = fields.get(b"d") or fields.get("d") or b"{}"
    try:
        return _decode_event(data)
    except msgspec.MsgspecError:
        return UsageEvent(outcome="unreadable_event")


class BadEntry(ValueError):
    """An outbox entry that can never become a ledger row; the flusher parks it as a dead letter."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def checked_event(fields: dict[Any, Any]) -> UsageEvent:
    """The entry's event, or BadEntry naming what is wrong with it: no ``d`` field, JSON that does not
    decode as a usage event, an empty request id or account, a charge or hold outside 0..MAX_MICRO."""
    data = fields.get(b"d", fields.get("d"))
    if data is None:
        raise BadEntry("no d field")
    try:
        event = _decode_event(data)
    except msgspec.MsgspecError as exc:
        raise BadEntry(f"undecodable: {exc}") from None
    if not event.request_id:
        raise BadEntry("no request_id")
    if not event.account:
        raise BadEntry("no account")
    if not 0 <= event.charge <= MAX_MICRO:
        raise BadEntry(f"charge {event.charge} outside 0..{MAX_MICRO}")
    if event.hold is not None and not 0 <= event.hold <= MAX_MICRO:
        raise BadEntry(f"hold {event.hold} outside 0..{MAX_MICRO}")
    if event.cost is not None and not 0 <= event.cost <= MAX_MICRO:
        raise BadEntry(f"cost {event.cost} outside 0..{MAX_MICRO}")
    return event


def ledger_time_ms(event: UsageEvent, entry_id: str | bytes) -> int:
    """The ledger row's created_at (its partition key), in epoch ms: when the money moved, as the entry
    itself records it (the settle time, else the start, else the stream entry id's time, the moment the
    settle script appended it). A redelivered entry carries the same, so it maps to the same row."""
    if event.settled_ms is not None:
        return event.settled_ms
    if event.started_ms is not None:
        return event.started_ms
    stamp = (entry_id.decode() if isinstance(entry_id, bytes) else entry_id).partition("-")[0]
    if not stamp.isdigit():
        raise BadEntry(f"no settle time and entry id {entry_id!r} has none")
    return int(stamp)


def ledger_row(fields: dict[Any, Any], entry_id: str | bytes) -> tuple[Any, ...]:
    """One outbox entry (its fields and stream entry id) as a batch row for ``LedgerStore.insert_usage``;
    usage amounts are negative. Raises BadEntry for an entry that must never be written (see
    ``checked_event``)."""
    moved = move_row(fields)
    if moved is not None:
        return moved
    event = checked_event(fields)
    overdraft = max(0, event.charge - event.hold) if event.hold is not None else None
    drawn = _drawn(fields, event.charge)
    return (
        event.request_id,
        event.account,
        "usage",
        -event.charge,
        event.route,
        event.model,
        event.provider,
        event.key_source,
        event.multiplier,
        event.prompt_tokens,
        event.cached_tokens,
        event.completion_tokens,
        event.hold,
        overdraft,
        event.saved,
        event.outcome,
        event.started_ms,
        event.settled_ms,
        ledger_time_ms(event, entry_id),
        event.key_id,
        event.user,
        event.tags,
        drawn,
        event.cost,
        event.attempts,
        event.upstream_model,
        event.marked_up,
    )


DATA_FIELDS = ("d", "g", "x", "p", "r")


def entry_data(fields: dict[Any, Any]) -> dict[Any, Any]:
    """The entry's data fields (what a dead letter keeps of it)."""
    found = {name: fields.get(name.encode(), fields.get(name)) for name in DATA_FIELDS}
    return {name: data for name, data in found.items() if data is not None}


def _field(fields: dict[Any, Any], name: str) -> Any:
    return fields.get(name.encode(), fields.get(name))


def _micro(text: str, what: str, low: int = 1) -> int:
    if not (isinstance(text, str) and text.isascii() and text.isdigit()) or not low <= int(text) <= MAX_MICRO:
        raise BadEntry(f"{what} {text!r} is not an integer string in {low}..{MAX_MICRO}")
    return int(text)


_decode_draws = msgspec.json.Decoder(list[tuple[str, str]]).decode


def _drawn(fields: dict[Any, Any], charge: int) -> str | None:
    """The ``g`` field as the row's drawn jsonb ({"<grant id>": micro, ...}), None without one."""
    data = _field(fields, "g")
    if data is None:
        return None
    try:
        pairs = _decode_draws(data)
    except msgspec.MsgspecError as exc:
        raise BadEntry(f"g undecodable: {exc}") from None
    drawn: dict[str, int] = {}
    for grant, amount in pairs:
        if not grant:
            raise BadEntry("g names an empty grant id")
        drawn[grant] = drawn.get(grant, 0) + _micro(amount, "g amount")
    if sum(drawn.values()) > charge:
        raise BadEntry(f"g draws {sum(drawn.values())}, more than the charge {charge}")
    return encode_json(drawn).decode() if drawn else None


class GrantMove(msgspec.Struct, forbid_unknown_fields=False):
    """An expiry (``x``) or payoff (``p``) entry, naming its grant; or a reversal (``r``), naming its id."""

    account: str
    amount: str
    at: str
    grant: str = ""
    id: str = ""
    left: str = ""  # an expiry's part: what is kept of the grant (absent: nothing, the grant is gone)


_decode_move = msgspec.json.Decoder(GrantMove).decode
encode_json = msgspec.json.Encoder().encode
_MOVE_KINDS = {"x": ("expiry", "expiry", -1), "p": ("payoff", "adjustment", 0)}
_NONE = (None,) * 14  # a row's route .. settled_ms
_NO_ROUTING = (None,) * 4  # a row's cost .. marked_up


def _decoded(fields: dict[Any, Any], field: str) -> tuple[GrantMove, int, int] | None:
    """The entry's `field` decoded, with its amount and time checked; None without that field."""
    data = _field(fields, field)
    if data is None:
        return None
    try:
        move = _decode_move(data)
    except msgspec.MsgspecError as exc:
        raise BadEntry(f"{field} undecodable: {exc}") from None
    if not move.account or not (move.grant if field in _MOVE_KINDS else move.id):
        raise BadEntry(f"{field} without an account or {'grant' if field in _MOVE_KINDS else 'id'}")
    return move, _micro(move.amount, f"{field} amount"), _micro(move.at, f"{field} at", low=0)


def move_row(fields: dict[Any, Any]) -> tuple[Any, ...] | None:
    """The batch row of an expiry, payoff or reversal entry, None for a usage entry."""
    found = _decoded(fields, "r")
    if found is not None:
        taken, amount, at = found
        drawn = _drawn(fields, amount)
        return (f"reversal:{taken.account}:{taken.id}", taken.account, "reversal", -amount, *_NONE, at,
                None, None, None, drawn, *_NO_ROUTING)  # fmt: skip
    for field, (prefix, kind, sign) in _MOVE_KINDS.items():
        moved = _decoded(fields, field)
        if moved is None:
            continue
        move, amount, at = moved
        drawn = encode_json({move.grant: amount}).decode()
        row_id = f"{prefix}:{move.account}:{move.grant}"
        if field == "x" and move.left:  # account ids have no ':', and <left> is digits: ids never meet
            row_id = f"expiry-part:{move.account}:{move.grant}:{_micro(move.left, 'x left')}"
        return (row_id, move.account, kind, sign * amount, *_NONE, at, None, None, None, drawn, *_NO_ROUTING)
    return None


class Observation(NamedTuple):
    """What a settle's outbox entry tells signals (alerts, auto-reload): the account's balance after the
    charge, and before it (after + charge), at the entry's position in its stream."""

    account: str
    entry_id: str
    charge: int
    after: int
    at_ms: int  # when the money moved: the ledger row's time (ledger_time_ms)

    @property
    def before(self) -> int:
        return self.after + self.charge


def observation_of(fields: dict[Any, Any], entry_id: str | bytes) -> Observation | None:
    """The observation in a settle entry that carries its balance (field b); None for any other."""
    after = _field(fields, "b")
    if after is None:
        return None
    text = after.decode() if isinstance(after, bytes) else str(after)
    if not text.lstrip("-").isdigit():
        return None
    event = decode_entry(fields)
    if not event.account:
        return None
    eid = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    try:
        at_ms = ledger_time_ms(event, eid)
    except BadEntry:
        return None
    return Observation(event.account, eid, event.charge, int(text), at_ms)
