"""Billing profiles (migration 013): who an account's documents are addressed to. A PUT replaces the
profile after checking every field (a 400 names the first bad one; nothing changes); `version` goes up by
one on each change (a PUT of the same profile changes nothing). `profile_snapshot` is what a document
stores at issue time: a value, untouched by later edits."""

from __future__ import annotations

import json
import re
from typing import Any

import asyncpg
import msgspec

from .. import bodies
from ..errors import BadRequest, NotFound, UnknownAccount
from ..signals.events import Connection
from .countries import country_of, tax_id_of

_EMAIL = re.compile(r"[^@\s]{1,64}@(?:[^@\s.]+\.)+[^@\s.]{2,}\Z")
_POSTAL = re.compile(r"[0-9A-Za-z][0-9A-Za-z \-]{0,18}[0-9A-Za-z]?\Z")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
FIELDS = (
    "legal_name",
    "address_lines",
    "city",
    "postal_code",
    "region",
    "country",
    "tax_id",
    "billing_email",
)


class ProfileBody(msgspec.Struct, forbid_unknown_fields=True):
    legal_name: str
    address_lines: list[str]
    city: str
    postal_code: str
    country: str
    billing_email: str
    region: str | None = None
    tax_id: str | None = None


def decode(raw: bytes) -> ProfileBody:
    """The body, or a 400 naming the offending field (bodies.decode)."""
    body: ProfileBody = bodies.decode(raw, ProfileBody, "billing profile")
    return body


def _text(value: str, field: str, longest: int) -> str:
    trimmed = value.strip()
    if not trimmed or len(trimmed) > longest or _CONTROL.search(trimmed):
        raise BadRequest(f"{field} must be 1 to {longest} characters, no control characters.", param=field)
    return trimmed


def checked(body: ProfileBody) -> dict[str, Any]:
    """The profile's fields as stored, or a 400 naming the offending field."""
    if not 1 <= len(body.address_lines) <= 4:
        raise BadRequest("address_lines must hold 1 to 4 lines.", param="address_lines")
    lines = [_text(line, "address_lines", 200) for line in body.address_lines]
    try:
        country = country_of(body.country)
    except ValueError as exc:
        raise BadRequest(f"country: {exc}.", param="country") from None
    postal = _text(body.postal_code, "postal_code", 20)
    if not _POSTAL.match(postal):
        raise BadRequest("postal_code holds letters, digits, spaces and dashes only.", param="postal_code")
    tax_id = None
    if body.tax_id is not None and body.tax_id.strip():
        try:
            tax_id = tax_id_of(body.tax_id, country)
        except ValueError as exc:
            raise BadRequest(f"tax_id: {exc}.", param="tax_id") from None
    email = body.billing_email.strip()
    if len(email) > 254 or not _EMAIL.match(email):
        raise BadRequest("billing_email must be an email address (name@example.com).", param="billing_email")
    region = body.region
    return {
        "legal_name": _text(body.legal_name, "legal_name", 200),
        "address_lines": lines,
        "city": _text(body.city, "city", 100),
        "postal_code": postal,
        "region": _text(region, "region", 100) if region is not None and region.strip() else None,
        "country": country,
        "tax_id": tax_id,
        "billing_email": email,
    }


async def _known(conn: Connection, account: str) -> None:
    if not await conn.fetchval("SELECT 1 FROM accounts WHERE id = $1", account):
        raise UnknownAccount(account)


async def profile_snapshot(conn: Connection, account: str) -> dict[str, Any]:
    """The account's billing profile as it is now, with its version (a fresh value each call); a 404
    when the account has none."""
    row = await conn.fetchrow(
        f"SELECT {', '.join(FIELDS)}, version, updated_at FROM billing_profiles WHERE account_id = $1",
        account,
    )
    if row is None:
        await _known(conn, account)
        raise NotFound(f"Account {account!r} has no billing profile.", param="account")
    return {
        "account": account,
        **{f: row[f] for f in FIELDS if f != "address_lines"},
        "address_lines": json.loads(row["address_lines"]),
        "version": row["version"],
        "updated_at": row["updated_at"].isoformat(),
    }


_UPSERT = f"""
INSERT INTO billing_profiles (account_id, {", ".join(FIELDS)})
VALUES ($1, $2, $3::jsonb, $4, $5, $6, $7, $8, $9)
ON CONFLICT (account_id) DO UPDATE SET
    {", ".join(f"{f} = EXCLUDED.{f}" for f in FIELDS)},
    version = billing_profiles.version + 1, updated_at = now()
WHERE ({", ".join(f"billing_profiles.{f}" for f in FIELDS)})
    IS DISTINCT FROM ({", ".join(f"EXCLUDED.{f}" for f in FIELDS)})
"""


class Profiles:
    """What the routes call, for the client's own account or the operator's any."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    async def get(self, account: str) -> dict[str, Any]:
        async with self.pool.acquire() as conn:
            return {"object": "billing_profile", **await profile_snapshot(conn, account)}

    async def put(self, account: str, raw: bytes) -> dict[str, Any]:
        fields = checked(decode(raw))
        values = [json.dumps(fields[f]) if f == "address_lines" else fields[f] for f in FIELDS]
        async with self.pool.acquire() as conn, conn.transaction():
            await _known(conn, account)
            await conn.execute(_UPSERT, account, *values)
            return {"object": "billing_profile", **await profile_snapshot(conn, account)}
