"""What the pages work with: the project's service objects (the same ones the /v1 and /admin routes
call), gathered once when the app starts, at `DESK` in the app. Pages call these directly, never the
HTTP API; every call names the account the edge has already authorised (edge.py)."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from aiohttp import web

from ..admin import AdminOps
from ..config import Settings
from ..documents.invoices import Invoices
from ..documents.profiles import Profiles
from ..payments.context import PaymentContext
from ..payments.landing import Payments
from ..services import Services
from ..signals.alert_store import AlertStore
from ..signals.alerts import Alerts
from ..signals.deliveries import Deliveries
from ..vault.store import Vault
from ..wallet_api import WalletOps
from ..wallet_store import WalletStore
from .attempts import SignInAttempts
from .render import Templates
from .sessions import SessionStore

PICKER_LIMIT = 50


@dataclass
class Desk:
    settings: Settings
    services: Services
    sessions: SessionStore
    attempts: SignInAttempts  # failed sign-ins per client address
    wallet: WalletOps  # keys, caps, time zone
    admin: AdminOps  # new keys, revocation, referrals
    alerts: AlertStore  # alert rules, auto-reload
    signals: Alerts  # the alert worker's view of an account's rules and last top-up
    deliveries: Deliveries  # the contact address
    profiles: Profiles
    invoices: Invoices
    payments: Payments
    payment_context: PaymentContext
    vault: Vault  # the account's own provider keys (BYOK)
    templates: Templates

    @property
    def key_store(self) -> WalletStore:
        return WalletStore(self.services.store.pool)

    def now_ms(self) -> int:
        return self.services.balances.wallet.clock()

    def now(self) -> dt.datetime:
        ms = self.now_ms()
        return dt.datetime.fromtimestamp(ms // 1000, dt.UTC) + dt.timedelta(milliseconds=ms % 1000)

    async def account_exists(self, account: str) -> bool:
        return 0 < len(account) <= 64 and await self.services.store.account_exists(account)

    async def find_accounts(self, prefix: str) -> list[str]:
        """Accounts whose id starts with `prefix` (the operator's picker), first PICKER_LIMIT by id."""
        pattern = prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        rows = await self.services.store.pool.fetch(
            "SELECT id FROM accounts WHERE id LIKE $1 ORDER BY id LIMIT $2", pattern, PICKER_LIMIT
        )
        return [r["id"] for r in rows]


DESK = web.AppKey("portal_desk", Desk)
