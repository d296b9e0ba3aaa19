"""Logging: one JSON object per line (or plain text), and no secret in any line.

Every record passes one formatter, which redacts before anything is written: the configured secrets
(provider keys, the admin token, the account header's secret, passwords in the Redis and Postgres URLs)
wherever they appear, and by pattern client keys (``cgk-…``), provider-style keys (``sk-…``),
``Bearer …`` credentials and URL passwords. The per-request line is built in ``observe``; this module
only shapes and cleans lines.
"""

from __future__ import annotations

import logging
import re
import sys
import time
from collections.abc import Iterable
from typing import Any
from urllib.parse import parse_qs, urlsplit

import msgspec

from .config import Settings
from .vault.settings import master_key_texts

REDACTED = "[redacted]"
# Client keys, provider-style secret keys, bearer credentials and the password part of URLs.
_PATTERNS = re.compile(
    r"cgk-[A-Za-z0-9_\-]+"
    r"|\bsk-[A-Za-z0-9_\-*.]{6,}"
    r"|(?i:bearer)\s+[^\s\"',;]+"
    r"|(?<=://)[^/\s:@]*:[^/\s@]+(?=@)"
    r"|(?i:(?<=[?&]password=)|(?<=[?&]sslpassword=))[^&#\s\"']+"
)
# The attributes every LogRecord has; anything else on a record was passed as `extra`.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


class Redactor:
    """Replaces secret material in text: the given secrets (exact) and the patterns above."""

    def __init__(self, secrets: Iterable[str | None] = ()) -> None:
        # Longest first, so that a secret containing another is replaced whole.
        self.secrets = sorted({s for s in secrets if s and len(s) >= 4}, key=len, reverse=True)

    def __call__(self, text: str) -> str:
        for secret in self.secrets:
            if secret in text:
                text = text.replace(secret, REDACTED)
        return _PATTERNS.sub(REDACTED, text)


def secrets_of(settings: Settings) -> list[str]:
    """Every secret the settings hold: provider keys, the admin token, the account header's secret, URL
    passwords, the vault's master keys."""
    found = [settings.admin_token or "", settings.upstream_api_key or ""]
    found.append(settings.account_header_secret or "")
    found += [settings.signal_webhook_secret or "", settings.smtp_password or ""]  # signals/settings.py
    found += [conf.key() or "" for conf in settings.upstream_table().values()]
    found += master_key_texts(settings)  # the vault's master keys (vault/settings.py)
    for url in (
        settings.redis_url,
        settings.database_url,
        settings.upstream_url,
        settings.signal_webhook_url,
    ):
        if url:
            parts = urlsplit(url)
            found.append(parts.password or "")
            # libpq and redis-py also take the password as a query parameter (?password=…).
            for name, values in parse_qs(parts.query).items():
                if name.lower() in ("password", "sslpassword"):
                    found += values
    return [s for s in found if s]


class JsonFormatter(logging.Formatter):
    """``{"ts", "level", "logger", "msg", ...extra fields}`` on one line, redacted."""

    def __init__(self, redact: Redactor) -> None:
        super().__init__()
        self.redact = redact
        self._encode = msgspec.json.Encoder(enc_hook=str).encode

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": self.redact(record.getMessage()),
        }
        nested = False  # an extra that is neither text nor a plain scalar: redact the encoded line too
        for name, value in vars(record).items():
            if name not in _STANDARD and not name.startswith("_"):
                if isinstance(value, str):
                    value = self.redact(value)
                elif value is not None and not isinstance(value, int | float | bool):
                    nested = True
                line[name] = value
        if record.exc_info:
            line["exc"] = self.redact(self.formatException(record.exc_info))
        elif record.exc_text:
            line["exc"] = self.redact(record.exc_text)
        if record.stack_info:
            line["stack"] = self.redact(self.formatStack(record.stack_info))
        text = self._encode(line).decode()
        return self.redact(text) if nested else text


class TextFormatter(logging.Formatter):
    """``time level logger message key=value…``, redacted."""

    def __init__(self, redact: Redactor) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s %(message)s")
        self.redact = redact

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        extra = " ".join(
            f"{name}={value}"
            for name, value in vars(record).items()
            if name not in _STANDARD and not name.startswith("_")
        )
        return self.redact(f"{text} {extra}" if extra else text)


def formatter(settings: Settings) -> logging.Formatter:
    redact = Redactor(secrets_of(settings))
    return JsonFormatter(redact) if settings.log_format == "json" else TextFormatter(redact)


def configure_logging(settings: Settings) -> None:
    """The root handler (stderr) with the configured level and format; replaces any earlier setup."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter(settings))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(settings.log_level)
    logging.getLogger("pgserver").setLevel(max(logging.WARNING, logging.getLevelName(settings.log_level)))
