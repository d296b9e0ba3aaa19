"""The settings of issued documents (invoices, receipts, credit notes), a part of `config.Settings` (the
README's "Invoices and receipts" section documents each). msgspec takes one base with fields per Struct,
so this block stands in the chain of bases: Settings inherits it, it inherits the plan settings."""

from __future__ import annotations

import re
from typing import Annotated

import msgspec

from ..errors import ConfigError
from .plan_settings import PlanSettings

ISSUER = re.compile(r"^[A-Z0-9]{1,8}\Z")


class SellerConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Who issues the documents: printed on each one (a snapshot: later changes alter none issued)."""

    name: str = "creditgate operator"
    address_lines: list[str] = msgspec.field(default_factory=list)
    city: str = ""
    postal_code: str = ""
    region: str | None = None
    tax_id: str | None = None
    email: str | None = None


class DocumentSettings(PlanSettings, kw_only=True):
    # The issuer's prefix of every document number (<issuer>-<year>-<sequence>, one gap-free sequence per
    # issuer) and the seller printed on each document (its country: tax_seller_country).
    document_issuer: str = "CG"
    seller: SellerConfig = msgspec.field(default_factory=SellerConfig)
    # Invoice billing mode: how often the invoicing worker looks for ended periods and overdue invoices,
    # and the days after an invoice's due date that its account's new work is refused (None: never).
    invoice_interval_seconds: Annotated[float, msgspec.Meta(gt=0)] = 300.0
    invoice_block_after_days: Annotated[int, msgspec.Meta(ge=0, le=365)] | None = 14


def check_document_settings(settings: DocumentSettings) -> None:
    """What the types cannot say; raises ConfigError naming the setting."""
    if not ISSUER.match(settings.document_issuer):
        raise ConfigError(
            "document_issuer must be 1-8 characters of A-Z and 0-9 (the prefix of document numbers).",
            param="document_issuer",
        )
    seller = settings.seller
    if not seller.name.strip() or len(seller.name) > 200:
        raise ConfigError("seller.name must be 1-200 characters.", param="seller.name")
    if len(seller.address_lines) > 4:
        raise ConfigError("seller.address_lines takes at most 4 lines.", param="seller.address_lines")
