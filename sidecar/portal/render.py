"""Templates and static files: Jinja2 over the package's templates/ (autoescaped, undefined names an
error), the filters that print amounts and instants, and the static assets read once into memory, each
served under a name that carries its content hash (cached for a year, changed when the file changes)."""

from __future__ import annotations

import datetime as dt
import hashlib
from dataclasses import dataclass
from importlib.resources import files
from typing import Any

import jinja2

from ..documents.document_text import amount
from ..money import format_credits

NAV = (  # (name, label, path under the account): the account pages' navigation
    ("overview", "Overview", ""),
    ("usage", "Usage", "usage"),
    ("history", "History", "history"),
    ("keys", "API keys", "keys"),
    ("provider-keys", "Provider keys", "provider-keys"),
    ("settings", "Settings", "settings"),
    ("buy", "Buy credits", "buy"),
    ("documents", "Documents", "documents"),
)
# What a template may leave out of its context (an undefined name is otherwise an error).
DEFAULTS: dict[str, Any] = {
    "nav": NAV, "viewer": None, "account": None, "active": "", "banners": [], "notice": None, "error": None,
    "field": None, "form": {},
}  # fmt: skip
STATIC_TYPES = {".css": "text/css; charset=utf-8", ".svg": "image/svg+xml", ".js": "text/javascript"}


def credits(micro: Any) -> str:
    """Micro-credits as exact decimal credits with grouped thousands: 1234567890 -> '1,234.56789'."""
    if isinstance(micro, bool) or not isinstance(micro, int):
        raise TypeError(f"an amount is an integer of micro-credits, not {micro!r}")
    text = format_credits(micro)
    sign = "-" if text.startswith("-") else ""
    whole, _, frac = text.lstrip("-").partition(".")
    return f"{sign}{int(whole):,}" + (f".{frac}" if frac else "")


def when(value: Any) -> str:
    """An instant (ISO 8601 text, a datetime or epoch ms) as 'YYYY-MM-DD HH:MM UTC'; '' for none."""
    if value is None or value == "":
        return ""
    if isinstance(value, int):
        at = dt.datetime.fromtimestamp(value // 1000, dt.UTC)
    elif isinstance(value, dt.datetime):
        at = value
    else:
        at = dt.datetime.fromisoformat(str(value))
    at = at.replace(tzinfo=dt.UTC) if at.tzinfo is None else at.astimezone(dt.UTC)
    return at.strftime("%Y-%m-%d %H:%M UTC")


def day(value: Any) -> str:
    return when(value)[:10]


@dataclass(frozen=True, slots=True)
class Asset:
    name: str  # as served: <stem>.<hash>.<ext>
    body: bytes
    content_type: str


class Templates:
    def __init__(self) -> None:
        root = files("sidecar.portal")
        self.env = jinja2.Environment(
            loader=jinja2.FileSystemLoader(str(root / "templates")),
            autoescape=jinja2.select_autoescape(["html"]),
            undefined=jinja2.StrictUndefined,
            trim_blocks=True,
            lstrip_blocks=True,
        )
        self.env.filters.update(credits=credits, when=when, day=day, money=amount)
        self.assets: dict[str, Asset] = {}
        self.asset_urls: dict[str, str] = {}
        for item in (root / "static").iterdir():
            suffix = "." + item.name.rpartition(".")[2]
            if item.name.startswith(".") or suffix not in STATIC_TYPES:
                continue
            body = item.read_bytes()
            stem = item.name.rpartition(".")[0]
            served = f"{stem}.{hashlib.sha256(body).hexdigest()[:12]}{suffix}"
            self.assets[served] = Asset(served, body, STATIC_TYPES[suffix])
            self.asset_urls[item.name] = f"/portal/static/{served}"
        self.env.globals.update(DEFAULTS, static=self.static)

    def static(self, name: str) -> str:
        return self.asset_urls[name]

    def render(self, template: str, context: dict[str, Any]) -> str:
        return self.env.get_template(template).render(context)
